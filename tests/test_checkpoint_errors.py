"""Bad input: every failure is a one-line CheckpointError naming the file, and malicious pickles execute nothing."""

from __future__ import annotations

import builtins
import dataclasses
import os
import pickle
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests._ckpt_factory import SMALL, make_vit_state_dict, write_checkpoint
from tmconvert.converter.checkpoint import open_checkpoint
from tmconvert.converter.checkpoint.errors import CheckpointError, UnsafePickleError


class _Payload:
    """Pickles as a call to `func(*args)`: what a malicious checkpoint does to run code on load."""

    def __init__(self, func: object, *args: object):
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.func, self.args


def _payloads(marker: Path) -> dict[str, _Payload]:
    return {
        "os.system": _Payload(os.system, f"touch {marker}"),
        "builtins.exec": _Payload(builtins.exec, f"open({str(marker)!r}, 'w').close()"),
        "subprocess.Popen": _Payload(subprocess.Popen, ["touch", str(marker)]),
    }


@pytest.mark.parametrize("global_name", ["os.system", "builtins.exec", "subprocess.Popen"])
@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy", "plain-pickle"])
def test_malicious_pickle_is_refused_and_nothing_runs(tmp_path: Path, global_name: str, fmt: str) -> None:
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[global_name]
    path = tmp_path / "evil.pth"
    checkpoint = {"model": make_vit_state_dict(SMALL), "args": payload, "epoch": 1}
    if fmt == "plain-pickle":
        path.write_bytes(pickle.dumps(payload, protocol=2))
    else:
        torch.save(checkpoint, path, _use_new_zipfile_serialization=fmt == "torch-zip")
    with pytest.raises(UnsafePickleError) as caught:
        open_checkpoint(path, num_heads=2)
    message = str(caught.value)
    recorded = {"os.system": "posix.system"}.get(global_name, global_name)  # os.system pickles as posix.system
    assert message.startswith(f"{path}: refused to unpickle") and f"'{recorded}'" in message
    assert "nothing from the file was executed" in message and "\n" not in message
    assert not marker.exists()


def test_malicious_global_inside_the_state_dict_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    state_dict = {**make_vit_state_dict(SMALL), "norm.weight": _payloads(marker)["builtins.exec"]}
    torch.save(state_dict, tmp_path / "evil.safetensors.pt")
    with pytest.raises(UnsafePickleError, match=r"evil\.safetensors\.pt: .*'builtins\.exec'"):
        open_checkpoint(tmp_path / "evil.safetensors.pt", num_heads=2)
    assert not marker.exists()


def test_unlisted_harmless_class_is_still_refused_by_name(tmp_path: Path) -> None:
    torch.save({"model": make_vit_state_dict(SMALL), "out": Path("runs/x")}, tmp_path / "x.pth")
    with pytest.raises(UnsafePickleError, match=r"'pathlib\.\w*Path'"):
        open_checkpoint(tmp_path / "x.pth", num_heads=2)


def _bytes_of(tmp_path: Path, fmt: str) -> tuple[bytes, str]:
    suffix = ".safetensors" if fmt == "safetensors" else ".pth"
    path = write_checkpoint(make_vit_state_dict(SMALL), tmp_path / f"good{suffix}", fmt=fmt)
    return path.read_bytes(), suffix


@pytest.mark.parametrize(
    ("fmt", "cut", "expected"),
    [
        ("safetensors", 0.5, r"corrupted or truncated safetensors file: .*incomplete metadata"),
        ("safetensors", 0.999, r"corrupted or truncated safetensors file"),
        ("torch-zip", 0.5, r"truncated or corrupted torch zip archive \(no zip central directory\)"),
        ("torch-zip", 0.999, r"truncated or corrupted torch zip archive"),
        ("torch-legacy", 0.5, r"cannot read torch checkpoint"),
    ],
)
def test_truncated_files(tmp_path: Path, fmt: str, cut: float, expected: str) -> None:
    data, suffix = _bytes_of(tmp_path, fmt)
    path = tmp_path / f"truncated{suffix}"
    path.write_bytes(data[: int(len(data) * cut)])
    with pytest.raises(CheckpointError, match=rf"^{path}: {expected}") as caught:
        open_checkpoint(path, num_heads=2)
    assert not isinstance(caught.value, UnsafePickleError) and "\n" not in str(caught.value)


