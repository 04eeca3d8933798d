"""Vision Transformer teacher (timm / DeiT semantics)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ViTConfig:
    """Everything needed to rebuild a timm/DeiT Vision Transformer; the checkpoint readers detect it from shapes.

    Names follow timm. `num_classes == 0` means the checkpoint has no classifier head.
    """

    embed_dim: int = 192
    depth: int = 12
    num_heads: int = 3
    mlp_hidden: int = 768
    patch_size: int = 16
    img_size: tuple[int, int] = (224, 224)
    in_chans: int = 3
    num_classes: int = 1000
    class_token: bool = True
    distilled: bool = False  # DeiT: a `dist_token` after the cls token and a `head_dist` classifier
    qkv_bias: bool = True
    layer_scale: bool = False  # DeiT-III / DINOv2: `ls1.gamma`, `ls2.gamma`
    norm_eps: float = 1e-6
    no_embed_class: bool = False  # pos_embed covers patches only (prefix tokens get none)

    @property
    def grid(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_prefix_tokens(self) -> int:
        return int(self.class_token) + int(self.distilled)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads
