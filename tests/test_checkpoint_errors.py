"""Bad input: every failure is a one-line CheckpointError naming the file, and malicious pickles execute nothing."""

from __future__ import annotations

import builtins
import dataclasses
import json
import os
import pickle
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from tests._ckpt_factory import SMALL, make_vit_state_dict, rename, write_checkpoint
from tests._timm import import_timm
from tmconvert.converter.checkpoint import open_checkpoint
from tmconvert.converter.checkpoint.errors import CheckpointError, UnsafePickleError
from tmconvert.converter.convert.engine import ConvertRequest, convert
from tmconvert.models import registry as registry_module
from tmconvert.models.registry import register
from tmconvert.models.vim import VimConfig


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
        (lambda sd: sd.update({"reg_token": torch.zeros(1, 4, 32)}), r"unsupported ViT: .*none in a distilled ViT"),
        (lambda sd: sd.update({"cls_pos": torch.zeros(1, 1, 32)}), r"not part of a ViT/DeiT .*'cls_pos'"),
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


def _timm_state_dict(name: str, **kwargs: object) -> dict[str, torch.Tensor]:
    model = import_timm().create_model(name, pretrained=False, embed_dim=32, depth=2, num_heads=2, **kwargs)
    return model.state_dict()


def _hf_beit() -> dict[str, torch.Tensor]:
    """transformers BeitForImageClassification names (a ViT layout but for its relative position bias)."""
    sd = rename(make_vit_state_dict(SMALL), "hf-legacy", hf_prefix="vit")
    sd = {name.replace("vit.", "beit.", 1): tensor for name, tensor in sd.items()}
    table = "beit.encoder.layer.0.attention.attention.relative_position_bias.relative_position_bias_table"
    return {**sd, table: torch.zeros(52, 2)}


def _dinov2_swiglu_hf() -> dict[str, torch.Tensor]:
    sd = rename(make_vit_state_dict(dataclasses.replace(SMALL, num_classes=0)), "hf-legacy")
    for i in range(2):
        for param in ("weight", "bias"):
            del sd[f"encoder.layer.{i}.intermediate.dense.{param}"], sd[f"encoder.layer.{i}.output.dense.{param}"]
            sd[f"encoder.layer.{i}.mlp.weights_in.{param}"] = (
                torch.zeros(128, 32) if param == "weight" else torch.zeros(128)
            )
    return sd


@pytest.mark.parametrize(
    ("make", "what", "tensor"),
    [
        (
            lambda: _timm_state_dict("beit_base_patch16_224", img_size=32),
            "BEiT-style relative position bias",
            "blocks.0.attn.relative_position_bias_table",
        ),
        (
            _hf_beit,
            "BEiT-style relative position bias",
            "beit.encoder.layer.0.attention.attention.relative_position_bias.relative_position_bias_table",
        ),
        (
            lambda: _timm_state_dict("eva02_base_patch14_224", img_size=28),
            "EVA-02 SwiGLU MLP",
            "blocks.0.mlp.fc1_g.weight",
        ),
        (  # timm's EVA-02 Ti/S: fused q/k/v with q and v biases, packed SwiGLU, rotary embedding not stored
            lambda: _timm_state_dict("eva02_tiny_patch14_224", img_size=28),
            "BEiT/EVA-style separate q and v biases",
            "blocks.0.attn.q_bias",
        ),
        (  # baaivision EVA-02: the rotary embedding's tables are stored
            lambda: {**make_vit_state_dict(SMALL), "rope.freqs_cos": torch.zeros(16, 8)},
            "EVA-02 rotary position embedding",
            "rope.freqs_cos",
        ),
        (
            lambda: _timm_state_dict("cait_xxs24_224", img_size=32, depth_token_only=1),
            "CaiT class-attention stage",
            "blocks_token_only.0.gamma_1",
        ),
        (  # facebookresearch DINOv2 ViT-g
            lambda: {
                **{k: v for k, v in make_vit_state_dict(SMALL).items() if ".mlp.fc1." not in k},
                "blocks.0.mlp.w12.weight": torch.zeros(128, 32),
            },
            "DINOv2 SwiGLU MLP",
            "blocks.0.mlp.w12.weight",
        ),
        (_dinov2_swiglu_hf, "DINOv2 SwiGLU MLP", "encoder.layer.0.mlp.weights_in.weight"),
    ],
)
def test_architectures_that_are_not_plain_vits_are_named_in_one_line(
    tmp_path: Path, make: Callable[[], dict[str, torch.Tensor]], what: str, tensor: str
) -> None:
    torch.save(make(), tmp_path / "x.pth")
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(tmp_path / "x.pth", num_heads=2)
    assert str(caught.value) == (
        f"{tmp_path / 'x.pth'}: {what} ({tensor}) is not supported: "
        "tmconvert converts plain ViTs (absolute position embeddings, GELU MLPs)"
    )


