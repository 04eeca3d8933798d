"""The reader on every format, container and naming: same canonical tensors, lazily read, right labels."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from tests._ckpt_factory import FORMATS, SMALL, make_vit_state_dict, write_checkpoint
from tmconvert.converter.checkpoint import TensorInfo, formats, open_checkpoint
from tmconvert.converter.checkpoint.errors import CheckpointError

DISTILLED = dataclasses.replace(SMALL, distilled=True)
EXPECTED_FORMAT = {  # factory format → (Checkpoint.format, Checkpoint.weights_format)
    "safetensors": ("safetensors", "safetensors"),
    "safetensors-sharded": ("safetensors-sharded", "safetensors-sharded"),
    "torch-zip": ("torch-zip", "torch-zip"),
    "torch-legacy": ("torch-legacy", "torch-legacy"),
    "torch-sharded": ("torch-sharded", "torch-sharded"),
    "hf-dir": ("hf-dir", "safetensors"),
    "hf-dir-sharded": ("hf-dir", "safetensors-sharded"),
    "hf-dir-bin": ("hf-dir", "torch-zip"),
    "hf-dir-bin-sharded": ("hf-dir", "torch-sharded"),
}


def assert_same_tensors(path: Path, expected: dict[str, torch.Tensor], **kwargs: object) -> None:
    with open_checkpoint(path, **kwargs) as ckpt:
        assert sorted(ckpt.names()) == sorted(expected)
        for name, tensor in expected.items():
            got = ckpt.get(name)
            assert got.dtype == tensor.dtype and torch.equal(got, tensor), name
            assert ckpt.info(name) == TensorInfo(name, tuple(tensor.shape), tensor.dtype, tensor.nbytes)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("naming", ["timm", "hf-legacy", "hf-v5"])
def test_every_format_and_naming_reads_the_same_canonical_tensors(tmp_path: Path, fmt: str, naming: str) -> None:
    state_dict = make_vit_state_dict(DISTILLED, seed=1)
    hf_prefix = "deit" if naming != "timm" else None
    path = write_checkpoint(
        state_dict, tmp_path / "ckpt", fmt=fmt, naming=naming, hf_prefix=hf_prefix, config=DISTILLED
    )
    assert_same_tensors(path, state_dict, num_heads=2)
    with open_checkpoint(path, num_heads=2) as ckpt:
        assert (ckpt.format, ckpt.weights_format) == EXPECTED_FORMAT[fmt]
        assert ckpt.naming == naming and ckpt.family == "vit" and ckpt.container == "flat"
        assert ckpt.num_params == sum(t.numel() for t in state_dict.values())
        assert ckpt.size_on_disk == sum(f.stat().st_size for f in ckpt.files) > ckpt.num_params * 4 * 0.9
        assert (ckpt.config_file is not None) == fmt.startswith("hf-dir")


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy"])
@pytest.mark.parametrize("container", ["flat", "model", "state_dict"])
@pytest.mark.parametrize("wrapper_prefix", ["", "module.", "_orig_mod.module."])
def test_containers_and_wrapper_prefixes(tmp_path: Path, fmt: str, container: str, wrapper_prefix: str) -> None:
    state_dict = make_vit_state_dict(SMALL)
    path = write_checkpoint(state_dict, tmp_path / "x.pth", fmt=fmt, container=container, wrapper_prefix=wrapper_prefix)
    assert_same_tensors(path, state_dict, num_heads=2)
    with open_checkpoint(path, num_heads=2) as ckpt:
        assert ckpt.container == container
        assert ckpt.container_entries == (() if container == "flat" else (container, "epoch"))
        assert ckpt.source_names("norm.weight") == (f"{wrapper_prefix}norm.weight",)


@pytest.mark.parametrize("container", ["model_ema", "state_dict_ema"])
def test_ema_only_checkpoints_need_ema_true(tmp_path: Path, container: str) -> None:
    state_dict = make_vit_state_dict(SMALL)
    path = write_checkpoint(state_dict, tmp_path / "ema.pth", fmt="torch-zip", container=container)
    with pytest.raises(CheckpointError, match=rf"ema\.pth: .*only EMA weights \('{container}'\).*ema=True"):
        open_checkpoint(path, num_heads=2)
    assert_same_tensors(path, state_dict, num_heads=2, ema=True)
    with open_checkpoint(path, num_heads=2, ema=True) as ckpt:
        assert ckpt.container == container


@pytest.mark.parametrize("fmt", ["torch-zip", "torch-legacy"])
def test_deit_training_checkpoint_with_args_optimizer_and_ema(tmp_path: Path, fmt: str) -> None:
    """facebookresearch DeiT main.py output: `args` is an argparse.Namespace; EMA only when asked for."""
    state_dict = make_vit_state_dict(DISTILLED, seed=3)
    ema = {name: tensor * 0.5 for name, tensor in state_dict.items()}
    path = write_checkpoint(
        state_dict,
        tmp_path / "checkpoint.pth",
        fmt=fmt,
        container="deit-train",
        ema_state_dict=ema,
        wrapper_prefix="module.",
    )
    assert_same_tensors(path, state_dict, num_heads=2)
    assert_same_tensors(path, ema, num_heads=2, ema=True)
    with open_checkpoint(path, num_heads=2) as ckpt:
        assert ckpt.container == "model"
        assert ckpt.container_entries == ("model", "optimizer", "lr_scheduler", "epoch", "model_ema", "scaler", "args")
        assert ckpt.config == dataclasses.replace(DISTILLED, num_heads=2)
    with open_checkpoint(path, num_heads=2, ema=True) as ckpt:
        assert ckpt.container == "model_ema"


def test_state_dict_is_preferred_over_model_like_timm(tmp_path: Path) -> None:
    main = make_vit_state_dict(SMALL, seed=0)
    other = make_vit_state_dict(SMALL, seed=1)
    torch.save({"model": other, "state_dict": main}, tmp_path / "both.pth")
    assert_same_tensors(tmp_path / "both.pth", main, num_heads=2)


def test_deit3_gamma_names_become_layerscale(tmp_path: Path) -> None:
    cfg = dataclasses.replace(SMALL, layer_scale=True)
    state_dict = make_vit_state_dict(cfg)
    path = write_checkpoint(state_dict, tmp_path / "deit3.pth", fmt="torch-zip", container="model", naming="deit3")
    with open_checkpoint(path, num_heads=2) as ckpt:
        assert ckpt.source_names("blocks.1.ls2.gamma") == ("blocks.1.gamma_2",)
        assert ckpt.config.layer_scale
    assert_same_tensors(path, state_dict, num_heads=2)


def test_linear_patch_embedding_is_viewed_as_conv_weight(tmp_path: Path) -> None:
    """timm's checkpoint_filter_fn: a 2-D (D, C·p·p) patch weight is reshaped to (D, C, p, p)."""
    state_dict = make_vit_state_dict(SMALL)
    path = write_checkpoint(state_dict, tmp_path / "old.safetensors", linear_patch=True)
    with open_checkpoint(path, num_heads=2) as ckpt:
        assert ckpt.info("patch_embed.proj.weight").shape == (32, 3, 4, 4)
        assert ckpt.config.patch_size == 4 and ckpt.config.in_chans == 3
    assert_same_tensors(path, state_dict, num_heads=2)


