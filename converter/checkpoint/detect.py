"""Detecting a checkpoint's `ViTConfig` from tensor shapes (never from tensor data, never from a download).

Shapes settle width, depth, MLP width, patch size, tokens (class, distillation, registers), LayerScale, qkv bias,
pre-norm and patch bias (CLIP), classes and pooling (`fc_norm` present: timm's average-pool layout; no class token:
average pooling). They cannot settle some things, so a `config.json` beside the weights (Hugging Face or timm hub
layout) is used when present:
- attention heads: else the caller's `num_heads`, else head_dim 64 (timm/DeiT/ViT/CLIP convention), else an error;
- the grid of a non-square image: else pos_embed's patch slots are assumed to form a square grid;
- norm eps and the MLP activation: else what the upstream code of the layout uses (`_upstream_defaults`).
Every assumption made is returned as a note, so `inspect` can show it. Tensors may be stored in another shape than
timm's if it is the same data viewed differently (`stored_as`); the reader then views them in timm's.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tmconvert.converter.checkpoint.errors import CheckpointError
from tmconvert.converter.checkpoint.naming import PLAIN_VIT
from tmconvert.models import ModelConfigError, ViTConfig, state_dict_shapes
from tmconvert.models.vit import ACTIVATIONS

DEFAULT_HEAD_DIM = 64
# transformers model types read from config.json ('clip' through its `vision_config`).
HF_MODEL_TYPES = ("vit", "deit", "dinov2", "dinov2_with_registers", "clip_vision_model", "clip")


@dataclass(frozen=True)
class ConfigHints:
    """What a config.json says about the model (None where it says nothing)."""

    file: Path
    kind: str  # 'hf' (a transformers config) or 'timm' (hub config with 'architecture')
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    mlp_hidden: int | None = None
    img_size: tuple[int, int] | None = None
    patch_size: int | None = None
    in_chans: int | None = None
    qkv_bias: bool | None = None
    norm_eps: float | None = None
    act: str | None = None
    reg_tokens: int | None = None


@dataclass(frozen=True)
class Detection:
    config: ViTConfig
    notes: tuple[str, ...]  # assumptions the shapes and config files could not settle
    layout: str  # what was recognised, e.g. 'dinov2-reg' (`layout_name`)


def read_config_hints(file: Path) -> ConfigHints | None:
    """Parse a config.json; None when it describes something other than a ViT (it is then not ours to judge).

    Every value read is checked (type, range, finiteness): a value that is there but wrong is an error naming the
    file and key, never replaced by a default."""
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except RecursionError:
        raise CheckpointError(f"{file}: unreadable config file: JSON nested too deeply") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{file}: unreadable config file (expected JSON): {exc}") from exc
    if not isinstance(data, dict):
        return None
    model_type = data.get("model_type")
    if model_type == "clip":  # a whole CLIPModel: the image tower's settings are its vision_config
        fields = _Fields(data, file).section("vision_config")
    elif model_type in HF_MODEL_TYPES or (model_type is None and "hidden_size" in data):
        fields = _Fields(data, file)
    else:
        return _timm_hints(data, file)  # a timm hub config, or not ours to judge
    if fields.flag("use_swiglu_ffn"):
        raise CheckpointError(f"{file}: use_swiglu_ffn (a SwiGLU MLP) is not supported: {PLAIN_VIT}")
    embed_dim = fields.integer("hidden_size")
    mlp_hidden = fields.integer("intermediate_size")
    ratio = fields.number("mlp_ratio")  # DINOv2 gives the MLP width as a ratio (transformers: int(hidden * ratio))
    if mlp_hidden is None and embed_dim is not None and ratio is not None:
        mlp_hidden = int(embed_dim * ratio)
    return ConfigHints(
        file=file,
        kind="hf",
        embed_dim=embed_dim,
        depth=fields.integer("num_hidden_layers"),
        num_heads=fields.integer("num_attention_heads"),
        mlp_hidden=mlp_hidden,
        img_size=fields.pair("image_size"),
        patch_size=fields.square("patch_size"),
        in_chans=fields.integer("num_channels"),
        qkv_bias=fields.flag("qkv_bias"),
        norm_eps=fields.eps("layer_norm_eps"),
        act=fields.activation("hidden_act"),
        reg_tokens=fields.integer("num_register_tokens", minimum=0),
    )


def _timm_hints(data: dict[str, Any], file: Path) -> ConfigHints | None:
    """A timm hub config (`architecture`, `model_args`, `pretrained_cfg.input_size`); None for anything else."""
    architecture = data.get("architecture")
    if not isinstance(architecture, str):
        return None
    top = _Fields(data, file)
    args = top.section("model_args")
    img_size = args.pair("img_size")
    if img_size is None:
        input_size = top.section("pretrained_cfg").triple("input_size")  # (channels, height, width)
        img_size = input_size[1:] if input_size is not None else None
    act = args.activation("act_layer")
    if act is None and "quickgelu" in architecture:  # timm's CLIP models for OpenAI weights, e.g. *_clip_quickgelu_224
        act = "quick_gelu"
    return ConfigHints(
        file=file,
        kind="timm",
        embed_dim=args.integer("embed_dim"),
        depth=args.integer("depth"),
        num_heads=args.integer("num_heads"),
        img_size=img_size,
        patch_size=args.square("patch_size"),
        in_chans=args.integer("in_chans"),
        act=act,
    )


class _Fields:
    """One JSON object of a config file, read key by key. A key that is absent (or null) reads as None; a value that
    is there but not what the key means (a list for an int, 0 heads, a string or NaN eps) is a one-line error naming
    the file and the key, so a broken config.json is never silently replaced by defaults."""

    def __init__(self, data: Mapping[str, Any], file: Path, prefix: str = ""):
        self._data, self._file, self._prefix = data, file, prefix

    def _get(self, key: str) -> Any:
        return self._data.get(key)

    def _refuse(self, key: str, value: Any, expected: str) -> CheckpointError:
        return CheckpointError(f"{self._file}: '{self._prefix}{key}' is {value!r}; expected {expected}")

    def integer(self, key: str, *, minimum: int = 1) -> int | None:
        value = self._get(key)
        if value is not None and not _is_int(value, minimum):
            raise self._refuse(key, value, "a positive integer" if minimum == 1 else f"an integer >= {minimum}")
        return value

    def number(self, key: str) -> float | None:
        """A finite positive number."""
        value = self._get(key)
        if value is not None and not (_is_number(value) and value > 0):
            raise self._refuse(key, value, "a finite positive number")
        return None if value is None else float(value)

    def eps(self, key: str) -> float | None:
        """A norm epsilon: finite, positive and below 1."""
        value = self._get(key)
        if value is not None and not (_is_number(value) and 0 < value < 1):
            raise self._refuse(key, value, "a finite number between 0 and 1 (a norm epsilon)")
        return None if value is None else float(value)

    def flag(self, key: str) -> bool | None:
        value = self._get(key)
        if value is not None and not isinstance(value, bool):
            raise self._refuse(key, value, "true or false")
        return value

    def activation(self, key: str) -> str | None:
        value = self._get(key)
        if value is not None and (not isinstance(value, str) or value not in ACTIVATIONS):
            raise CheckpointError(
                f"{self._file}: {self._prefix}{key} {value!r} is not supported: tmconvert's ViT has "
                f"{', '.join(map(repr, ACTIVATIONS))}"
            )
        return value

    def pair(self, key: str) -> tuple[int, int] | None:
        """A positive int or a 2-list of them, as (height, width)."""
        value = self._get(key)
        if value is None:
            return None
        if _is_int(value, 1):
            return (value, value)
        if isinstance(value, list) and len(value) == 2 and all(_is_int(v, 1) for v in value):
            return (value[0], value[1])
        raise self._refuse(key, value, "a positive integer or [height, width]")

    def square(self, key: str) -> int | None:
        pair = self.pair(key)
        if pair is not None and pair[0] != pair[1]:
            raise CheckpointError(f"{self._file}: non-square {self._prefix}{key} {pair[0]}×{pair[1]} is not supported")
        return None if pair is None else pair[0]

    def triple(self, key: str) -> tuple[int, int, int] | None:
        """[channels, height, width] of positive ints (timm's `input_size`)."""
        value = self._get(key)
        if value is None:
            return None
        if not (isinstance(value, list) and len(value) == 3 and all(_is_int(v, 1) for v in value)):
            raise self._refuse(key, value, "[channels, height, width] of positive integers")
        return (value[0], value[1], value[2])

    def section(self, key: str) -> _Fields:
        """A nested object (empty when absent)."""
        value = self._get(key)
        if value is not None and not isinstance(value, dict):
            raise self._refuse(key, value, "an object")
        return _Fields(value or {}, self._file, f"{self._prefix}{key}.")


def _is_int(value: Any, minimum: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


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
    if _packed_swiglu(shapes, block_ids):
        fc2 = shapes["blocks.0.mlp.fc2.weight"]
        raise CheckpointError(
            f"{path}: gated (SwiGLU) MLP: blocks.0.mlp.fc1.weight {fc1} is twice as wide as blocks.0.mlp.fc2.weight "
            f"{fc2} takes; it is not supported: {PLAIN_VIT}"
        )
    class_token = "cls_token" in shapes
    distilled = "dist_token" in shapes
    if distilled and not class_token:  # checked before the grid, whose prefix-token count would be wrong
        raise CheckpointError(f"{path}: has 'dist_token' but no 'cls_token'; a distilled ViT needs both")
    reg = shapes.get("reg_token")  # (1, R, D); registers never get a position, so the grid does not count them
    reg_tokens = 0 if reg is None else reg[-2] if len(reg) > 1 else 1
    heads = _num_heads(embed_dim, hints, num_heads, notes, path)
    img_size, no_embed_class = _grid(shapes, patch_size, int(class_token) + int(distilled), hints, notes, path)
    head = shapes.get("head.weight")
    if head is not None and len(head) == 2 and head[1] == 2 * embed_dim:
        raise CheckpointError(
            f"{path}: the classifier head.weight {head} reads 2×embed_dim features (Dinov2ForImageClassification's "
            "[class token, mean patch token]), which is not supported: a ViT head reads one token or the mean; "
            "read the backbone (Dinov2Model) without it"
        )
    fc_norm = "fc_norm.weight" in shapes  # timm: average pooling with the final norm after it
    try:
        structure = ViTConfig(
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
            no_embed_class=no_embed_class,
            global_pool="token" if class_token and not fc_norm else "avg",
            fc_norm=fc_norm,
            reg_tokens=reg_tokens,
            pre_norm="norm_pre.weight" in shapes,
            patch_bias="patch_embed.proj.bias" in shapes,
        )
        layout = layout_name(structure)
        norm_eps, act = _norm_eps_and_act(naming, layout, hints, notes)
        config = dataclasses.replace(structure, norm_eps=norm_eps, act=act)
    except ModelConfigError as exc:
        raise CheckpointError(f"{path}: tensors describe an unsupported ViT: {exc}") from exc
    if hints is not None:
        _check_hints(config, hints)
    _check_shapes(shapes, config, path)
    return Detection(config, tuple(notes), layout)


def _packed_swiglu(shapes: Mapping[str, tuple[int, ...]], block_ids: set[int]) -> bool:
    """timm's packed SwiGLU (DINOv2 ViT-g, EVA-02 Ti/S): every block's fc1 is twice as wide as its fc2 takes."""
    pairs = [(shapes.get(f"blocks.{i}.mlp.fc1.weight"), shapes.get(f"blocks.{i}.mlp.fc2.weight")) for i in block_ids]
    return all(fc1 and fc2 and len(fc1) == len(fc2) == 2 and fc1[0] == 2 * fc2[1] for fc1, fc2 in pairs)


def layout_name(config: ViTConfig) -> str:
    """A short name for the kind of ViT a config describes (`Checkpoint.layout`, shown by `inspect`)."""
    if config.pre_norm:
        return "clip"  # OpenAI CLIP / OpenCLIP image tower: ln_pre, no patch bias
    if config.reg_tokens:
        return "dinov2-reg"
    if config.layer_scale:
        return "deit3" if config.no_embed_class else "dinov2"
    if config.distilled:
        return "deit-distilled"
    return "vit-avgpool" if config.global_pool == "avg" else "vit"


def _upstream_defaults(naming: str, layout: str) -> tuple[float, str, str]:
    """(norm eps, MLP activation, whose choice) where neither tensors nor config.json say: the upstream code's."""
    if naming == "openai-clip":
        return 1e-5, "quick_gelu", "OpenAI CLIP's"
    if naming == "hf-clip":
        return 1e-5, "quick_gelu", "transformers' CLIPVisionConfig default"
    if naming == "timm":
        return (1e-5, "gelu", "timm's CLIP models'") if layout == "clip" else (1e-6, "gelu", "timm's")
    if layout.startswith("dinov2"):
        return 1e-6, "gelu", "transformers' Dinov2Config default"
    return 1e-12, "gelu", "the Hugging Face default"


def _norm_eps_and_act(naming: str, layout: str, hints: ConfigHints | None, notes: list[str]) -> tuple[float, str]:
    """Norm eps and activation: config.json's, else the upstream defaults (noted, except timm's plain ViT eps)."""
    default_eps, default_act, whose = _upstream_defaults(naming, layout)
    norm_eps = hints.norm_eps if hints is not None and hints.norm_eps is not None else None
    if norm_eps is None:
        norm_eps = default_eps
        if naming != "timm" or layout == "clip":
            notes.append(f"norm eps {norm_eps:g}: {whose} (no config.json gives layer_norm_eps)")
    act = hints.act if hints is not None and hints.act is not None else None
    if act is None:
        act = default_act
        if layout == "clip":  # the one layout whose checkpoints were trained with either activation
            notes.append(
                f"act {act}: {whose} (shapes cannot tell GELU from QuickGELU and no config.json says; "
                "OpenAI weights use quick_gelu, most OpenCLIP-trained ones gelu)"
            )
    return norm_eps, act


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
    if len(pos) not in (2, 3) or pos[:-2] not in ((), (1,)):  # CLIP stores it as (positions, embed_dim)
        raise CheckpointError(f"{path}: pos_embed has shape {pos}; expected (1, positions, embed_dim)")
    positions = pos[-2]
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
        "reg_tokens": hints.reg_tokens,
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
        if not stored_as(actual, shape):
            raise CheckpointError(
                f"{path}: tensor '{name}' has shape {actual}; expected {shape} (embed_dim {config.embed_dim}, "
                f"mlp_hidden {config.mlp_hidden}, {config.num_patches} patches)"
            )


def stored_as(stored: tuple[int, ...], canonical: tuple[int, ...]) -> bool:
    """Whether a tensor of shape `stored` is the canonical tensor's data viewed in another shape: without leading
    1-dims (CLIP's (D,) class embedding and (T, D) position embedding) or with its trailing dims flattened (timm's
    old linear patchify, (D, C·p·p)). The reader then views it in the canonical shape."""
    core, target = _without_leading_ones(stored), _without_leading_ones(canonical)
    flattened = len(core) == 2 and len(target) > 2 and core == (target[0], math.prod(target[1:]))
    return core == target or flattened


def _without_leading_ones(shape: tuple[int, ...]) -> tuple[int, ...]:
    while shape and shape[0] == 1:
        shape = shape[1:]
    return shape


def _require(shapes: Mapping[str, tuple[int, ...]], name: str, path: Path) -> tuple[int, ...]:
    shape = shapes.get(name)
    if shape is None:
        raise CheckpointError(f"{path}: incomplete ViT: missing tensor {name}")
    return shape
