"""Named model configs and the one place that turns a config into a model, for any family.

Families register themselves where they are defined (`register_family` with their config and model classes, then
`register` for each named config); this module knows none of them. A config's type says its family, so
`build_model` and `state_dict_shapes` work for a family added tomorrow without a change here.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tmconvert.models.errors import ModelConfigError


@dataclass(frozen=True)
class Family:
    name: str  # "vit", "vim", ...
    config_type: type
    model_type: type[nn.Module]  # built as model_type(config, seed=, device=, dtype=)


_FAMILIES: dict[type, Family] = {}
_REGISTRY: dict[str, Any] = {}


def register_family(name: str, config_type: type, model_type: type[nn.Module]) -> None:
    """Declare a family: configs of `config_type` build `model_type`."""
    if any(f.name == name for f in _FAMILIES.values()) or config_type in _FAMILIES:
        raise ModelConfigError(f"model family {name!r} ({config_type.__name__}) is already registered")
    _FAMILIES[config_type] = Family(name, config_type, model_type)


def register(name: str, config: Any) -> None:
    """Add a named config; names are unique and the config type must belong to a registered family."""
    family_of(config)
    if name in _REGISTRY:
        raise ModelConfigError(f"model name {name!r} is already registered")
    _REGISTRY[name] = config


def family_of(config: Any) -> str:
    return _family(config).name


def config_type(family: str) -> type:
    """The config class of a family, e.g. to rebuild a config stored as JSON."""
    for registered in _FAMILIES.values():
        if registered.name == family:
            return registered.config_type
    raise ModelConfigError(f"unknown model family {family!r}; known families: {', '.join(families())}")


def families() -> list[str]:
    return sorted(f.name for f in _FAMILIES.values())


def get_config(name: str) -> Any:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ModelConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def list_models(family: str | None = None) -> list[str]:
    """Registered names, sorted; `family` ("vit", "vim") filters."""
    if family is not None and family not in families():
        raise ModelConfigError(f"unknown model family {family!r}; known families: {', '.join(families())}")
    return sorted(n for n, c in _REGISTRY.items() if family is None or family_of(c) == family)


def build_model(
    name_or_config: Any,
    *,
    seed: int | torch.Generator | None = None,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
    **overrides: Any,
) -> nn.Module:
    """Build the model for a registered name or a config; `overrides` replace config fields (e.g. num_classes=10).

    `device="meta"` builds the key/shape skeleton without allocating or initialising anything.
    """
    config = get_config(name_or_config) if isinstance(name_or_config, str) else name_or_config
    family = _family(config)
    if overrides:
        fields = {f.name for f in dataclasses.fields(config)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ModelConfigError(
                f"unknown {type(config).__name__} field(s) {', '.join(unknown)}; fields: {', '.join(sorted(fields))}"
            )
        config = dataclasses.replace(config, **overrides)
    return family.model_type(config, seed=seed, device=device, dtype=dtype)


def state_dict_shapes(config: Any) -> dict[str, tuple[int, ...]]:
    """The model's key -> shape table in state_dict order, read from a meta-device model (nothing is allocated).

    The only shape table of a family: readers, planners and writers all derive theirs from it."""
    return {k: tuple(v.shape) for k, v in build_model(config, device="meta").state_dict().items()}


def _family(config: Any) -> Family:
    try:
        return _FAMILIES[type(config)]
    except KeyError:
        raise ModelConfigError(f"{type(config).__name__} is not a known model config type") from None
