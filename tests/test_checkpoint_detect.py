"""Config detection, with timm as the oracle: the reader's canonical tensors are timm's state_dict, and a timm model
rebuilt from the detected config loads them strictly and computes the same outputs."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from tests._ckpt_factory import SMALL, make_vit_state_dict, write_checkpoint
from tests._timm import import_timm, timm_vit
from tmconvert.converter.checkpoint import open_checkpoint
from tmconvert.converter.checkpoint.errors import CheckpointError
from tmconvert.models import state_dict_shapes
from tmconvert.models.vit import ViTConfig

TIMM_CASES = {  # name → (config, how it is stored)
    "deit-tiny-like": (
        ViTConfig(embed_dim=128, depth=2, num_heads=2, mlp_hidden=512, patch_size=4, img_size=(16, 16), num_classes=10),
        {"fmt": "safetensors"},
    ),
    "distilled": (
        dataclasses.replace(SMALL, distilled=True, num_heads=4),
        {"fmt": "torch-zip", "container": "deit-train", "wrapper_prefix": "module."},
    ),
    "layerscale-patch14-no-head": (
        ViTConfig(
            embed_dim=64,
            depth=2,
            num_heads=1,
            mlp_hidden=256,
            patch_size=14,
            img_size=(28, 28),
            num_classes=0,
            layer_scale=True,
            qkv_bias=False,
        ),
        {"fmt": "torch-legacy", "container": "model", "naming": "deit3"},
    ),
    "no-embed-class": (
        dataclasses.replace(SMALL, no_embed_class=True, img_size=(20, 20), num_classes=0),
        {"fmt": "safetensors-sharded"},
    ),
    "avg-pool-fc-norm": (
        dataclasses.replace(SMALL, class_token=False, global_pool="avg", fc_norm=True),
        {"fmt": "torch-zip", "container": "state_dict"},
    ),
    "hf-non-square": (
        dataclasses.replace(SMALL, img_size=(24, 16), num_heads=4, norm_eps=1e-12),
        {"fmt": "hf-dir", "naming": "hf-legacy", "hf_prefix": "vit"},
    ),
    "hf-v5-distilled": (
        dataclasses.replace(SMALL, distilled=True, num_heads=8, norm_eps=1e-5),
        {"fmt": "hf-dir-bin", "naming": "hf-v5", "hf_prefix": "deit", "layer_norm_eps": 1e-5},
    ),
}
NUM_HEADS_GIVEN = {"distilled": 4, "avg-pool-fc-norm": 2, "no-embed-class": 2}  # D=32: heads need --heads or config


@pytest.mark.parametrize("case", list(TIMM_CASES))
def test_canonical_tensors_and_config_match_timm(tmp_path: Path, case: str) -> None:
    cfg, storage = TIMM_CASES[case]
    model = timm_vit(cfg, seed=1)
    reference = model.state_dict()
    path = write_checkpoint(reference, tmp_path / "ckpt", config=cfg, **storage)
    with open_checkpoint(path, num_heads=NUM_HEADS_GIVEN.get(case)) as ckpt:
        assert ckpt.config == cfg
        assert ckpt.names() == sorted(ckpt.names(), key=list(reference).index)  # natural order is timm's order
        loaded = ckpt.state_dict()
    assert list(loaded) == [name for name in reference if name in loaded] and loaded.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(loaded[name], tensor), name
    rebuilt = timm_vit(ckpt.config, seed=2)
    rebuilt.load_state_dict(loaded, strict=True)
    images = torch.randn(2, cfg.in_chans, *cfg.img_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(images), model(images), rtol=0, atol=0)


def test_registered_deit_tiny_distilled_detects_the_published_config(tmp_path: Path) -> None:
    timm = import_timm()
    model = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False)
    torch.save({"model": model.state_dict()}, tmp_path / "deit_tiny_distilled.pth")
    with open_checkpoint(tmp_path / "deit_tiny_distilled.pth") as ckpt:
        assert ckpt.config == ViTConfig(embed_dim=192, depth=12, num_heads=3, mlp_hidden=768, distilled=True)
        assert ckpt.num_params == 5_910_800  # timm's deit_tiny_patch16_224
        assert ckpt.notes == (
            "num_heads 3: assumed from head_dim 64 (shapes cannot tell; --heads / num_heads= overrides)",
            "grid 14×14: pos_embed's 196 patch positions assumed square",
        )


@pytest.mark.parametrize(
    "cfg",
    [
        SMALL,
        dataclasses.replace(SMALL, distilled=True, num_classes=0),
        dataclasses.replace(SMALL, layer_scale=True, qkv_bias=False, no_embed_class=True),
        dataclasses.replace(SMALL, class_token=False, global_pool="avg", fc_norm=True, img_size=(16, 24)),
        dataclasses.replace(SMALL, layer_scale=True, reg_tokens=4),  # DINOv2 with registers, facebookresearch form
        dataclasses.replace(SMALL, layer_scale=True, reg_tokens=4, no_embed_class=True),  # timm's form
        dataclasses.replace(SMALL, pre_norm=True, patch_bias=False, num_classes=0),  # CLIP image tower
    ],
)
def test_the_vit_models_shape_table_is_the_upstream_layout(cfg: ViTConfig) -> None:
    """The reader checks checkpoints against the model's own table (`state_dict_shapes`); it must be the timm key
    layout, which the test factory writes out independently from the upstream facts (order included)."""
    factory = {k: tuple(v.shape) for k, v in make_vit_state_dict(cfg).items()}
    assert list(state_dict_shapes(cfg).items()) == list(factory.items())


def test_heads_come_from_config_json_and_the_override_wins(tmp_path: Path) -> None:
    cfg = dataclasses.replace(SMALL, num_heads=4)
    path = write_checkpoint(make_vit_state_dict(cfg), tmp_path / "hf", fmt="hf-dir", naming="hf-legacy", config=cfg)
    with open_checkpoint(path) as ckpt:
        assert ckpt.config.num_heads == 4 and ckpt.config_file == path / "config.json"
        assert ckpt.config.norm_eps == 1e-12  # the Hugging Face default: config.json gives no layer_norm_eps
        assert ckpt.notes == ("norm eps 1e-12: the Hugging Face default (no config.json gives layer_norm_eps)",)
    with open_checkpoint(path, num_heads=8) as ckpt:
        assert ckpt.config.num_heads == 8


def test_timm_hub_config_json_gives_heads_and_image_size(tmp_path: Path) -> None:
    cfg = dataclasses.replace(SMALL, img_size=(16, 24), num_heads=4)
    (tmp_path / "config.json").write_text(
        json.dumps(
            {
                "architecture": "vit_custom",
                "num_classes": 10,
                "model_args": {"num_heads": 4},
                "pretrained_cfg": {"input_size": [3, 16, 24]},
            }
        )
    )
    write_checkpoint(make_vit_state_dict(cfg), tmp_path / "model.safetensors")
    with open_checkpoint(tmp_path / "model.safetensors") as ckpt:
        assert ckpt.config == cfg and ckpt.notes == ()


def test_a_sibling_config_json_of_another_model_type_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert", "hidden_size": 768}))
    write_checkpoint(make_vit_state_dict(SMALL), tmp_path / "model.safetensors")
    with open_checkpoint(tmp_path / "model.safetensors", num_heads=2) as ckpt:
        assert ckpt.config == SMALL and ckpt.config_file is None


def test_config_json_contradicting_the_tensors_is_an_error(tmp_path: Path) -> None:
    cfg = dataclasses.replace(SMALL, num_heads=4)
    path = write_checkpoint(make_vit_state_dict(cfg), tmp_path / "hf", fmt="hf-dir", naming="hf-v5", config=cfg)
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "hidden_size": 64}))
    with pytest.raises(CheckpointError, match=r"config\.json: says embed_dim = 64 but the tensors have embed_dim = 32"):
        open_checkpoint(path)
    (path / "config.json").write_text(json.dumps({**config, "image_size": 20}))
    with pytest.raises(CheckpointError, match=r"pos_embed has 17 positions but config\.json says image_size 20×20"):
        open_checkpoint(path)
    (path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match=r"config\.json: unreadable config file"):
        open_checkpoint(path)


def test_non_square_grid_without_config_json_is_a_clear_error(tmp_path: Path) -> None:
    cfg = dataclasses.replace(SMALL, img_size=(12, 16))  # 3×4 = 12 patches + cls: neither 13 nor 12 is square
    path = write_checkpoint(make_vit_state_dict(cfg), tmp_path / "x.safetensors")
    with pytest.raises(
        CheckpointError, match=r"x\.safetensors: pos_embed has 13 positions, .*config\.json with image_size"
    ):
        open_checkpoint(path, num_heads=2)


def test_heads_cannot_be_guessed_for_widths_off_head_dim_64(tmp_path: Path) -> None:
    path = write_checkpoint(make_vit_state_dict(SMALL), tmp_path / "x.safetensors")
    with pytest.raises(CheckpointError, match=r"embed_dim 32 is not a multiple of the usual head_dim 64.*--heads N"):
        open_checkpoint(path)
    with pytest.raises(CheckpointError, match=r"embed_dim 32 cannot be split into 3 attention heads"):
        open_checkpoint(path, num_heads=3)


def test_hf_layer_norm_eps_default_and_explicit(tmp_path: Path) -> None:
    state_dict = make_vit_state_dict(SMALL)
    path = write_checkpoint(state_dict, tmp_path / "x.safetensors", naming="hf-legacy")
    with open_checkpoint(path, num_heads=2) as ckpt:
        assert ckpt.config.norm_eps == 1e-12
    path = write_checkpoint(state_dict, tmp_path / "y.safetensors")
    with open_checkpoint(path, num_heads=2) as ckpt:
        assert ckpt.config.norm_eps == 1e-6  # timm / facebookresearch models