def test_timm_packed_swiglu_is_named_not_a_shape_error(tmp_path: Path) -> None:
    """timm's DINOv2 ViT-g (and EVA-02 Ti/S) pack SwiGLU's two input projections into one `mlp.fc1`."""
    sd = _timm_state_dict("vit_giant_patch14_dinov2", img_size=28, num_classes=0)
    torch.save(sd, tmp_path / "x.pth")
    with pytest.raises(
        CheckpointError, match=r"x\.pth: gated \(SwiGLU\) MLP: blocks\.0\.mlp\.fc1\.weight \(170, 32\) is twice"
    ):
        open_checkpoint(tmp_path / "x.pth", num_heads=2)


def test_hf_dinov2_classifier_on_two_tokens_is_refused(tmp_path: Path) -> None:
    """Dinov2ForImageClassification's head reads [class token, mean patch token]: 2×D inputs."""
    cfg = dataclasses.replace(SMALL, num_classes=0, layer_scale=True, patch_size=14, img_size=(28, 28))
    sd = rename(make_vit_state_dict(cfg), "hf-dinov2", hf_prefix="dinov2")
    sd.update({"classifier.weight": torch.zeros(10, 64), "classifier.bias": torch.zeros(10)})
    torch.save(sd, tmp_path / "x.pth")
    with pytest.raises(
        CheckpointError, match=r"x\.pth: the classifier head\.weight \(10, 64\) reads 2×embed_dim .*Dinov2Model"
    ):
        open_checkpoint(tmp_path / "x.pth", num_heads=2)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({"use_swiglu_ffn": True}, r"use_swiglu_ffn \(a SwiGLU MLP\) is not supported: tmconvert converts plain ViTs"),
        (
            {"hidden_act": "gelu_new"},
            r"hidden_act 'gelu_new' is not supported: tmconvert's ViT has 'gelu', 'quick_gelu'",
        ),
        ({"num_register_tokens": 2}, r"says reg_tokens = 2 but the tensors have reg_tokens = 0"),
    ],
)
def test_hf_config_json_describing_what_the_reader_cannot_build(
    tmp_path: Path, edit: dict[str, object], expected: str
) -> None:
    cfg = dataclasses.replace(SMALL, num_classes=0, layer_scale=True, patch_size=14, img_size=(28, 28))
    path = write_checkpoint(make_vit_state_dict(cfg), tmp_path / "hf", fmt="hf-dir", naming="hf-dinov2", config=cfg)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, **edit}))
    with pytest.raises(CheckpointError, match=rf"config\.json: {expected}"):
        open_checkpoint(path)


@pytest.mark.parametrize(("score", "calib"), [("magnitude", None), ("activation", "2")])
def test_non_finite_teacher_weights_stop_a_conversion_before_writing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, score: str, calib: str | None
) -> None:
    """A NaN weight is refused when it is read (here to rank channels), before anything is written."""
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    register("vim-test-narrow", VimConfig(embed_dim=16, depth=2, d_state=4))
    state = make_vit_state_dict(SMALL)
    state["blocks.1.mlp.fc2.weight"][3, 0] = float("nan")
    source = write_checkpoint(state, tmp_path / "nan.safetensors")
    request = ConvertRequest(
        source=source, target="vim-test-narrow", out=tmp_path / "out.safetensors", num_heads=2, score=score, calib=calib
    )
    with pytest.raises(CheckpointError) as caught:
        convert(request)
    assert str(caught.value) == f"{source}: tensor 'blocks.1.mlp.fc2.weight' holds non-finite values (NaN or inf)"
    assert not (tmp_path / "out.safetensors").exists()
