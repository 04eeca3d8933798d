"""Detecting a checkpoint's `ViTConfig` from tensor shapes (never from tensor data, never from a download).

Shapes settle width, depth, MLP width, patch size, tokens, LayerScale, qkv bias, classes and pooling (`fc_norm`
present: timm's average-pool layout; no class token: average pooling). They cannot settle two
things, so a `config.json` beside the weights (Hugging Face or timm hub layout) is used when present:
- attention heads: else the caller's `num_heads`, else head_dim 64 (timm/DeiT/ViT convention), else an error;
- the grid of a non-square image: else pos_embed's patch slots are assumed to form a square grid.
Norm eps is not stored either: timm / facebookresearch models use 1e-6, Hugging Face models `layer_norm_eps`
(default 1e-12). Every assumption made is returned as a note, so `inspect` can show it.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tmconvert.converter.checkpoint.errors import CheckpointError
from tmconvert.models import ModelConfigError, ViTConfig, state_dict_shapes

TIMM_NORM_EPS = 1e-6
HF_NORM_EPS = 1e-12
DEFAULT_HEAD_DIM = 64
HF_MODEL_TYPES = ("vit", "deit")


@dataclass(frozen=True)
class ConfigHints:
    """What a config.json says about the model (None where it says nothing)."""

    file: Path
    kind: str  # 'hf' (transformers ViTConfig / DeiTConfig) or 'timm' (hub config with 'architecture')
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_hidden: int | None = None
    img_size: tuple[int, int] | None = None
    patch_size: int | None = None
    in_chans: int | None = None
    qkv_bias: bool | None = None
    norm_eps: float | None = None


@dataclass(frozen=True)
class Detection:
    config: ViTConfig
    notes: tuple[str, ...]  # assumptions the shapes and config files could not settle


def read_config_hints(file: Path) -> ConfigHints | None:
    """Parse a config.json; None when it describes something other than a ViT/DeiT (it is then not ours to judge)."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: unreadable config file (expected JSON): {exc}") from exc
    if not isinstance(data, dict):
        return None
    if data.get("model_type") in HF_MODEL_TYPES or ("model_type" not in data and "hidden_size" in data):
        return ConfigHints(
            file=file,
            kind="hf",
            embed_dim=_int(data, "hidden_size", file),
            depth=_int(data, "num_hidden_layers", file),
            num_heads=_int(data, "num_attention_heads", file),
            mlp_hidden=_int(data, "intermediate_size", file),
            img_size=_pair(data.get("image_size"), "image_size", file),
            patch_size=_square(_pair(data.get("patch_size"), "patch_size", file), "patch_size", file),
            in_chans=_int(data, "num_channels", file),
            qkv_bias=data.get("qkv_bias") if isinstance(data.get("qkv_bias"), bool) else None,
            norm_eps=float(data["layer_norm_eps"]) if isinstance(data.get("layer_norm_eps"), int | float) else None,
        )
    if isinstance(data.get("architecture"), str):  # timm hub config: model_args and pretrained_cfg.input_size
        args = data.get("model_args") if isinstance(data.get("model_args"), dict) else {}
        input_size = (data.get("pretrained_cfg") or {}).get("input_size")
        img_size = _pair(args.get("img_size"), "model_args.img_size", file)
        if img_size is None and isinstance(input_size, list) and len(input_size) == 3:
            img_size = _pair(input_size[1:], "pretrained_cfg.input_size", file)
        return ConfigHints(
            file=file,
            kind="timm",
            embed_dim=_int(args, "embed_dim", file),
            depth=_int(args, "depth", file),
            num_heads=_int(args, "num_heads", file),
            img_size=img_size,
            patch_size=_square(_pair(args.get("patch_size"), "model_args.patch_size", file), "patch_size", file),
            in_chans=_int(args, "in_chans", file),
        )
    return None


