"""Model zoo: the ViT teacher, the Mamba targets, and the registry of named configs."""

from tmconvert.models.registry import build_model, family_of, get_config, list_models, register
from tmconvert.models.vim import MambaOutput, VimConfig, VisionMamba, state_dict_shapes
from tmconvert.models.vit import TokenLayout, VisionTransformer, ViTConfig, ViTOutput, resample_abs_pos_embed

__all__ = [
    "MambaOutput",
    "TokenLayout",
    "ViTConfig",
    "ViTOutput",
    "VimConfig",
    "VisionMamba",
    "VisionTransformer",
    "build_model",
    "family_of",
    "get_config",
    "list_models",
    "register",
    "resample_abs_pos_embed",
    "state_dict_shapes",
]
