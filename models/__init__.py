"""Model zoo: the ViT teacher, the Mamba targets, and the registry of named configs.

Importing the package registers every family (each model module registers itself where it is defined).
"""

from tmconvert.models import plainmamba, videomamba, vim, vit, vmamba  # noqa: F401  (registration)
from tmconvert.models.errors import ModelConfigError
from tmconvert.models.plainmamba import PlainMamba, PlainMambaConfig
from tmconvert.models.registry import (
    build_model,
    config_type,
    families,
    family_of,
    get_config,
    list_models,
    register,
    register_family,
    state_dict_shapes,
)
from tmconvert.models.tokens import TokenLayout, resample_abs_pos_embed
from tmconvert.models.videomamba import VideoMamba, VideoMambaConfig, inflate_image_kernel
from tmconvert.models.vim import MambaOutput, VimConfig, VisionMamba
from tmconvert.models.vit import VisionTransformer, ViTConfig, ViTOutput
from tmconvert.models.vmamba import VMamba, VMambaConfig

__all__ = [
    "MambaOutput",
    "ModelConfigError",
    "PlainMamba",
    "PlainMambaConfig",
    "TokenLayout",
    "VMamba",
    "VMambaConfig",
    "ViTConfig",
    "ViTOutput",
    "VideoMamba",
    "VideoMambaConfig",
    "VimConfig",
    "VisionMamba",
    "VisionTransformer",
    "build_model",
    "config_type",
    "families",
    "family_of",
    "get_config",
    "inflate_image_kernel",
    "list_models",
    "register",
    "register_family",
    "resample_abs_pos_embed",
    "state_dict_shapes",
]
