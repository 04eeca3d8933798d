"""`verify`: converted models run, backends are compared, and similarity to the teacher is measured correctly."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import save_file

from tests._ckpt_factory import SMALL, make_vit_state_dict, write_checkpoint
from tmconvert.converter.checkpoint import CheckpointError, open_checkpoint
from tmconvert.converter.cli import main
from tmconvert.converter.cli._reports import report_table
from tmconvert.converter.configs import config_json
from tmconvert.converter.convert.engine import ConvertRequest, convert
from tmconvert.converter.data.calibration import calibration_batches
from tmconvert.converter.modelfile.converted import load_converted
from tmconvert.converter.verify import numeric
from tmconvert.converter.verify.numeric import NOT_DISTILLED, verify_converted
from tmconvert.kernels import dispatch
from tmconvert.kernels.selective_scan_ref import selective_scan_ref
from tmconvert.models import registry as registry_module
from tmconvert.models.registry import register
from tmconvert.models.vim import VimConfig, VisionMamba
from tmconvert.models.vit import VisionTransformer
from tmconvert.models.vmamba import VMambaConfig

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
    assert capsys.readouterr().err.splitlines()[-1] == (
        f"error: {broken}: verification failed: non-finite weights (NaN or inf) in tensor "
        "'layers.0.mixer.out_proj.weight'; non-finite values in the student's outputs"
    )


def _rewrite(source: Path, target: Path, *, metadata=None, tensors=None) -> Path:
    """A copy of a model file with its metadata (str -> str) and/or tensors edited by the given functions."""
    with safe_open(str(source), framework="pt") as handle:
        meta = dict(handle.metadata())
        state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (not a dict)
    if metadata is not None:
        metadata(meta)
    if tensors is not None:
        tensors(state)
    save_file(state, str(target), metadata=meta)
    return target


def _table_rows(report) -> dict[str, str]:
    """The report table's rows as {check: result}, rendered wide enough for every row to fit one line."""
    console = Console(width=400, record=True, file=io.StringIO())
    console.print(report_table(report))
    rows = [line.split("│")[1:3] for line in console.export_text().splitlines() if line.startswith("│")]
    return {check.strip(): result.strip() for check, result in rows if check.strip()}


def test_teacher_comparison_on_another_patch_grid_is_not_claimed(tmp_path: Path, capsys) -> None:
    teacher = write_checkpoint(make_vit_state_dict(SMALL, seed=1), tmp_path / "teacher.safetensors")
    out = tmp_path / "student.safetensors"
    result = convert(ConvertRequest(source=teacher, target=TARGET, out=out, num_heads=2, patch_size=2))
    why = "the student's 8×8 patch grid is not the teacher's 4×4 at 16×16 px, so their tokens do not pair one to one"
    after_conversion = result.verify_report  # a conversion may change the grid on purpose: not a failure there
    assert after_conversion.ok and after_conversion.teacher_comparison == "partial"
    assert after_conversion.not_compared == {"layers": why, "final": why}
    assert after_conversion.layers == [] and after_conversion.final_cosine is None
    assert after_conversion.top1_agreement is not None  # same classes: the logits still compare
    rows = _table_rows(after_conversion)
    assert rows["teacher comparison"] == "partial" and rows["layer cosine"] == f"not measured: {why}"

    assert main(["verify", str(out), "--teacher", str(teacher), "--heads", "2", "--calib", "2", "--json"]) == 1
    captured = capsys.readouterr()
    report = json.loads(captured.out)
    assert report["ok"] is False and report["teacher_comparison"] == "partial" and report["layers"] == []
    assert report["not_compared"] == {"layers": why, "final": why}
    assert captured.err.splitlines()[-1] == (
        f"error: {out}: verification failed: no comparison with the teacher: {why}"
    )


