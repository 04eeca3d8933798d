"""Model configs as the converter handles them: a target adapted to its teacher, and the JSON form files keep.

Used by planning (the target of a conversion), distillation (a from-scratch student) and the model-file format
(configs stored in metadata and read back).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tmconvert.converter.errors import ConfigError
from tmconvert.models import ModelConfigError, ViTConfig, config_type, family_of, get_config

TEACHER_FAMILIES = ("vit",)


def derive_target_config(
    name: str,
    source: ViTConfig,
    *,
    img_size: int | None = None,
    patch_size: int | None = None,
    num_classes: int | None = None,
) -> Any:
    """The registry config of `name` with the input geometry and classes of the teacher, unless overridden.

    Widths, depth and SSM sizes come from the registry (that is what "vim-t" means); image size, patch size, input
    channels and class count follow the teacher, so a 28-px Fashion-MNIST teacher gives a ViM that reads the same
    images and predicts the same classes. A registry stride (overlapping patches) keeps its ratio to the patch. A
    teacher without a class token (average pooling) gives a student without one, pooling by mean as upstream ViM
    can (`if_cls_token=False`, `final_pool_type='mean'`).
    """
    base = get_config(name)
    if family_of(base) in TEACHER_FAMILIES:
        raise ConfigError(f"{name!r} is a {family_of(base)} model, not a conversion target; targets: vim-t, vim-s, ...")
    patch = patch_size if patch_size is not None else source.patch_size
    stride = None if base.stride is None else max(1, base.stride * patch // base.patch_size)
    classes = num_classes if num_classes is not None else source.num_classes
    size = (img_size, img_size) if img_size is not None else source.img_size
    pooling = {} if source.class_token else {"cls_position": "none"}
    try:
        return dataclasses.replace(
            base,
            img_size=size,
            patch_size=patch,
            stride=stride,
            in_chans=source.in_chans,
            num_classes=classes,
            **pooling,
        )
    except ModelConfigError as exc:
        raise ConfigError(f"target {name}: {exc}") from None


def config_json(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON values (tuples -> lists)."""
    return json_safe(dataclasses.asdict(cfg))


def config_from_json(family: str, data: dict[str, Any]) -> Any:
    """The config a file stored with `config_json` (ModelConfigError for unknown fields or values)."""
    cls = config_type(family)
    try:
        return cls(**data)
    except TypeError as exc:
        raise ModelConfigError(f"{cls.__name__}: {exc}") from None


def json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value