def detect_vit_config(
    shapes: Mapping[str, tuple[int, ...]],
    *,
    naming: str,
    hints: ConfigHints | None,
    num_heads: int | None,
    path: Path,
) -> Detection:
    """The `ViTConfig` that the canonical tensors (name → shape) describe; checks every tensor's shape against it."""
    notes: list[str] = []
    embed_dim, in_chans, patch_size = _patch_embed(shapes, hints, path)
    block_ids = {int(m.group(1)) for m in (re.match(r"^blocks\.(\d+)\.", n) for n in shapes) if m}
    if not block_ids:
        raise CheckpointError(f"{path}: no transformer blocks found")
    fc1 = _require(shapes, "blocks.0.mlp.fc1.weight", path)
    class_token = "cls_token" in shapes
    distilled = "dist_token" in shapes
    if distilled and not class_token:  # checked before the grid, whose prefix-token count would be wrong
        raise CheckpointError(f"{path}: has 'dist_token' but no 'cls_token'; a distilled ViT needs both")
    heads = _num_heads(embed_dim, hints, num_heads, notes, path)
    img_size, no_embed_class = _grid(shapes, patch_size, int(class_token) + int(distilled), hints, notes, path)
    if naming == "timm":
        norm_eps = TIMM_NORM_EPS
    elif hints is not None and hints.norm_eps is not None:
        norm_eps = hints.norm_eps
    else:
        norm_eps = HF_NORM_EPS
        notes.append(f"norm eps {HF_NORM_EPS:g}: the Hugging Face default (no config.json gives layer_norm_eps)")
    head = shapes.get("head.weight")
    fc_norm = "fc_norm.weight" in shapes  # timm: average pooling with the final norm after it
    try:
        config = ViTConfig(
            embed_dim=embed_dim,
            depth=max(block_ids) + 1,
            num_heads=heads,
            mlp_hidden=fc1[0],
            patch_size=patch_size,
            img_size=img_size,
            in_chans=in_chans,
            num_classes=head[0] if head else 0,
            class_token=class_token,
            distilled=distilled,
            qkv_bias="blocks.0.attn.qkv.bias" in shapes,
            layer_scale="blocks.0.ls1.gamma" in shapes,
            norm_eps=norm_eps,
            no_embed_class=no_embed_class,
            global_pool="token" if class_token and not fc_norm else "avg",
            fc_norm=fc_norm,
        )
    except ModelConfigError as exc:
        raise CheckpointError(f"{path}: tensors describe an unsupported ViT: {exc}") from exc
    if hints is not None:
        _check_hints(config, hints)
    _check_shapes(shapes, config, path)
    return Detection(config, tuple(notes))


