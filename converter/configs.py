"""Model configs as the converter handles them: a target adapted to its teacher, and the JSON form files keep.

Used by planning (the target of a conversion), distillation (a from-scratch student) and the model-file format
(configs stored in metadata and read back).

A family is a conversion target when its config can adapt itself to a teacher: its config class has a
`for_teacher(img_size=, patch_size=, in_chans=, num_classes=, class_token=)` method returning the config that reads
the teacher's images and predicts its classes (each family knows its own geometry: ViM's stride and cls position,
PlainMamba's stem, VideoMamba's frames). The teacher family (`vit`) has none. `target_families` is derived from the
registry, so a family registered tomorrow with that method is a target without a change here.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from tmconvert.converter.errors import ConfigError
from tmconvert.models import ModelConfigError, ViTConfig, config_type, families, family_of, get_config, list_models


def is_target_family(family: str) -> bool:
    """Whether mappings may convert into this registered family (its config adapts itself to a teacher)."""
    return callable(getattr(config_type(family), "for_teacher", None))


def target_families() -> list[str]:
    """The registered families a conversion can produce, sorted."""
    return [family for family in families() if is_target_family(family)]


def target_base(name: str) -> Any:
    """The registry config of a conversion target (ModelConfigError: unknown name; ConfigError: not a target)."""
    base = get_config(name)
    family = family_of(base)
    if not is_target_family(family):
        targets = ", ".join(n for f in target_families() for n in list_models(f))
        raise ConfigError(f"{name!r} is a {family} model, not a conversion target; targets: {targets}")
    return base


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
    channels and class count follow the teacher, so a 28-px Fashion-MNIST teacher gives a student that reads the same
    images and predicts the same classes. How the family fits its geometry to them is its config's `for_teacher`.
    """
    base = target_base(name)
    size = (img_size, img_size) if img_size is not None else source.img_size
    try:
        return base.for_teacher(
            img_size=size,
            patch_size=patch_size if patch_size is not None else source.patch_size,
            in_chans=source.in_chans,
            num_classes=num_classes if num_classes is not None else source.num_classes,
            class_token=source.class_token,
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