def test_other_widths_without_kept_channels_and_other_channels_are_not_compared(converted, tmp_path) -> None:
    teacher_path, out = converted
    no_sets = _rewrite(out, tmp_path / "no-sets.safetensors", metadata=lambda m: m.pop("index_sets"))
    with open_checkpoint(teacher_path, num_heads=2) as ckpt:
        report = verify_converted(no_sets, teacher=ckpt, calib=2)
    why = (
        "the student is 16 channels wide and the teacher 32, and the file records no residual channel set that fits "
        "this teacher"
    )
    assert report.not_compared == {"layers": why, "final": why} and report.teacher_comparison == "partial"
    grey = dataclasses.replace(SMALL, in_chans=1)
    grey_teacher = write_checkpoint(make_vit_state_dict(grey), tmp_path / "grey.safetensors")
    with open_checkpoint(grey_teacher, num_heads=2) as ckpt:
        report = verify_converted(out, teacher=ckpt, calib=2, require_teacher=True)
    why = "the teacher reads 1-channel images, the student 3-channel ones"
    assert report.teacher_comparison == "skipped"
    assert report.not_compared == dict.fromkeys(("layers", "final", "top1"), why)
    assert report.problems == [f"no comparison with the teacher: {why}"]


def test_a_layer_plan_beyond_the_teachers_depth_is_said(converted, tmp_path) -> None:
    _, out = converted
    shallow = write_checkpoint(make_vit_state_dict(dataclasses.replace(SMALL, depth=1)), tmp_path / "t1.safetensors")
    with open_checkpoint(shallow, num_heads=2) as ckpt:
        report = verify_converted(out, teacher=ckpt, calib=2)
    assert report.not_compared == {"layers": "the file's layer plan names teacher block 1; this teacher's last is 0"}
    assert report.final_cosine is not None and report.ok


def test_a_converted_students_agreement_is_labelled_informational(converted, tmp_path) -> None:
    teacher_path, out = converted
    with open_checkpoint(teacher_path, num_heads=2) as ckpt:
        report = verify_converted(out, teacher=ckpt, calib=2)
        assert report.stage == "converted" and report.notes == [NOT_DISTILLED] and report.teacher_comparison == "done"
        rows = _table_rows(report)
        agreement = f"{100 * report.top1_agreement:.1f} %"
        assert rows["top-1 agreement"] == f"{agreement} (informational: not distilled yet, see the note)"
        assert rows["note"] == NOT_DISTILLED
        distilled = _rewrite(out, tmp_path / "distilled.safetensors", metadata=lambda m: m.update(distill="{}"))
        report = verify_converted(distilled, teacher=ckpt, calib=2)
    assert report.stage == "distilled" and report.notes == []
    rows = _table_rows(report)
    assert rows["top-1 agreement"] == f"{100 * report.top1_agreement:.1f} %" and "note" not in rows


def test_a_teacher_with_non_finite_weights_is_refused(converted, tmp_path) -> None:
    """The reader refuses a NaN weight when it is read, so no comparison with a NaN teacher is ever made."""
    _, out = converted
    state = make_vit_state_dict(SMALL, seed=1)
    state["blocks.1.attn.proj.weight"][0, 0] = float("nan")
    broken = write_checkpoint(state, tmp_path / "nan-teacher.safetensors")
    with open_checkpoint(broken, num_heads=2) as ckpt, pytest.raises(CheckpointError) as caught:
        verify_converted(out, teacher=ckpt, calib=2)
    assert str(caught.value) == f"{broken}: tensor 'blocks.1.attn.proj.weight' holds non-finite values (NaN or inf)"


def test_cpu_batches_give_the_same_report(converted, monkeypatch) -> None:
    teacher_path, out = converted
    with open_checkpoint(teacher_path, num_heads=2) as ckpt:
        whole = verify_converted(out, teacher=ckpt, calib=5, seed=2)
        monkeypatch.setattr(numeric, "CPU_SCAN_ELEMENTS", 1)  # one image at a time
        one_by_one = verify_converted(out, teacher=ckpt, calib=5, seed=2)
    assert one_by_one.images == whole.images == 5 and one_by_one.top1_agreement == whole.top1_agreement
    assert [s.cosine for s in one_by_one.layers] == pytest.approx([s.cosine for s in whole.layers], abs=1e-6)
    assert one_by_one.final_cosine == pytest.approx(whole.final_cosine, abs=1e-6)


