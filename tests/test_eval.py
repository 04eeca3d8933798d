"""`tmconvert eval`: exact numbers on constructed models and data, both model families, limits and errors; and the
embedded teacher's accuracy on real Fashion-MNIST through the same preprocessing distillation uses."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from tests._distill_factory import TEACHER, write_image_folder
from tmconvert.converter.cli import main
from tmconvert.converter.configs import config_json
from tmconvert.converter.distill.run import write_student
from tmconvert.converter.distill.runfiles import RunPaths
from tmconvert.converter.verify.accuracy import measure_accuracy
from tmconvert.converter.verify.numeric import VerificationError
from tmconvert.models.vim import VimConfig, VisionMamba
from tmconvert.models.vit import VisionTransformer

ROOT = Path(__file__).resolve().parents[1]
# Constant logits (zero head weights): ranking 1 > 3 > 4 > 5 > 0 > 2 > the rest.
BIAS = torch.tensor([1.0, 5.0, 0.0, 4.0, 3.0, 2.0, -9.0, -9.0, -9.0, -9.0])
LABELS = [0, 0, 1, 1, 1, 2]  # class folders a (2 images), b (3), c (1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("eval") / "images", {"a": 2, "b": 3, "c": 1})


def _expected(labels: list[int]) -> dict[str, float]:
    y = torch.tensor(labels)
    return {
        "top1": sum(label == 1 for label in labels) / len(labels),
        "top5": sum(label in (1, 3, 4, 5, 0) for label in labels) / len(labels),
        "loss": F.cross_entropy(BIAS.expand(len(labels), -1), y).item(),
    }


def _vit_file(path: Path) -> Path:
    model = VisionTransformer(TEACHER, seed=0)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(BIAS)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def _vim_file(folder: Path) -> Path:
    cfg = VimConfig(embed_dim=16, depth=2, d_state=4, patch_size=4, img_size=(16, 16), num_classes=10)
    model = VisionMamba(cfg, seed=0)
    with torch.no_grad():
        model.head.weight.zero_()
        model.head.bias.copy_(BIAS)
    folder.mkdir()
    metadata = {"format": "tmconvert", "family": "vim", "target_config": json.dumps(config_json(cfg))}
    write_student(RunPaths(folder), model, cfg, metadata)
    return folder / "student.safetensors"


def _eval_json(capsys, *args: str) -> dict:
    assert main(["eval", *args, "--json"]) == 0, capsys.readouterr().err
    return json.loads(capsys.readouterr().out)


@pytest.mark.parametrize("family", ["vit", "vim"])
def test_known_accuracy_and_loss(tmp_path, data, capsys, family):
    model = _vit_file(tmp_path / "vit.safetensors") if family == "vit" else _vim_file(tmp_path / "vim")
    heads = ["--heads", "2"] if family == "vit" else []
    report = _eval_json(capsys, str(model), "--data", str(data), "--batch-size", "4", *heads)
    expected = _expected(LABELS)
    assert report["family"] == family and report["images"] == 6
    assert report["top1"] == pytest.approx(expected["top1"])  # 3 / 6
    assert report["top5"] == pytest.approx(expected["top5"])  # 5 / 6: class 2 is ranked 6th
    assert report["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    limited = _eval_json(capsys, str(model), "--data", str(data), "--limit", "4", *heads)
    assert limited["images"] == 4 and limited["top1"] == pytest.approx(_expected(LABELS[:4])["top1"])


def test_eval_errors(tmp_path, data, capsys):
    model = _vit_file(tmp_path / "vit.safetensors")
    flat = write_image_folder(tmp_path / "flat", {"": 2})
    assert main(["eval", str(model), "--data", str(flat), "--heads", "2"]) == 1
    assert "unlabelled images" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.safetensors"), "--data", str(data)]) == 1
    assert "missing.safetensors: no such file" in capsys.readouterr().err
    many = write_image_folder(tmp_path / "many", {f"c{i:02d}": 1 for i in range(11)})
    assert main(["eval", str(model), "--data", str(many), "--heads", "2"]) == 1
    assert "11 classes, the model predicts 10" in capsys.readouterr().err


def test_embedded_teacher_on_fashion_mnist(capsys):
    report = _eval_json(
        capsys,
        str(ROOT / "assets" / "fmnist-vit-t.safetensors"),
        "--data",
        "fashion-mnist",
        "--limit",
        "500",
        "--batch-size",
        "250",
    )
    assert report["images"] == 500 and report["top1"] > 0.85 and report["top5"] > 0.98  # 91.35 % on all 10,000


def _edited(source: Path, target: Path, edit) -> Path:
    """A copy of a safetensors file (metadata kept) with its tensors edited in place by `edit`."""
    with safe_open(str(source), framework="pt") as handle:
        metadata = handle.metadata()
        state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (not a dict)
    edit(state)
    save_file(state, str(target), metadata=metadata)
    return target


def _nan(state: dict[str, torch.Tensor], *names: str) -> None:
    for name in names:
        state[name][0] = float("nan")


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            lambda sd: sd.update({"head.weight": torch.zeros(3, 3)}),
            "tensor 'head.weight' has shape (3, 3); its target_config gives (10, 16)",
        ),
        (
            lambda sd: sd.update({"head.weight": torch.zeros(10, 16, dtype=torch.int32)}),
            "tensor 'head.weight' is torch.int32; model weights are floating point",
        ),
        (
            lambda sd: _nan(sd, "layers.0.mixer.out_proj.weight"),
            "tensor 'layers.0.mixer.out_proj.weight' holds non-finite values (NaN or inf)",
        ),
    ],
)
def test_a_broken_model_file_is_one_line(tmp_path, data, capsys, edit, expected):
    broken = _edited(_vim_file(tmp_path / "vim"), tmp_path / "broken.safetensors", edit)
    assert main(["eval", str(broken), "--data", str(data)]) == 1
    assert capsys.readouterr().err == f"error: {broken}: {expected}\n"
    if "non-finite" not in expected:  # verify reports non-finite weights as a failed check (tests/test_verify.py)
        assert main(["verify", str(broken), "--calib", "2"]) == 1
        assert capsys.readouterr().err.splitlines()[-1] == f"error: {broken}: {expected}"


def test_a_teacher_with_non_finite_weights_is_refused(tmp_path, data, capsys):
    broken = _edited(
        _vit_file(tmp_path / "vit.safetensors"),
        tmp_path / "nan.safetensors",
        lambda sd: _nan(sd, "blocks.0.attn.qkv.weight", "norm.weight"),
    )
    assert main(["eval", str(broken), "--data", str(data), "--heads", "2"]) == 1
    expected = f"error: {broken}: tensor 'blocks.0.attn.qkv.weight' holds non-finite values (NaN or inf)\n"
    assert capsys.readouterr().err == expected


def test_non_finite_logits_are_no_accuracy():
    class Broken(nn.Module):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            logits = torch.zeros(len(images), 10)
            logits[-1, 3] = float("nan")
            return logits

    batches = [(torch.zeros(4, 3, 8, 8), torch.zeros(4, dtype=torch.long))] * 2
    with pytest.raises(VerificationError) as caught:
        measure_accuracy(Broken(), batches, num_classes=10)
    assert (
        str(caught.value) == "the model's logits are not finite (NaN or inf) for images 0 to 3: no accuracy to report"
    )


def test_deeply_nested_metadata_is_one_line(tmp_path, capsys):
    model = _vim_file(tmp_path / "vim")
    with safe_open(str(model), framework="pt") as handle:
        metadata = {**handle.metadata(), "layer_plan": "[" * 100_000 + "]" * 100_000}
        state = {k: handle.get_tensor(k) for k in handle.keys()}  # noqa: SIM118 (not a dict)
    deep = tmp_path / "deep.safetensors"
    save_file(state, str(deep), metadata=metadata)
    expected = f"error: {deep}: unreadable metadata: JSON nested too deeply"
    assert main(["eval", str(deep), "--data", "synthetic:4"]) == 1
    assert capsys.readouterr().err == expected + "\n"
    assert main(["verify", str(deep), "--calib", "2"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == expected
