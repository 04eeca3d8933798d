"""Named model configs (timm-like registry) and the one place that turns a config into a model.

A family is identified by its config type; `build_model` dispatches on it, so adding a family means one entry in
`_FAMILIES` and its `register` calls.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import nn

from tmconvert.converter.errors import ConfigError
from tmconvert.models.vim import VimConfig, VisionMamba
from tmconvert.models.vit import VisionTransformer, ViTConfig

ModelConfig = ViTConfig | VimConfig

# config type -> (family name, model class)
_FAMILIES: dict[type, tuple[str, type[nn.Module]]] = {
    ViTConfig: ("vit", VisionTransformer),
    VimConfig: ("vim", VisionMamba),
}

_REGISTRY: dict[str, ModelConfig] = {}


def register(name: str, config: ModelConfig) -> None:
    """Add a named config; names are unique and the config type must belong to a known family."""
    if type(config) not in _FAMILIES:
        raise ConfigError(f"cannot register {name!r}: {type(config).__name__} is not a known model config type")
    if name in _REGISTRY:
        raise ConfigError(f"model name {name!r} is already registered")
    _REGISTRY[name] = config


def family_of(config: ModelConfig) -> str:
    try:
        return _FAMILIES[type(config)][0]
    except KeyError:
        raise ConfigError(f"{type(config).__name__} is not a known model config type") from None


def get_config(name: str) -> ModelConfig:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise ConfigError(f"unknown model {name!r}; known models: {', '.join(list_models())}") from None


def list_models(family: str | None = None) -> list[str]:
    """Registered names, sorted; `family` ("vit", "vim") filters."""
    families = {f for f, _ in _FAMILIES.values()}
    if family is not None and family not in families:
        raise ConfigError(f"unknown model family {family!r}; known families: {', '.join(sorted(families))}")
    return sorted(n for n, c in _REGISTRY.items() if family is None or family_of(c) == family)


def build_model(
    name_or_config: str | ModelConfig,
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
    family_of(config)
    if overrides:
        fields = {f.name for f in dataclasses.fields(config)}
        unknown = sorted(set(overrides) - fields)
        if unknown:
            raise ConfigError(
                f"unknown {type(config).__name__} field(s) {', '.join(unknown)}; fields: {', '.join(sorted(fields))}"
            )
        config = dataclasses.replace(config, **overrides)
    model_cls = _FAMILIES[type(config)][1]
    return model_cls(config, seed=seed, device=device, dtype=dtype)


def _register_builtins() -> None:
    deit = {
        "t": {"embed_dim": 192, "num_heads": 3},
        "s": {"embed_dim": 384, "num_heads": 6},
        "b": {"embed_dim": 768, "num_heads": 12},
    }
    for size, dims in deit.items():
        base = ViTConfig(depth=12, mlp_hidden=4 * dims["embed_dim"], patch_size=16, img_size=(224, 224), **dims)
        register(f"deit-{size}", base)  # timm deit_{tiny,small,base}_patch16_224
        register(f"deit-{size}-distilled", dataclasses.replace(base, distilled=True))
    for size, dim in {"t": 192, "s": 384, "b": 768}.items():
        # hustvl/Vim vim_{tiny,small,base}_patch16_224_bimambav2_..._midclstok_div2
        register(f"vim-{size}", VimConfig(embed_dim=dim, depth=24, patch_size=16, img_size=(224, 224)))
    for size, dim in {"t": 192, "s": 384}.items():
        # hustvl/Vim vim_{tiny,small}_patch16_stride8_224_...: overlapping patches, 27x27 grid
        stride8 = VimConfig(embed_dim=dim, depth=24, patch_size=16, stride=8, img_size=(224, 224))
        register(f"vim-{size}-stride8", stride8)


_register_builtins()