def test_corrupted_safetensors_header(tmp_path: Path) -> None:
    data, _ = _bytes_of(tmp_path, "safetensors")
    path = tmp_path / "bad.safetensors"
    path.write_bytes(data[:8] + b"#" * 16 + data[24:])
    with pytest.raises(CheckpointError, match=rf"^{path}: corrupted or truncated safetensors file: .*JSON"):
        open_checkpoint(path, num_heads=2)


def test_corrupted_pickle_inside_zip_is_not_called_unsafe(tmp_path: Path) -> None:
    data, _ = _bytes_of(tmp_path, "torch-zip")
    start = data.index(b"data.pkl") + len(b"data.pkl")
    start = data.index(b"\x80\x02", start)  # the pickle stream (PROTO 2) stored uncompressed in the archive
    broken = data[: start + 2] + b"\x00" * 32 + data[start + 34 :]
    path = tmp_path / "broken.pth"
    path.write_bytes(broken)
    with pytest.raises(CheckpointError, match=rf"^{path}: ") as caught:
        open_checkpoint(path, num_heads=2)
    assert not isinstance(caught.value, UnsafePickleError)


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (b"", r"empty file"),
        (b"\x01\x02 not a checkpoint at all", r"unrecognised file: expected safetensors, a torch zip archive"),
    ],
)
def test_unrecognised_bytes(tmp_path: Path, content: bytes, expected: str) -> None:
    (tmp_path / "x.bin").write_bytes(content)
    with pytest.raises(CheckpointError, match=rf"x\.bin: {expected}"):
        open_checkpoint(tmp_path / "x.bin")


