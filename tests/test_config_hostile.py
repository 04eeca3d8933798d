"""Hostile configs: every value read from a checkpoint's config.json or a model file's target_config is checked
(type, range, finiteness), and a bad one is a one-line error naming the file and the key, never a default."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from tests._ckpt_factory import SMALL, make_vit_state_dict, write_checkpoint
from tmconvert.converter.checkpoint import open_checkpoint
from tmconvert.converter.checkpoint.errors import CheckpointError
from tmconvert.converter.cli import main
from tmconvert.converter.configs import config_json
from tmconvert.models.vim import VimConfig, VisionMamba

HEADS4 = dataclasses.replace(SMALL, num_heads=4)
EPS = "a finite number between 0 and 1 (a norm epsilon)"
DINOV2 = dataclasses.replace(SMALL, num_classes=0, layer_scale=True, patch_size=14, img_size=(28, 28))


def _hf_folder(tmp_path: Path, edit: dict[str, Any], *, naming: str = "hf-legacy", cfg=HEADS4) -> Path:
    """A Hugging Face model folder whose config.json has `edit` merged in."""
    path = write_checkpoint(make_vit_state_dict(cfg), tmp_path / "hf", fmt="hf-dir", naming=naming, config=cfg)
    config = json.loads((path / "config.json").read_text())
    config.update(edit)
    (path / "config.json").write_text(json.dumps(config))  # NaN and Infinity are written as JSON's extensions
    return path


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({"num_attention_heads": 0}, "'num_attention_heads' is 0; expected a positive integer"),
        ({"hidden_size": [32]}, "'hidden_size' is [32]; expected a positive integer"),
        ({"num_hidden_layers": True}, "'num_hidden_layers' is True; expected a positive integer"),
        ({"num_channels": 3.0}, "'num_channels' is 3.0; expected a positive integer"),
        ({"intermediate_size": -128}, "'intermediate_size' is -128; expected a positive integer"),
        ({"image_size": -16}, "'image_size' is -16; expected a positive integer or [height, width]"),
        ({"image_size": [16, "16"]}, "'image_size' is [16, '16']; expected a positive integer or [height, width]"),
        ({"patch_size": 0}, "'patch_size' is 0; expected a positive integer or [height, width]"),
        ({"qkv_bias": "yes"}, "'qkv_bias' is 'yes'; expected true or false"),
        ({"layer_norm_eps": "1e-6"}, f"'layer_norm_eps' is '1e-6'; expected {EPS}"),
        ({"layer_norm_eps": float("nan")}, f"'layer_norm_eps' is nan; expected {EPS}"),
        ({"layer_norm_eps": float("inf")}, f"'layer_norm_eps' is inf; expected {EPS}"),
        ({"layer_norm_eps": 0}, f"'layer_norm_eps' is 0; expected {EPS}"),
        ({"hidden_act": ["gelu"]}, "hidden_act ['gelu'] is not supported: tmconvert's ViT has 'gelu', 'quick_gelu'"),
    ],
)
def test_hf_config_values_of_the_wrong_type_or_range_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: dict[str, Any], expected: str
) -> None:
    path = _hf_folder(tmp_path, edit)
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(path)
    assert str(caught.value) == f"{path / 'config.json'}: {expected}"
    assert main(["inspect", str(path)]) == 1
    assert capsys.readouterr().err == f"error: {path / 'config.json'}: {expected}\n"


def test_dinov2_mlp_ratio_and_register_count_are_checked(tmp_path: Path) -> None:
    path = _hf_folder(tmp_path / "ratio", {"mlp_ratio": [4]}, naming="hf-dinov2", cfg=DINOV2)
    with pytest.raises(CheckpointError, match=r"'mlp_ratio' is \[4\]; expected a finite positive number$"):
        open_checkpoint(path)
    path = _hf_folder(tmp_path / "regs", {"num_register_tokens": -1}, naming="hf-dinov2", cfg=DINOV2)
    with pytest.raises(CheckpointError, match=r"'num_register_tokens' is -1; expected an integer >= 0$"):
        open_checkpoint(path)


def test_clip_vision_config_is_checked_with_its_path(tmp_path: Path) -> None:
    cfg = dataclasses.replace(SMALL, pre_norm=True, patch_bias=False, num_classes=0, num_heads=4)
    sd = make_vit_state_dict(cfg)
    path = write_checkpoint(sd, tmp_path / "clip", fmt="hf-dir", naming="hf-clip", config=cfg, model_type="clip")
    config = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**config, "vision_config": "ViT-B/16"}))
    with pytest.raises(CheckpointError, match=r"config\.json: 'vision_config' is 'ViT-B/16'; expected an object$"):
        open_checkpoint(path)
    vision = {**config["vision_config"], "layer_norm_eps": float("-inf")}
    (path / "config.json").write_text(json.dumps({**config, "vision_config": vision}))
    with pytest.raises(CheckpointError, match=r"config\.json: 'vision_config\.layer_norm_eps' is -inf; expected"):
        open_checkpoint(path)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({"model_args": [4]}, "'model_args' is [4]; expected an object"),
        ({"model_args": {"num_heads": 0}}, "'model_args.num_heads' is 0; expected a positive integer"),
        (
            {"model_args": {"img_size": "16"}},
            "'model_args.img_size' is '16'; expected a positive integer or [height, width]",
        ),
        ({"pretrained_cfg": "x"}, "'pretrained_cfg' is 'x'; expected an object"),
        (
            {"pretrained_cfg": {"input_size": [3, 16]}},
            "'pretrained_cfg.input_size' is [3, 16]; expected [channels, height, width] of positive integers",
        ),
        (
            {"model_args": {"act_layer": "relu"}},
            "model_args.act_layer 'relu' is not supported: tmconvert's ViT has 'gelu', 'quick_gelu'",
        ),
    ],
)
def test_timm_hub_config_values_are_checked(tmp_path: Path, config: dict[str, Any], expected: str) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"architecture": "vit_custom", **config}))
    write_checkpoint(make_vit_state_dict(SMALL), tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(tmp_path / "model.safetensors", num_heads=2)
    assert str(caught.value) == f"{tmp_path / 'config.json'}: {expected}"


def test_deeply_nested_config_json_is_one_line_not_a_recursion_error(tmp_path: Path, capsys) -> None:
    path = _hf_folder(tmp_path, {})
    (path / "config.json").write_text("[" * 200_000 + "]" * 200_000)
    with pytest.raises(CheckpointError) as caught:
        open_checkpoint(path)
    assert str(caught.value) == f"{path / 'config.json'}: unreadable config file: JSON nested too deeply"
    assert main(["inspect", str(path)]) == 1
    assert capsys.readouterr().err == f"error: {path / 'config.json'}: unreadable config file: JSON nested too deeply\n"


def _model_file(path: Path, edit: dict[str, Any]) -> Path:
    """A tmconvert model file whose stored target_config has `edit` applied (... deletes the key)."""
    cfg = VimConfig(embed_dim=16, depth=2, d_state=4, patch_size=4, img_size=(16, 16), num_classes=10)
    stored = config_json(cfg)
    for key, value in edit.items():
        if value is ...:
            del stored[key]
        else:
            stored[key] = value
    state = {k: v.contiguous() for k, v in VisionMamba(cfg, seed=0).state_dict().items()}
    metadata = {"format": "tmconvert", "family": "vim", "target_config": json.dumps(stored)}
    save_file(state, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        ({"embed_dim": ...}, "target_config has no 'embed_dim' (tmconvert records every field)"),
        ({"embed_dim": "16"}, "target_config 'embed_dim' is '16'; expected an integer"),
        ({"num_classes": 10.5}, "target_config 'num_classes' is 10.5; expected an integer"),
        ({"norm_eps": float("nan")}, "target_config 'norm_eps' is nan; expected a finite number"),
        ({"norm_eps": "1e-5"}, "target_config 'norm_eps' is '1e-5'; expected a finite number"),
        ({"img_size": [16]}, "target_config 'img_size' is [16]; expected [an integer, an integer]"),
        ({"dt_rank": "1"}, "target_config 'dt_rank' is '1'; expected an integer or null"),
        ({"residual_in_fp32": 1}, "target_config 'residual_in_fp32' is 1; expected true or false"),
        ({"cls_position": None}, "target_config 'cls_position' is None; expected a string"),
    ],
)
def test_a_model_files_target_config_is_checked_field_by_field(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], edit: dict[str, Any], expected: str
) -> None:
    path = _model_file(tmp_path / "vim.safetensors", edit)
    assert main(["eval", str(path), "--data", "synthetic:4"]) == 1
    assert capsys.readouterr().err == f"error: {path}: {expected}\n"
    assert main(["verify", str(path), "--calib", "2"]) == 1
    assert capsys.readouterr().err.splitlines()[-1] == f"error: {path}: {expected}"


def test_an_intact_model_file_still_loads(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _model_file(tmp_path / "vim.safetensors", {})
    assert main(["verify", str(path), "--calib", "2", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["ok"] is True


def test_integer_or_non_finite_weights_are_refused_naming_the_tensor(tmp_path: Path) -> None:
    """A checkpoint of integer weights is refused when opened; a NaN weight when it is read (conversion reads each
    tensor it uses), so a NaN teacher never becomes a silently NaN student."""
    state = make_vit_state_dict(SMALL)
    integer = dict(state, **{"blocks.0.mlp.fc1.bias": state["blocks.0.mlp.fc1.bias"].to(torch.int32)})
    path = write_checkpoint(integer, tmp_path / "int.safetensors")
    with pytest.raises(CheckpointError, match=r"tensor 'blocks\.0\.mlp\.fc1\.bias' is torch\.int32; a ViT's weights"):
        open_checkpoint(path, num_heads=SMALL.num_heads)
    nan = dict(state, **{"blocks.1.attn.proj.weight": torch.full_like(state["blocks.1.attn.proj.weight"], math.nan)})
    path = write_checkpoint(nan, tmp_path / "nan.safetensors")
    with open_checkpoint(path, num_heads=SMALL.num_heads) as ckpt:
        ckpt.get("blocks.0.attn.proj.weight")
        with pytest.raises(CheckpointError, match=r"tensor 'blocks\.1\.attn\.proj\.weight' holds non-finite values"):
            ckpt.get("blocks.1.attn.proj.weight")


def test_a_config_json_that_is_not_a_file_is_refused(tmp_path: Path) -> None:
    folder = tmp_path / "hf"
    folder.mkdir()
    write_checkpoint(make_vit_state_dict(SMALL), folder / "model.safetensors")
    (folder / "config.json").mkdir()
    with pytest.raises(CheckpointError, match=r"config\.json: not a regular file"):
        open_checkpoint(folder / "model.safetensors", num_heads=SMALL.num_heads)
