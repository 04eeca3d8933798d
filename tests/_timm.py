"""timm as a test oracle (dev dependency only).

PyPI torchvision cannot import beside the CPU torch (`operator torchvision::nms does not exist`); timm imports
torchvision, so its fake-kernel registration module is stubbed out first (verified to be enough for timm's ViTs).
"""

from __future__ import annotations

import sys
import types
from functools import partial
from types import ModuleType

import torch

from tmconvert.models.vit import ViTConfig


def import_timm() -> ModuleType:
    """`import timm`, working around the CPU-torch / PyPI-torchvision clash."""
    sys.modules.setdefault("torchvision._meta_registrations", types.ModuleType("torchvision._meta_registrations"))
    import timm

    return timm


def timm_vit(config: ViTConfig, *, seed: int = 0) -> torch.nn.Module:
    """A randomly initialised timm VisionTransformer (or DeiT distilled model) with exactly `config`'s layout."""
    import_timm()
    from timm.models.deit import VisionTransformerDistilled
    from timm.models.vision_transformer import VisionTransformer

    mlp_ratio = config.mlp_hidden / config.embed_dim
    if int(config.embed_dim * mlp_ratio) != config.mlp_hidden:  # timm's Mlp width is int(embed_dim * mlp_ratio)
        raise ValueError(f"mlp_hidden {config.mlp_hidden} is not expressible as a timm mlp_ratio")
    if config.reg_tokens and not config.no_embed_class:  # timm's pos_embed would cover the registers
        raise ValueError("timm has no layout with registers and a position embedding over the prefix tokens")
    if config.pre_norm == config.patch_bias:  # timm drops the patch bias exactly when it adds norm_pre (CLIP)
        raise ValueError("timm's patch embedding has a bias exactly when there is no pre-norm")
    kwargs = dict(
        img_size=config.img_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        num_classes=config.num_classes,
        embed_dim=config.embed_dim,
        depth=config.depth,
        num_heads=config.num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=config.qkv_bias,
        init_values=1e-5 if config.layer_scale else None,
        class_token=config.class_token,
        no_embed_class=config.no_embed_class,
        global_pool=config.global_pool,
        fc_norm=config.fc_norm,
        norm_layer=partial(torch.nn.LayerNorm, eps=config.norm_eps),
        act_layer=config.act,
        **({"reg_tokens": config.reg_tokens} if config.reg_tokens else {}),
        **({"pre_norm": True} if config.pre_norm else {}),
    )
    torch.manual_seed(seed)
    model = VisionTransformerDistilled(**kwargs) if config.distilled else VisionTransformer(**kwargs)
    with torch.no_grad():  # timm zero-inits some tensors (heads, biases); randomise so every tensor is distinguishable
        for param in model.parameters():
            param.normal_(0.0, 0.02)
    return model.eval()