def test_missing_path_and_folder_without_weights(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.pth: no such file or directory"):
        open_checkpoint(tmp_path / "nope.pth")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text("{}")
    with pytest.raises(CheckpointError, match=r"empty: folder holds no weights: expected one of model\.safetensors, "):
        open_checkpoint(tmp_path / "empty")


@pytest.mark.parametrize("fmt", ["safetensors-sharded", "torch-sharded"])
def test_sharded_index_naming_a_missing_shard(tmp_path: Path, fmt: str) -> None:
    index = write_checkpoint(make_vit_state_dict(SMALL), tmp_path / "sharded", fmt=fmt)
    shard = sorted(index.parent.glob("*-00002-of-00002.*"))[0]
    shard.unlink()
    with pytest.raises(
        CheckpointError, match=rf"^{index}: shard '{shard.name}' \(holding tensor '.+'\) does not exist"
    ):
        open_checkpoint(index.parent if fmt == "torch-sharded" else index, num_heads=2)


def test_sharded_index_listing_a_tensor_its_shard_lacks(tmp_path: Path) -> None:
    index = write_checkpoint(make_vit_state_dict(SMALL), tmp_path / "sharded", fmt="safetensors-sharded")
    text = index.read_text().replace('"norm.weight"', '"norm.weight.typo"')
    index.write_text(text)
    with pytest.raises(CheckpointError, match=r"tensor 'norm\.weight\.typo' is listed in shard .*which lacks it"):
        open_checkpoint(index, num_heads=2)


def test_unknown_family(tmp_path: Path) -> None:
    resnet = {"conv1.weight": torch.zeros(8, 3, 7, 7), "bn1.weight": torch.ones(8), "fc.weight": torch.zeros(10, 8)}
    torch.save({"state_dict": resnet}, tmp_path / "resnet.pth")
    with pytest.raises(CheckpointError, match=r"resnet\.pth: not a ViT/DeiT checkpoint: .*'conv1\.weight'"):
        open_checkpoint(tmp_path / "resnet.pth")


@pytest.mark.parametrize("obj", [{}, {"model": {}}, {"model": {"epoch": 3}}, {"epoch": 3, "optimizer": {}}])
def test_empty_or_missing_state_dict(tmp_path: Path, obj: dict[str, object]) -> None:
    torch.save(obj, tmp_path / "x.pth")
    with pytest.raises(
        CheckpointError, match=r"x\.pth: (empty state dict|entry 'model' holds no tensors|no state dict)"
    ):
        open_checkpoint(tmp_path / "x.pth")


def test_not_a_mapping(tmp_path: Path) -> None:
    torch.save([torch.zeros(3)], tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=r"x\.pth: expected a state dict .*found a list"):
        open_checkpoint(tmp_path / "x.pth")


def test_ema_requested_but_absent(tmp_path: Path) -> None:
    path = write_checkpoint(make_vit_state_dict(SMALL), tmp_path / "x.pth", fmt="torch-zip", container="model")
    with pytest.raises(
        CheckpointError,
        match=r"x\.pth: no EMA weights: looked for 'state_dict_ema' or 'model_ema', "
        r"found entries 'model', 'epoch'",
    ):
        open_checkpoint(path, ema=True, num_heads=2)
    path = write_checkpoint(make_vit_state_dict(SMALL), tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match=r"x\.safetensors: no EMA weights"):
        open_checkpoint(path, ema=True, num_heads=2)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (lambda sd: sd.pop("blocks.1.mlp.fc1.bias"), r"incomplete ViT: missing tensor\(s\) blocks\.1\.mlp\.fc1\.bias"),
        (lambda sd: sd.update({"reg_token": torch.zeros(1, 4, 32)}), r"not part of a ViT/DeiT .*'reg_token'"),
        (lambda sd: sd.update({"blocks.1.attn.q_norm.weight": torch.zeros(16)}), r"'blocks\.1\.attn\.q_norm\.weight'"),
        (
            lambda sd: sd.update({"blocks.2.norm1.weight": torch.zeros(32)}),
            r"missing tensor\(s\) blocks\.2\.norm1\.bias",
        ),
        (
            lambda sd: sd.update({"blocks.1.ls1.gamma": torch.zeros(32)}),
            r"tensor\(s\) blocks\.1\.ls1\.gamma do not fit the ViT .*layer_scale False",
        ),
        (
            lambda sd: sd.update({"blocks.0.mlp.fc2.weight": torch.zeros(32, 64)}),
            r"tensor 'blocks\.0\.mlp\.fc2\.weight' has shape \(32, 64\); expected \(32, 128\)",
        ),
        (lambda sd: sd.update({"pos_embed": torch.zeros(1, 20, 32)}), r"pos_embed has 20 positions, which is not"),
        (lambda sd: sd.update({"patch_embed.proj.weight": torch.zeros(32, 3, 4, 2)}), r"non-square 4×2 patch"),
        (lambda sd: [sd.pop(k) for k in ("head_dist.weight", "head_dist.bias")], r"missing tensor\(s\) head_dist\.w"),
        (lambda sd: sd.pop("cls_token"), r"has 'dist_token' but no 'cls_token'"),
    ],
)
def test_inconsistent_vits_are_refused(tmp_path: Path, edit: Callable[[dict], object], expected: str) -> None:
    state_dict = make_vit_state_dict(dataclasses.replace(SMALL, distilled=True))
    edit(state_dict)
    torch.save(state_dict, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=rf"x\.pth: .*{expected}"):
        open_checkpoint(tmp_path / "x.pth", num_heads=2)


def test_names_colliding_after_prefix_stripping(tmp_path: Path) -> None:
    state_dict = make_vit_state_dict(SMALL)
    torch.save({**state_dict, "module.norm.weight": state_dict["norm.weight"]}, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=r"'norm\.weight' and 'module\.norm\.weight' have the same name"):
        open_checkpoint(tmp_path / "x.pth", num_heads=2)


def test_hf_qkv_with_a_missing_part(tmp_path: Path) -> None:
    path = write_checkpoint(make_vit_state_dict(SMALL), tmp_path / "x.pth", fmt="torch-zip", naming="hf-legacy")
    state_dict = torch.load(path, weights_only=True)
    del state_dict["vit.encoder.layer.1.attention.attention.key.bias"]
    torch.save(state_dict, path)
    with pytest.raises(CheckpointError, match=r"'blocks\.1\.attn\.qkv\.bias' lacks its key part"):
        open_checkpoint(path, num_heads=2)


def test_distilled_with_no_embed_class_is_not_a_timm_layout(tmp_path: Path) -> None:
    state_dict = make_vit_state_dict(dataclasses.replace(SMALL, distilled=True))
    state_dict["pos_embed"] = state_dict["pos_embed"][:, 2:]
    torch.save(state_dict, tmp_path / "x.pth")
    with pytest.raises(CheckpointError, match=r"x\.pth: tensors describe an unsupported ViT: a distilled ViT needs"):
        open_checkpoint(tmp_path / "x.pth", num_heads=2)