def test_malformed_verification_metadata_is_one_line(converted, tmp_path, capsys) -> None:
    teacher, out = converted
    args = ["--teacher", str(teacher), "--heads", "2", "--calib", "2"]
    plan = _rewrite(out, tmp_path / "plan.safetensors", metadata=lambda m: m.update(layer_plan='"all"'))
    assert main(["verify", str(plan), *args]) == 1
    expected = f"error: {plan}: its layer_plan metadata is not a list of {{layer, block}} rows"
    assert capsys.readouterr().err.splitlines()[-1] == expected
    sets = _rewrite(out, tmp_path / "sets.safetensors", metadata=lambda m: m.update(index_sets="[1]"))
    assert main(["verify", str(sets), *args, "--json"]) == 1  # no kept channels recorded: features not compared
    assert set(json.loads(capsys.readouterr().out)["not_compared"]) == {"layers", "final"}


def test_a_vit_model_file_is_not_verified_as_a_student(tmp_path, capsys) -> None:
    cfg = dataclasses.replace(SMALL, num_heads=2)
    state = {k: v.contiguous() for k, v in VisionTransformer(cfg).state_dict().items()}
    metadata = {"format": "tmconvert", "family": "vit", "target_config": json.dumps(config_json(cfg))}
    save_file(state, str(tmp_path / "vit.safetensors"), metadata=metadata)
    assert main(["verify", str(tmp_path / "vit.safetensors"), "--calib", "2"]) == 1
    expected = f"error: {tmp_path / 'vit.safetensors'}: a vit model; verify checks converted (Mamba) model files"
    assert capsys.readouterr().err.splitlines()[-1] == expected


def test_pooled_stage_comparison_on_known_tokens() -> None:
    """A hierarchical student's block against its teacher block: the teacher's patch tokens area-pooled to the stage
    grid, on the stage's kept channels (student channel i against teacher channel kept[i])."""
    gen = torch.Generator().manual_seed(0)
    coarse = torch.randn(2, 2 * 2, 6, generator=gen)  # a 2x2 grid of 6 channels
    fine = coarse.unflatten(1, (2, 2)).repeat_interleave(2, 1).repeat_interleave(2, 2).flatten(1, 2)  # each 2x2 times
    assert numeric.pooled_cosine(coarse, (2, 2), fine, (4, 4), None) == pytest.approx(1.0, abs=1e-12)
    assert numeric.pooled_cosine(fine, (4, 4), coarse, (2, 2), None) == pytest.approx(1.0, abs=1e-12)  # finer stage
    kept = [4, 1, 3]  # a stage wider than the teacher: its channels beyond the kept ones are not compared
    student = torch.cat([coarse[..., kept], torch.randn(2, 4, 5, generator=gen)], dim=-1)
    assert numeric.pooled_cosine(student, (2, 2), fine, (4, 4), kept) == pytest.approx(1.0, abs=1e-12)
    assert numeric.pooled_cosine(-student, (2, 2), fine, (4, 4), kept) == pytest.approx(-1.0, abs=1e-12)

    teacher, stage = torch.randn(1, 16, 3, generator=gen), torch.randn(1, 4, 3, generator=gen)
    windows = teacher.double().view(1, 2, 2, 2, 2, 3).permute(0, 1, 3, 2, 4, 5).reshape(1, 4, 4, 3).mean(2)  # 2x2 means
    expected = F.cosine_similarity(stage.double(), windows.double(), dim=-1).mean().item()
    assert numeric.pooled_cosine(stage, (2, 2), teacher, (4, 4), None) == pytest.approx(expected, abs=1e-9)
    seven = torch.randn(1, 49, 3, generator=gen)  # 7x7 patches to a 4x4 stage (28 px): overlapping areas
    area = F.interpolate(seven.view(1, 7, 7, 3).permute(0, 3, 1, 2), size=(4, 4), mode="area")
    torch.testing.assert_close(numeric.pool_to_grid(seven, (7, 7), (4, 4)), area.flatten(2).transpose(1, 2))


def test_images_for_a_student_with_per_stage_widths() -> None:
    """The calibration images follow the student's geometry only: per-stage widths never reach a ViT config."""
    cfg = VMambaConfig(img_size=(28, 28), in_chans=1, num_classes=10)
    assert numeric._images(3, cfg, 3, seed=0).shape == (3, 1, 28, 28)