def _patch_embed(shapes: Mapping[str, tuple[int, ...]], hints: ConfigHints | None, path: Path) -> tuple[int, int, int]:
    """(embed_dim, in_chans, patch_size); a 2-D weight is timm's old linear patchify, (D, C·p·p)."""
    weight = _require(shapes, "patch_embed.proj.weight", path)
    if len(weight) == 4:
        embed_dim, in_chans, height, width = weight
        if height != width:
            raise CheckpointError(f"{path}: patch_embed.proj.weight has a non-square {height}×{width} patch")
        return embed_dim, in_chans, height
    if len(weight) == 2:
        embed_dim, flat = weight
        if hints is not None and hints.patch_size:
            patch = hints.patch_size
            in_chans = flat // (patch * patch)
        else:
            in_chans = hints.in_chans if hints is not None and hints.in_chans else 3
            patch = math.isqrt(flat // in_chans)
        if in_chans * patch * patch != flat:
            raise CheckpointError(
                f"{path}: linear patch_embed.proj.weight {weight} is not {in_chans} channels × a square patch"
            )
        return embed_dim, in_chans, patch
    raise CheckpointError(f"{path}: patch_embed.proj.weight has shape {weight}; expected (D, C, p, p) or (D, C·p·p)")


def _num_heads(embed_dim: int, hints: ConfigHints | None, given: int | None, notes: list[str], path: Path) -> int:
    if given is not None:
        heads = given
    elif hints is not None and hints.num_heads:
        heads = hints.num_heads
    elif embed_dim % DEFAULT_HEAD_DIM == 0:
        heads = embed_dim // DEFAULT_HEAD_DIM
        notes.append(
            f"num_heads {heads}: assumed from head_dim {DEFAULT_HEAD_DIM} (shapes cannot tell; --heads / num_heads= "
            "overrides)"
        )
    else:
        raise CheckpointError(
            f"{path}: cannot tell the number of attention heads: embed_dim {embed_dim} is not a multiple of the usual "
            f"head_dim {DEFAULT_HEAD_DIM} and no config.json says; pass --heads N (num_heads=N)"
        )
    if heads < 1 or embed_dim % heads:
        raise CheckpointError(f"{path}: embed_dim {embed_dim} cannot be split into {heads} attention heads")
    return heads


def _grid(
    shapes: Mapping[str, tuple[int, ...]],
    patch_size: int,
    prefix_tokens: int,
    hints: ConfigHints | None,
    notes: list[str],
    path: Path,
) -> tuple[tuple[int, int], bool]:
    """(img_size, no_embed_class) from pos_embed's length; a square grid unless config.json gives image_size."""
    pos = _require(shapes, "pos_embed", path)
    if len(pos) != 3 or pos[0] != 1:
        raise CheckpointError(f"{path}: pos_embed has shape {pos}; expected (1, positions, embed_dim)")
    positions = pos[1]
    if hints is not None and hints.img_size is not None:
        height, width = hints.img_size
        if height % patch_size or width % patch_size:
            raise CheckpointError(f"{hints.file}: image_size {height}×{width} is not a multiple of patch {patch_size}")
        patches = (height // patch_size) * (width // patch_size)
        if positions == patches + prefix_tokens:
            return (height, width), False
        if prefix_tokens and positions == patches:
            return (height, width), True
        raise CheckpointError(
            f"{path}: pos_embed has {positions} positions but {hints.file.name} says image_size {height}×{width}, "
            f"i.e. {patches} patches (+{prefix_tokens} prefix tokens)"
        )
    for slots, no_embed_class in ((prefix_tokens, False), (0, True)) if prefix_tokens else ((0, False),):
        side = math.isqrt(max(positions - slots, 0))
        if side > 0 and side * side == positions - slots:
            notes.append(f"grid {side}×{side}: pos_embed's {side * side} patch positions assumed square")
            return (side * patch_size, side * patch_size), no_embed_class
    raise CheckpointError(
        f"{path}: pos_embed has {positions} positions, which is not a square grid of patches (plus {prefix_tokens} "
        "prefix tokens); a non-square grid needs a config.json with image_size"
    )


def _check_hints(config: ViTConfig, hints: ConfigHints) -> None:
    """A config.json that contradicts the tensors describes another model: refuse rather than guess."""
    said = {
        "embed_dim": hints.embed_dim,
        "depth": hints.depth,
        "mlp_hidden": hints.mlp_hidden,
        "patch_size": hints.patch_size,
        "in_chans": hints.in_chans,
        "qkv_bias": hints.qkv_bias,
    }
    for field, value in said.items():
        if value is not None and value != getattr(config, field):
            raise CheckpointError(
                f"{hints.file}: says {field} = {value} but the tensors have {field} = {getattr(config, field)}"
            )


def _check_shapes(shapes: Mapping[str, tuple[int, ...]], config: ViTConfig, path: Path) -> None:
    expected = state_dict_shapes(config)
    missing = [name for name in expected if name not in shapes]
    if missing:
        raise CheckpointError(
            f"{path}: incomplete ViT: missing tensor(s) {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}"
        )
    unexpected = [name for name in shapes if name not in expected]
    if unexpected:
        raise CheckpointError(
            f"{path}: tensor(s) {', '.join(unexpected[:6])} do not fit the ViT the other tensors describe "
            f"(depth {config.depth}, qkv_bias {config.qkv_bias}, layer_scale {config.layer_scale}, "
            f"classes {config.num_classes})"
        )
    for name, shape in expected.items():
        actual = shapes[name]
        linear_patch = name == "patch_embed.proj.weight" and actual == (shape[0], math.prod(shape[1:]))
        if actual != shape and not linear_patch:
            raise CheckpointError(
                f"{path}: tensor '{name}' has shape {actual}; expected {shape} (embed_dim {config.embed_dim}, "
                f"mlp_hidden {config.mlp_hidden}, {config.num_patches} patches)"
            )


def _require(shapes: Mapping[str, tuple[int, ...]], name: str, path: Path) -> tuple[int, ...]:
    shape = shapes.get(name)
    if shape is None:
        raise CheckpointError(f"{path}: incomplete ViT: missing tensor {name}")
    return shape


def _int(data: Mapping[str, Any], key: str, file: Path) -> int | None:
    value = data.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"{file}: '{key}' is {value!r}; expected an integer")
    return value


def _pair(value: Any, key: str, file: Path) -> tuple[int, int] | None:
    """An int or a 2-list of ints as (height, width)."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        return (value, value)
    if isinstance(value, list | tuple) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (value[0], value[1])
    raise CheckpointError(f"{file}: '{key}' is {value!r}; expected an integer or [height, width]")


def _square(pair: tuple[int, int] | None, key: str, file: Path) -> int | None:
    if pair is None:
        return None
    if pair[0] != pair[1]:
        raise CheckpointError(f"{file}: non-square {key} {pair[0]}×{pair[1]} is not supported")
    return pair[0]
