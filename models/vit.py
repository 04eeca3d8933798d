"""Vision Transformer teacher (timm / DeiT semantics).

The forward is timm-exact (same ops in the same order), the parameter names are timm's, so a timm / DeiT state dict
loads with `strict=True`. `forward_all` returns everything distillation needs from one pass.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from tmconvert.models.errors import ModelConfigError
from tmconvert.models.init import init_on_cpu_, seeded_generator
from tmconvert.models.registry import register, register_family
from tmconvert.models.tokens import TokenLayout, resample_abs_pos_embed


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    """OpenAI CLIP's GELU approximation."""
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"gelu": F.gelu, "quick_gelu": quick_gelu}


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
    global_pool: str = "token"  # timm: "token" reads the cls token, "avg" averages the patch tokens
    fc_norm: bool = False  # timm's avg-pool layout: the final norm is `fc_norm` and applied after pooling
    reg_tokens: int = 0  # DINOv2 registers (`reg_token`, after cls); they never get a position embedding
    pre_norm: bool = False  # CLIP: `norm_pre` (ln_pre) between the embedding and the blocks
    patch_bias: bool = True  # CLIP's patch embedding has no bias
    act: str = "gelu"  # MLP activation: "gelu" (exact erf) or "quick_gelu" (x * sigmoid(1.702 x), OpenAI CLIP)

    def __post_init__(self) -> None:
        if isinstance(self.img_size, int):
            object.__setattr__(self, "img_size", (self.img_size, self.img_size))
        else:
            object.__setattr__(self, "img_size", tuple(self.img_size))
        if self.embed_dim % self.num_heads:
            raise ModelConfigError(f"ViT embed_dim {self.embed_dim} is not divisible by num_heads {self.num_heads}")
        if self.global_pool not in ("token", "avg"):
            raise ModelConfigError(f"ViT global_pool must be 'token' or 'avg', got {self.global_pool!r}")
        if self.global_pool == "token" and not self.class_token:
            raise ModelConfigError("ViT global_pool 'token' needs class_token=True")
        if self.act not in ACTIVATIONS:
            raise ModelConfigError(f"ViT act must be one of {', '.join(ACTIVATIONS)}, got {self.act!r}")
        if self.reg_tokens < 0 or (self.reg_tokens and self.distilled):
            raise ModelConfigError(f"ViT reg_tokens {self.reg_tokens}: need >= 0, and none in a distilled ViT")
        if self.distilled and (not self.class_token or self.no_embed_class or self.global_pool != "token"):
            # timm's distilled model has no other layout (its pos_embed always covers both prefix tokens)
            raise ModelConfigError(
                "a distilled ViT needs class_token=True, no_embed_class=False and global_pool='token'"
            )

    @property
    def grid(self) -> tuple[int, int]:
        return (self.img_size[0] // self.patch_size, self.img_size[1] // self.patch_size)

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: cls, dist, registers."""
        return int(self.class_token) + int(self.distilled) + self.reg_tokens

    @property
    def pos_prefix_tokens(self) -> int:
        """The prefix slots `pos_embed` covers: cls and dist, unless `no_embed_class` (registers never)."""
        return 0 if self.no_embed_class else int(self.class_token) + int(self.distilled)

    @property
    def head_dim(self) -> int:
        return self.embed_dim // self.num_heads

    @property
    def seq_len(self) -> int:
        return self.num_prefix_tokens + self.num_patches

    def token_layout(self, grid: tuple[int, int] | None = None) -> TokenLayout:
        """Where each token sits in the sequence (prefix tokens first, then patches in raster order)."""
        grid = grid or self.grid
        num_patches = grid[0] * grid[1]
        first_reg = int(self.class_token) + int(self.distilled)
        return TokenLayout(
            grid=grid,
            cls_index=0 if self.class_token else None,
            dist_index=1 if self.distilled else None,
            patch_indices=tuple(range(self.num_prefix_tokens, self.num_prefix_tokens + num_patches)),
            reg_indices=tuple(range(first_reg, first_reg + self.reg_tokens)),
        )


@dataclass
class ViTOutput:
    """One teacher pass: logits, final normed tokens, the token stream after every block, optional q/k/v."""

    logits: torch.Tensor  # (B, num_classes), or the pooled features when num_classes == 0
    final_tokens: torch.Tensor  # (B, T, D) after the final norm (before pooling; pre-norm tokens with fc_norm)
    embed_tokens: torch.Tensor  # (B, T, D): the stream entering block 0 (embedding, norm_pre)
    layer_tokens: list[torch.Tensor]  # depth x (B, T, D): output of each block
    mid_tokens: list[torch.Tensor]  # depth x (B, T, D): the stream between each block's attention and MLP
    qkv: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] | None = None  # depth x 3 x (B, heads, T, head_dim)


class PatchEmbed(nn.Module):
    """Non-overlapping conv patchify, (B, C, H, W) -> (B, H/p * W/p, D) in raster order."""

    def __init__(self, cfg: ViTConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        p = cfg.patch_size
        self.proj = nn.Conv2d(
            cfg.in_chans, cfg.embed_dim, kernel_size=p, stride=p, bias=cfg.patch_bias, device=device, dtype=dtype
        )

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        x = self.proj(images)
        grid = (x.shape[-2], x.shape[-1])
        return x.flatten(2).transpose(1, 2), grid


class Attention(nn.Module):
    """timm `Attention`: fused qkv Linear (rows Q | K | V, heads contiguous inside each), SDPA, proj."""

    def __init__(self, cfg: ViTConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.num_heads = cfg.num_heads
        d = cfg.embed_dim
        self.qkv = nn.Linear(d, 3 * d, bias=cfg.qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(d, d, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, t, d)), (q, k, v)


class Mlp(nn.Module):
    def __init__(self, cfg: ViTConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.fc1 = nn.Linear(cfg.embed_dim, cfg.mlp_hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(cfg.mlp_hidden, cfg.embed_dim, device=device, dtype=dtype)
        self.act = ACTIVATIONS[cfg.act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    """Per-channel residual branch scale (DeiT-III); key `gamma` as in timm."""

    def __init__(self, dim: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((dim,), 1e-5, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class Block(nn.Module):
    """Pre-norm transformer block: x + ls1(attn(norm1(x))), then x + ls2(mlp(norm2(x)))."""

    def __init__(self, cfg: ViTConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.norm1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps, **kw)
        self.attn = Attention(cfg, **kw)
        self.ls1 = LayerScale(cfg.embed_dim, **kw) if cfg.layer_scale else nn.Identity()
        self.norm2 = nn.LayerNorm(cfg.embed_dim, eps=cfg.norm_eps, **kw)
        self.mlp = Mlp(cfg, **kw)
        self.ls2 = LayerScale(cfg.embed_dim, **kw) if cfg.layer_scale else nn.Identity()

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        out, _mid, qkv = self.forward_sublayers(x)
        return out, qkv

    def forward_sublayers(
        self, x: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The block's output, the stream after its attention sub-layer (what an interleaved student layer pair
        passes between its two layers), and q/k/v."""
        attn_out, qkv = self.attn(self.norm1(x))
        mid = x + self.ls1(attn_out)
        return mid + self.ls2(self.mlp(self.norm2(mid))), mid, qkv


class VisionTransformer(nn.Module):
    """timm / DeiT ViT with timm's parameter names; distilled variant included (`dist_token`, `head_dist`).

    Images whose patch grid differs from the config's get a resampled position embedding on the fly (timm's
    `dynamic_img_size`).
    """

    def __init__(
        self,
        cfg: ViTConfig,
        *,
        seed: int | torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        kw = {"device": device, "dtype": dtype}
        d = cfg.embed_dim
        self.patch_embed = PatchEmbed(cfg, **kw)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d, **kw)) if cfg.class_token else None
        self.reg_token = nn.Parameter(torch.zeros(1, cfg.reg_tokens, d, **kw)) if cfg.reg_tokens else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.pos_prefix_tokens + cfg.num_patches, d, **kw))
        self.dist_token = nn.Parameter(torch.zeros(1, 1, d, **kw)) if cfg.distilled else None  # timm's key order
        self.norm_pre = nn.LayerNorm(d, eps=cfg.norm_eps, **kw) if cfg.pre_norm else nn.Identity()
        self.blocks = nn.ModuleList(Block(cfg, **kw) for _ in range(cfg.depth))
        self.norm = nn.Identity() if cfg.fc_norm else nn.LayerNorm(d, eps=cfg.norm_eps, **kw)
        self.fc_norm = nn.LayerNorm(d, eps=cfg.norm_eps, **kw) if cfg.fc_norm else nn.Identity()
        self.head = nn.Linear(d, cfg.num_classes, **kw) if cfg.num_classes > 0 else nn.Identity()
        if cfg.distilled:
            self.head_dist = nn.Linear(d, cfg.num_classes, **kw) if cfg.num_classes > 0 else nn.Identity()
        if self.pos_embed.device.type != "meta":
            self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | torch.Generator | None = None) -> None:
        """timm's default init: trunc-normal(0.02) pos/dist embeds and Linear weights, zero Linear biases.

        A teacher is normally loaded from a checkpoint; this only makes a random teacher reproducible.
        """
        gen = seeded_generator(seed)
        init_on_cpu_(self.pos_embed, nn.init.trunc_normal_, gen, std=0.02)
        if self.cls_token is not None:
            init_on_cpu_(self.cls_token, nn.init.normal_, gen, std=1e-6)
        if self.dist_token is not None:
            init_on_cpu_(self.dist_token, nn.init.trunc_normal_, gen, std=0.02)
        if self.reg_token is not None:
            init_on_cpu_(self.reg_token, nn.init.normal_, gen, std=1e-6)
        for module in self.modules():
            if isinstance(module, nn.Linear):
                init_on_cpu_(module.weight, nn.init.trunc_normal_, gen, std=0.02)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.Conv2d):
                init_on_cpu_(module.weight, nn.init.kaiming_uniform_, gen, a=math.sqrt(5))
                if module.bias is not None:
                    bound = 1.0 / math.sqrt(module.weight[0].numel())
                    init_on_cpu_(module.bias, nn.init.uniform_, gen, a=-bound, b=bound)

    def token_layout(self) -> TokenLayout:
        return self.cfg.token_layout()

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        """[cls, (dist), patches] + pos_embed (or patches + pos_embed only, with `no_embed_class`), registers
        inserted after cls without a position (DINOv2's order; timm's for its `no_embed_class` register models),
        then `norm_pre`."""
        x, grid = self.patch_embed(images)
        cfg = self.cfg
        pos_embed = resample_abs_pos_embed(self.pos_embed, grid, cfg.grid, num_prefix_tokens=cfg.pos_prefix_tokens)
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        if cfg.no_embed_class:
            x = torch.cat([*prefix, x + pos_embed], dim=1)
        else:
            x = torch.cat([*prefix, x], dim=1) + pos_embed
        if self.reg_token is not None:
            cls = int(cfg.class_token)
            x = torch.cat([x[:, :cls], self.reg_token.expand(x.shape[0], -1, -1), x[:, cls:]], dim=1)
        return self.norm_pre(x)

    def _head(self, tokens: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        if cfg.distilled:
            return (self.head(tokens[:, 0]) + self.head_dist(tokens[:, 1])) / 2
        pooled = tokens[:, 0] if cfg.global_pool == "token" else tokens[:, cfg.num_prefix_tokens :].mean(dim=1)
        return self.head(self.fc_norm(pooled))

    def forward_all(self, images: torch.Tensor, *, return_qkv: bool = False) -> ViTOutput:
        """One pass returning logits, the final normed tokens, the stream entering the blocks, every block's output
        and mid-block tokens and optionally q/k/v."""
        x = embed_tokens = self._embed(images)
        layer_tokens: list[torch.Tensor] = []
        mid_tokens: list[torch.Tensor] = []
        qkvs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
        for block in self.blocks:
            x, mid, qkv = block.forward_sublayers(x)
            layer_tokens.append(x)
            mid_tokens.append(mid)
            if return_qkv:
                qkvs.append(qkv)
        final_tokens = self.norm(x)
        return ViTOutput(
            logits=self._head(final_tokens),
            final_tokens=final_tokens,
            embed_tokens=embed_tokens,
            layer_tokens=layer_tokens,
            mid_tokens=mid_tokens,
            qkv=qkvs if return_qkv else None,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self._embed(images)
        for block in self.blocks:
            x, _ = block(x)
        return self._head(self.norm(x))


register_family("vit", ViTConfig, VisionTransformer)
for _size, _dims in {"t": (192, 3), "s": (384, 6), "b": (768, 12)}.items():
    _base = ViTConfig(
        embed_dim=_dims[0], num_heads=_dims[1], depth=12, mlp_hidden=4 * _dims[0], patch_size=16, img_size=(224, 224)
    )
    register(f"deit-{_size}", _base)  # timm deit_{tiny,small,base}_patch16_224
    register(f"deit-{_size}-distilled", dataclasses.replace(_base, distilled=True))
    if _size != "t":  # timm deit3_{small,base}_patch16_224: LayerScale, no position for the cls token
        register(f"deit3-{_size}", dataclasses.replace(_base, layer_scale=True, no_embed_class=True))
        # timm vit_{small,base}_patch14_dinov2 (LVD-142M, headless), and the small one with 4 registers
        dinov2 = dataclasses.replace(_base, patch_size=14, img_size=(518, 518), layer_scale=True, num_classes=0)
        register(f"dinov2-{_size}", dinov2)
        if _size == "s":
            register("dinov2-s-reg4", dataclasses.replace(dinov2, reg_tokens=4, no_embed_class=True))
# timm vit_base_patch16_clip_quickgelu_224 (OpenAI CLIP ViT-B/16 image tower, without its projection)
register(
    "clip-b16",
    ViTConfig(
        embed_dim=768,
        num_heads=12,
        depth=12,
        mlp_hidden=3072,
        pre_norm=True,
        patch_bias=False,
        act="quick_gelu",
        norm_eps=1e-5,
        num_classes=0,
    ),
)
# timm vit_base_patch16_gap_224: no class token, average pooling
register(
    "vit-b-gap", ViTConfig(embed_dim=768, num_heads=16, depth=12, mlp_hidden=3072, class_token=False, global_pool="avg")
)