def test_hf_fused_qkv_is_query_key_value_in_that_order(tmp_path: Path) -> None:
    state_dict = make_vit_state_dict(SMALL)
    path = write_checkpoint(state_dict, tmp_path / "hf.safetensors", naming="hf-v5", hf_prefix="vit")
    with open_checkpoint(path, num_heads=2) as ckpt:
        qkv = ckpt.get("blocks.1.attn.qkv.weight")
        assert ckpt.source_names("blocks.1.attn.qkv.weight") == tuple(
            f"vit.layers.1.attention.{p}_proj.weight" for p in "qkv"
        )
        store = ckpt._store
        for part, name in zip(qkv.chunk(3), ckpt.source_names("blocks.1.attn.qkv.weight"), strict=True):
            assert torch.equal(part, store.get(name))


@pytest.mark.parametrize("naming", ["hf-legacy", "hf-v5"])
def test_headless_hf_vit_model_keeps_pooler_out_and_reports_it(tmp_path: Path, naming: str) -> None:
    cfg = dataclasses.replace(SMALL, num_classes=0)
    state_dict = make_vit_state_dict(cfg)
    path = write_checkpoint(
        state_dict,
        tmp_path / "m",
        fmt="hf-dir",
        naming=naming,
        hf_prefix="",
        pooler=True,
        config=cfg,
        layer_norm_eps=1e-6,
    )
    assert_same_tensors(path, state_dict)
    with open_checkpoint(path) as ckpt:
        assert [info.name for info in ckpt.ignored] == ["pooler.dense.bias", "pooler.dense.weight"]
        assert ckpt.ignored[1].shape == (32, 32)
        assert "pooler.dense.weight" not in ckpt
        assert ckpt.config.num_classes == 0 and ckpt.config.norm_eps == 1e-6


def test_timm_extras_that_timm_drops_are_reported_not_read(tmp_path: Path) -> None:
    state_dict = make_vit_state_dict(SMALL)
    extras = {"pre_logits.fc.weight": torch.zeros(32, 32), "mask_token": torch.zeros(1, 32)}
    torch.save({**state_dict, **extras}, tmp_path / "x.pth")
    with open_checkpoint(tmp_path / "x.pth", num_heads=2) as ckpt:
        assert sorted(info.name for info in ckpt.ignored) == sorted(extras)
        assert len(ckpt) == len(state_dict)


