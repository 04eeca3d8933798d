"""`verify`: converted models run, backends are compared, and similarity to the teacher is measured correctly."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from tests._ckpt_factory import SMALL, make_vit_state_dict, write_checkpoint
from tmconvert.converter.checkpoint import open_checkpoint
from tmconvert.converter.cli import main
from tmconvert.converter.convert.engine import ConvertRequest, convert
from tmconvert.converter.data.calibration import calibration_batches
from tmconvert.converter.modelfile.converted import load_converted
from tmconvert.converter.verify.numeric import verify_converted
from tmconvert.kernels import dispatch
from tmconvert.kernels.selective_scan_ref import selective_scan_ref
from tmconvert.models import registry as registry_module
from tmconvert.models.registry import register
from tmconvert.models.vim import VimConfig, VisionMamba
from tmconvert.models.vit import VisionTransformer

TARGET = "vim-test-verify"


@pytest.fixture(autouse=True)
def tiny_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    register(TARGET, VimConfig(embed_dim=16, depth=3, d_state=4))  # narrower than the 32-wide teacher


@pytest.fixture
def converted(tmp_path: Path) -> tuple[Path, Path]:
    teacher = write_checkpoint(make_vit_state_dict(SMALL, seed=1), tmp_path / "teacher.safetensors")
    out = tmp_path / "student.safetensors"
    convert(ConvertRequest(source=teacher, target=TARGET, out=out, num_heads=2, verify=False))
    return teacher, out


def test_teacher_tokens_are_rearranged_into_the_students_layout() -> None:
    student = VimConfig(embed_dim=16, depth=1, patch_size=4, img_size=(8, 8)).token_layout()  # 4 patches, cls at 2
    teacher = SMALL.__class__(
        embed_dim=16, depth=1, num_heads=1, mlp_hidden=16, patch_size=4, img_size=(8, 8)
    ).token_layout()  # cls at 0
    index, valid = student.positions_in(teacher)
    assert index.tolist() == [1, 2, 0, 3, 4] and valid.all()
    other_grid = VimConfig(embed_dim=16, depth=1, patch_size=4, img_size=(12, 12)).token_layout()
    with pytest.raises(ValueError, match="patch grids differ"):
        other_grid.positions_in(teacher)


def test_report_matches_an_independent_computation(converted) -> None:
    teacher_path, out = converted
    with open_checkpoint(teacher_path, num_heads=2) as ckpt:
        report = verify_converted(out, teacher=ckpt, calib=4, seed=3, backends=["reference"])
    assert report.ok and report.finite and report.images == 4 and report.backends == {"reference": 0.0}
    assert [(s.layer, s.block) for s in report.layers] == [(0, 0), (1, 1), (2, None)]

    # Recompute layer 1 and the agreement by hand: cls moves from 0 to the middle, keep the residual channels.
    cfg, state, meta = load_converted(out)
    student = VisionMamba(cfg)
    student.load_state_dict(state)
    vit = VisionTransformer(SMALL)
    vit.load_state_dict(make_vit_state_dict(SMALL, seed=1))
    images = torch.cat(list(calibration_batches(4, SMALL, seed=3)))
    with torch.no_grad():
        s_out, t_out = student.forward_all(images), vit.forward_all(images)
    (keep,) = meta["index_sets"]["residual"]["indices"].values()  # one set for the whole model
    keep = torch.tensor(keep)
    half = SMALL.num_patches // 2
    t = t_out.layer_tokens[1]
    t = torch.cat([t[:, 1 : 1 + half], t[:, :1], t[:, 1 + half :]], dim=1)[..., keep]
    expected = F.cosine_similarity(s_out.layer_tokens[1].double(), t.double(), dim=-1).mean().item()
    assert report.layers[1].cosine == pytest.approx(expected, abs=1e-9)
    agree = (s_out.logits.argmax(-1) == t_out.logits.argmax(-1)).double().mean().item()
    assert report.top1_agreement == pytest.approx(agree)


def test_a_backend_that_disagrees_is_reported(converted, monkeypatch) -> None:
    def off_by_a_percent(*args, **kwargs):
        out = selective_scan_ref(*args, **kwargs)
        return (out[0] * 1.01, out[1]) if isinstance(out, tuple) else out * 1.01

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(dispatch, "_load_triton", lambda: off_by_a_percent)
    _, out = converted
    report = verify_converted(out, calib=2, backends=["reference", "triton"])
    assert not report.ok and report.backends["triton"] > 1e-4
    assert "backend triton differs from reference" in report.problems[0]


def test_cli_fails_on_non_finite_weights(converted, tmp_path, capsys) -> None:
    teacher, out = converted
    with safe_open(str(out), framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (not a dict)
    tensors["layers.0.mixer.out_proj.weight"][0, 0] = float("nan")
    broken = tmp_path / "broken.safetensors"
    save_file(tensors, str(broken), metadata=metadata)
    assert main(["verify", str(out), "--teacher", str(teacher), "--heads", "2", "--calib", "2"]) == 0
    capsys.readouterr()
    assert main(["verify", str(broken), "--calib", "2"]) == 1
    err = capsys.readouterr().err
    assert "verification failed" in err and "non-finite" in err