def test_names_are_in_natural_order(tmp_path: Path) -> None:
    cfg = dataclasses.replace(SMALL, depth=12, distilled=True)
    state_dict = make_vit_state_dict(cfg)
    path = write_checkpoint(dict(sorted(state_dict.items())), tmp_path / "x.safetensors")  # stored alphabetically
    with open_checkpoint(path, num_heads=2) as ckpt:
        names = ckpt.names()
        assert names[:5] == ["cls_token", "pos_embed", "dist_token", "patch_embed.proj.weight", "patch_embed.proj.bias"]
        assert names.index("blocks.2.mlp.fc2.bias") < names.index("blocks.10.norm1.weight")
        assert names[5:9] == [
            "blocks.0.norm1.weight",
            "blocks.0.norm1.bias",
            "blocks.0.attn.qkv.weight",
            "blocks.0.attn.qkv.bias",
        ]
        assert names[-6:] == [
            "norm.weight",
            "norm.bias",
            "head.weight",
            "head.bias",
            "head_dist.weight",
            "head_dist.bias",
        ]
        assert list(ckpt) == names and len(ckpt) == len(state_dict)
        assert "blocks.11.ls1.gamma" not in ckpt and "blocks.11.mlp.fc1.bias" in ckpt


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_dtypes_come_from_metadata(tmp_path: Path, dtype: torch.dtype) -> None:
    state_dict = make_vit_state_dict(SMALL, dtype=dtype)
    path = write_checkpoint(state_dict, tmp_path / "half.safetensors", naming="hf-legacy")
    with open_checkpoint(path, num_heads=2) as ckpt:
        assert ckpt.info("blocks.0.attn.qkv.weight") == TensorInfo(
            "blocks.0.attn.qkv.weight", (96, 32), dtype, 96 * 32 * 2
        )
    assert_same_tensors(path, state_dict, num_heads=2)


@pytest.mark.parametrize("fmt", ["safetensors", "torch-zip", "safetensors-sharded"])
def test_opening_and_inspecting_reads_no_tensor_data(tmp_path: Path, fmt: str, monkeypatch: pytest.MonkeyPatch) -> None:
    reads: list[str] = []
    for store in (formats.SafetensorsStore, formats.TorchStore):
        original = store.get
        monkeypatch.setattr(store, "get", lambda self, key, _get=original: reads.append(key) or _get(self, key))
    path = write_checkpoint(make_vit_state_dict(SMALL), tmp_path / "x", fmt=fmt, naming="hf-legacy")
    with open_checkpoint(path, num_heads=2) as ckpt:
        assert ckpt.num_params > 0 and [ckpt.info(n) for n in ckpt.names()]
        assert reads == []
        ckpt.get("blocks.0.attn.qkv.bias")
        assert reads == [f"vit.encoder.layer.0.attention.attention.{p}.bias" for p in ("query", "key", "value")]


def test_torch_zip_tensors_are_memory_mapped(tmp_path: Path) -> None:
    path = write_checkpoint(make_vit_state_dict(SMALL), tmp_path / "x.pth", fmt="torch-zip")
    with open_checkpoint(path, num_heads=2) as ckpt:
        tensor = ckpt.get("blocks.0.mlp.fc1.weight")
        mapped = Path("/proc/self/maps").read_text()
        assert str(path) in mapped  # the file is mapped: tensors page in from disk instead of being copied
        start, end = next(
            (int(a, 16), int(b, 16))
            for line in mapped.splitlines()
            if line.endswith(str(path))
            for a, b in [line.split()[0].split("-")]
        )
        assert start <= tensor.data_ptr() < end


def test_missing_tensor_names_file_and_tensor_and_closed_checkpoint(tmp_path: Path) -> None:
    path = write_checkpoint(make_vit_state_dict(SMALL), tmp_path / "x.safetensors")
    ckpt = open_checkpoint(path, num_heads=2)
    with pytest.raises(CheckpointError, match=r"x\.safetensors: no tensor 'blocks\.7\.attn\.qkv\.weight'"):
        ckpt.get("blocks.7.attn.qkv.weight")
    with pytest.raises(CheckpointError, match=r"no tensor 'head_dist\.weight'"):
        ckpt.info("head_dist.weight")
    ckpt.close()
    with pytest.raises(ValueError, match="closed"):
        ckpt.get("norm.weight")


def test_safetensors_whose_header_length_looks_like_a_pickle_opcode(tmp_path: Path) -> None:
    """A header length of 0x0?80 starts the file with bytes 0x80 0x0?, the legacy-pickle signature."""
    path = tmp_path / "x.safetensors"
    for pad in range(1400):
        save_file({"t": torch.zeros(2)}, str(path), metadata={"pad": "x" * pad})
        head = path.read_bytes()[:2]
        if head[0] == 0x80 and head[1] <= 5:
            break
    else:
        pytest.fail("no padding gave a header length of 0x0?80")
    assert formats.sniff_format(path) == "safetensors"
    assert formats.sniff_format(path.rename(tmp_path / "x.bin")) == "safetensors"
