"""Vision Mamba (hustvl/Vim, bimamba v2) target model.

Parameter names and shapes are exactly upstream's, so an upstream checkpoint loads with `strict=True` and ours loads
there. The forward is upstream's fast path: residual add in fp32 -> RMSNorm -> bidirectional mixer, cls token in the
middle. Both scan directions go through `tmconvert.kernels` (the backward one with `reverse=True` instead of
flipping the sequence, which is the same maths).

Distillation hooks: `forward_all` returns the residual stream after each layer and, per layer and direction, the
branch output before the directions are averaged, in that direction's scan order; `scan_orders()` says which token
each scan step visits. Any multi-directional family (VMamba's four cross-scans, PlainMamba's zig-zags) fits the same
contract: a dict of named permutations plus per-direction outputs in scan order.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tmconvert.kernels import causal_conv1d, selective_scan
from tmconvert.models.errors import ModelConfigError
from tmconvert.models.init import init_on_cpu_, seeded_generator
from tmconvert.models.registry import register, register_family, state_dict_shapes
from tmconvert.models.tokens import TokenLayout

CLS_POSITIONS = ("middle", "front", "none")


@dataclass(frozen=True)
class VimConfig:
    """Shape and init hyper-parameters of a Vision Mamba; defaults are Vim-T (upstream constructor defaults)."""

    upstream_container: ClassVar[str] = "model"  # hustvl/Vim reads `checkpoint['model']` (`--format upstream`)

    embed_dim: int = 192
    depth: int = 24
    d_state: int = 16
    expand: int = 2
    d_conv: int = 4
    dt_rank: int | None = None  # None: ceil(embed_dim / 16), upstream's "auto"
    patch_size: int = 16
    stride: int | None = None  # None: equal to patch_size (non-overlapping patches)
    img_size: tuple[int, int] = (224, 224)
    in_chans: int = 3
    num_classes: int = 1000
    norm_eps: float = 1e-5
    residual_in_fp32: bool = True
    cls_position: str = "middle"  # "middle" (P // 2), "front" (index 0) or "none" (mean pooling, no cls token)
    divide_out: bool = True  # average the two directions ("/2"); False sums them
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        if isinstance(self.img_size, int):
            object.__setattr__(self, "img_size", (self.img_size, self.img_size))
        else:
            object.__setattr__(self, "img_size", tuple(self.img_size))
        if self.cls_position not in CLS_POSITIONS:
            raise ModelConfigError(f"VimConfig.cls_position must be one of {CLS_POSITIONS}, got {self.cls_position!r}")
        for name in ("embed_dim", "depth", "d_state", "expand", "d_conv", "patch_size", "in_chans"):
            if getattr(self, name) <= 0:
                raise ModelConfigError(f"VimConfig.{name} must be positive, got {getattr(self, name)}")
        if self.dt_rank is not None and self.dt_rank <= 0:
            raise ModelConfigError(f"VimConfig.dt_rank must be positive or None, got {self.dt_rank}")
        if self.num_classes < 0:
            raise ModelConfigError(f"VimConfig.num_classes must be >= 0, got {self.num_classes}")
        if min(self.img_size) < self.patch_size or self.resolved_stride <= 0:
            raise ModelConfigError(
                f"VimConfig: image {self.img_size} with patch {self.patch_size} / stride {self.stride} has no patch"
            )
        if not 0.0 < self.dt_min <= self.dt_max:
            raise ModelConfigError(f"VimConfig: need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.embed_dim / 16)

    @property
    def resolved_stride(self) -> int:
        return self.stride if self.stride is not None else self.patch_size

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def grid(self) -> tuple[int, int]:
        return _grid(self.img_size, self.patch_size, self.resolved_stride)

    @property
    def num_patches(self) -> int:
        return _num_patches(self.img_size, self.patch_size, self.resolved_stride)

    @property
    def seq_len(self) -> int:
        return self.num_patches + (0 if self.cls_position == "none" else 1)

    @property
    def cls_index(self) -> int | None:
        """Sequence index of the cls token: P // 2 in the middle (98 for 14x14), 0 at the front, None without."""
        return {"middle": self.num_patches // 2, "front": 0, "none": None}[self.cls_position]

    def token_layout(self) -> TokenLayout:
        cls_index = self.cls_index
        patch_indices = tuple(p if cls_index is None or p < cls_index else p + 1 for p in range(self.num_patches))
        return TokenLayout(grid=self.grid, cls_index=cls_index, patch_indices=patch_indices)

    def for_teacher(
        self, *, img_size: tuple[int, int], patch_size: int, in_chans: int, num_classes: int, class_token: bool
    ) -> VimConfig:
        """This ViM reading a teacher's images and predicting its classes (the converter's target adaptation).

        A stride (overlapping patches) keeps its ratio to the patch; a teacher without a class token gives a ViM
        without one, pooling by mean as upstream can (`if_cls_token=False`, `final_pool_type='mean'`).
        """
        stride = None if self.stride is None else max(1, self.stride * patch_size // self.patch_size)
        pooling = {} if class_token else {"cls_position": "none"}
        return replace(
            self,
            img_size=img_size,
            patch_size=patch_size,
            stride=stride,
            in_chans=in_chans,
            num_classes=num_classes,
            **pooling,
        )

    @classmethod
    def from_state_dict_shapes(
        cls,
        shapes: Mapping[str, Sequence[int]],
        *,
        img_size: int | tuple[int, int] | None = None,
        cls_position: str | None = None,
        **fixed: object,
    ) -> VimConfig:
        """Detect the config of an upstream-layout Vim state dict from its tensor shapes.

        Shapes cannot tell the image size from the stride, nor a middle from a front cls token: by default the
        grid is square with stride == patch size and a cls token sits in the middle (every released Vim);
        pass `img_size` (the stride then follows from the grid) or `cls_position` to override. Other fields
        that shapes cannot show (norm_eps, init knobs) can be given in `fixed`. Every key and shape is checked
        against the detected config; a mismatch raises ModelConfigError naming the tensors.
        """
        shapes = {k: tuple(v) for k, v in shapes.items()}
        required = ("patch_embed.proj.weight", "pos_embed", "layers.0.mixer.in_proj.weight", "layers.0.mixer.A_log")
        missing = [k for k in required if k not in shapes]
        if missing:
            raise ModelConfigError(f"not a Vim state dict: missing {', '.join(missing)}")
        embed_dim, in_chans, patch, _ = shapes["patch_embed.proj.weight"]
        d_inner = shapes["layers.0.mixer.in_proj.weight"][0] // 2
        if d_inner % embed_dim:
            raise ModelConfigError(f"Vim in_proj d_inner {d_inner} is not a multiple of embed_dim {embed_dim}")
        d_state = shapes["layers.0.mixer.A_log"][1]
        has_cls = "cls_token" in shapes
        if cls_position is None:
            cls_position = "middle" if has_cls else "none"
        if (cls_position != "none") != has_cls:
            raise ModelConfigError(
                f"cls_position {cls_position!r} contradicts the state dict (has cls_token: {has_cls})"
            )
        num_patches = shapes["pos_embed"][1] - int(has_cls)
        if img_size is None:
            side = math.isqrt(num_patches)
            if side * side != num_patches:
                raise ModelConfigError(f"Vim pos_embed has {num_patches} patches, not a square grid; pass img_size")
            img_size, stride = side * patch, patch
        else:
            img_size = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
            strides = [s for s in range(patch, 0, -1) if _num_patches(img_size, patch, s) == num_patches]
            if not strides:
                raise ModelConfigError(
                    f"no stride <= {patch} gives {num_patches} patches of {patch} px on {img_size} images"
                )
            stride = strides[0]
        dt_rank = shapes.get("layers.0.mixer.dt_proj.weight", (0, None))[1]
        depth = sum(1 for k in shapes if k.startswith("layers.") and k.endswith(".norm.weight"))
        cfg = cls(
            **{
                "embed_dim": embed_dim,
                "depth": depth,
                "d_state": d_state,
                "expand": d_inner // embed_dim,
                "d_conv": shapes.get("layers.0.mixer.conv1d.weight", (0, 0, 4))[-1],
                "dt_rank": None if dt_rank == math.ceil(embed_dim / 16) else dt_rank,  # None: upstream "auto"
                "patch_size": patch,
                "stride": None if stride == patch else stride,
                "img_size": img_size,
                "in_chans": in_chans,
                "num_classes": shapes["head.weight"][0] if "head.weight" in shapes else 0,
                "cls_position": cls_position,
                **fixed,
            }
        )
        expected = state_dict_shapes(cfg)
        problems = [f"missing {k} {s}" for k, s in expected.items() if k not in shapes]
        problems += [f"unexpected {k}" for k in shapes if k not in expected]
        problems += [f"{k} is {shapes[k]}, expected {s}" for k, s in expected.items() if k in shapes and shapes[k] != s]
        if problems:
            shown = "; ".join(problems[:6]) + (f"; ... ({len(problems)} problems)" if len(problems) > 6 else "")
            raise ModelConfigError(f"state dict does not fit a bimamba-v2 Vim layout: {shown}")
        return cfg


def _grid(img_size: tuple[int, int], patch: int, stride: int) -> tuple[int, int]:
    """Patch grid of a conv patchify without padding (upstream's PatchEmbed)."""
    return ((img_size[0] - patch) // stride + 1, (img_size[1] - patch) // stride + 1)


def _num_patches(img_size: tuple[int, int], patch: int, stride: int) -> int:
    rows, cols = _grid(img_size, patch, stride)
    return rows * cols


@dataclass
class MambaOutput:
    """One pass of a Mamba vision model, everything a distiller reads.

    `directions[layer][name]` is that direction's branch output before the directions are combined, D-skip included
    (gated where the family gates each direction, as ViM and VideoMamba do; PlainMamba gates their sum, so its
    directions are not), with its time axis in the direction's scan order: step j visits `scan_orders()[name][j]`.
    """

    logits: torch.Tensor  # (B, num_classes), or the pooled features when num_classes == 0
    final_tokens: torch.Tensor  # (B, L, D) after the final norm
    layer_tokens: list[torch.Tensor]  # depth x (B, L, D): residual stream after each layer (fp32 if residual_in_fp32)
    directions: list[dict[str, torch.Tensor]] | None = None  # depth x {name: (B, L, E)} in scan order


@dataclass(frozen=True)
class ScanDirection:
    """One scan of a bidirectional mixer: its name, its parameter-name suffix and whether it runs right to left."""

    name: str
    param_suffix: str
    reverse: bool

    def param_name(self, role: str) -> str:
        # upstream spells the backward A as `A_b_log`, every other copy as `<role>_b`
        return f"A{self.param_suffix}_log" if role == "A_log" else f"{role}{self.param_suffix}"

    def order(self, seq_len: int, device: torch.device | str | None = None) -> torch.Tensor:
        steps = torch.arange(seq_len, device=device)
        return steps.flip(0) if self.reverse else steps


VIM_DIRECTIONS = (ScanDirection("fwd", "", reverse=False), ScanDirection("bwd", "_b", reverse=True))
# A_log / D of every direction: upstream trains them without weight decay
_NO_DECAY_LEAVES = frozenset(d.param_name(role) for d in VIM_DIRECTIONS for role in ("A_log", "D"))


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * weight, computed in at least fp32, no bias (mamba-ssm `RMSNorm`)."""

    def __init__(
        self, dim: int, eps: float, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        compute = torch.promote_types(x.dtype, torch.float32)
        xf = x.to(compute)
        out = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + self.eps) * self.weight.to(compute)
        return out.to(self.weight.dtype)


class DropPath(nn.Module):
    """Stochastic depth per sample (timm semantics: kept samples are rescaled by 1 / keep_prob)."""

    def __init__(self, rate: float):
        super().__init__()
        self.rate = rate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.rate == 0.0 or not self.training:
            return x
        keep = 1.0 - self.rate
        mask = x.new_empty((x.shape[0],) + (1,) * (x.dim() - 1)).bernoulli_(keep)
        return x * mask / keep


class BiMambaMixer(nn.Module):
    """Vim's bimamba v2 mixer: shared in_proj / out_proj, one conv + x_proj + dt_proj + A + D per direction."""

    def __init__(
        self,
        cfg: VimConfig,
        directions: Sequence[ScanDirection] = VIM_DIRECTIONS,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        d, e, n, r, k = cfg.embed_dim, cfg.d_inner, cfg.d_state, cfg.resolved_dt_rank, cfg.d_conv
        self.d_inner, self.d_state, self.dt_rank = e, n, r
        self.divide_out = cfg.divide_out
        self.directions = tuple(directions)
        # Registration order reproduces upstream's state_dict order (own parameters first, then submodules).
        for direction in self.directions:
            setattr(self, direction.param_name("A_log"), nn.Parameter(torch.empty(e, n, **kw)))
            setattr(self, direction.param_name("D"), nn.Parameter(torch.empty(e, **kw)))
        self.in_proj = nn.Linear(d, 2 * e, bias=False, **kw)
        for direction in self.directions:
            conv = nn.Conv1d(e, e, kernel_size=k, groups=e, padding=k - 1, bias=True, **kw)
            setattr(self, direction.param_name("conv1d"), conv)
            setattr(self, direction.param_name("x_proj"), nn.Linear(e, r + 2 * n, bias=False, **kw))
            setattr(self, direction.param_name("dt_proj"), nn.Linear(r, e, bias=True, **kw))
        self.out_proj = nn.Linear(e, d, bias=False, **kw)

    def _branch(self, direction: ScanDirection, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """One direction on channel-first x, z (B, E, L); returns the gated scan output (B, E, L) in token order."""
        conv: nn.Conv1d = getattr(self, direction.param_name("conv1d"))
        x_proj: nn.Linear = getattr(self, direction.param_name("x_proj"))
        dt_proj: nn.Linear = getattr(self, direction.param_name("dt_proj"))
        a_log: torch.Tensor = getattr(self, direction.param_name("A_log"))
        d_skip: torch.Tensor = getattr(self, direction.param_name("D"))
        fp = torch.promote_types(a_log.dtype, torch.float32)
        u = causal_conv1d(x, conv.weight, conv.bias, activation="silu", reverse=direction.reverse)
        x_dbl = F.linear(u.transpose(1, 2), x_proj.weight)  # (B, L, R + 2N)
        dt, b_mat, c_mat = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = torch.matmul(dt_proj.weight, dt.transpose(1, 2))  # (B, E, L); the bias goes in as delta_bias
        return selective_scan(
            u,
            delta,
            -torch.exp(a_log.to(fp)),
            b_mat.transpose(1, 2).contiguous(),
            c_mat.transpose(1, 2).contiguous(),
            D=d_skip.to(fp),
            z=z,
            delta_bias=dt_proj.bias.to(fp),
            delta_softplus=True,
            reverse=direction.reverse,
        )

    def _mix(self, hidden: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The directions combined (B, E, L), before out_proj, and each direction's output in token order."""
        xz = torch.matmul(self.in_proj.weight, hidden.transpose(1, 2))  # (B, 2E, L), last dim contiguous
        x, z = xz.split(self.d_inner, dim=1)
        branch_outputs = {direction.name: self._branch(direction, x, z) for direction in self.directions}
        y = sum(branch_outputs.values())
        if self.divide_out:
            y = y / len(self.directions)
        return y, branch_outputs

    def mixed(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden (B, L, D) -> (B, L, E): what out_proj reads (a fit solves out_proj by least squares on it)."""
        return self._mix(hidden)[0].transpose(1, 2)

    def forward(
        self, hidden: torch.Tensor, *, return_directions: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """hidden (B, L, D) -> (B, L, D); with `return_directions`, each branch's output (B, L, E) in scan order."""
        y, branch_outputs = self._mix(hidden)
        out = self.out_proj(y.transpose(1, 2))
        if not return_directions:
            return out, None
        seq_len = hidden.shape[1]
        in_scan_order = {
            direction.name: branch_outputs[direction.name]
            .index_select(-1, direction.order(seq_len, hidden.device))
            .transpose(1, 2)
            for direction in self.directions
        }
        return out, in_scan_order


class Block(nn.Module):
    """Pre-norm residual layer: residual + drop_path(mixer(RMSNorm(residual))); keys `norm.weight`, `mixer.*`."""

    def __init__(
        self,
        cfg: VimConfig,
        drop_path: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        self.norm = RMSNorm(cfg.embed_dim, cfg.norm_eps, device=device, dtype=dtype)
        self.mixer = BiMambaMixer(cfg, device=device, dtype=dtype)
        self.drop_path = DropPath(drop_path)

    @torch.no_grad()
    def reset_parameters(self, gen: torch.Generator | None) -> None:
        """Upstream init of one layer (the model's `reset_parameters` draws its layers in order from one generator)."""
        self.norm.weight.fill_(1.0)
        _init_mixer(self.mixer, self.cfg, gen)

    def forward(
        self, residual: torch.Tensor, *, return_directions: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        out, directions = self.mixer(self.norm(residual), return_directions=return_directions)
        return residual + self.drop_path(out), directions


class PatchEmbed(nn.Module):
    """Conv patchify with kernel `patch_size` and step `stride`; (B, C, H, W) -> (B, P, D) in raster order."""

    def __init__(self, cfg: VimConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None):
        super().__init__()
        self.img_size = cfg.img_size
        self.proj = nn.Conv2d(
            cfg.in_chans,
            cfg.embed_dim,
            kernel_size=cfg.patch_size,
            stride=cfg.resolved_stride,
            device=device,
            dtype=dtype,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[-2:]) != self.img_size:
            got = tuple(images.shape[-2:])
            raise ModelConfigError(f"Vim expects {self.img_size} images (its pos_embed grid), got {got}")
        return self.proj(images).flatten(2).transpose(1, 2)


class VisionMamba(nn.Module):
    """hustvl/Vim `VisionMamba` (bimamba v2, abs pos embed, RMSNorm, residual in fp32), upstream-exact keys.

    `VisionMamba(cfg, device="meta")` allocates nothing and skips init: use it to read the key/shape table.
    """

    def __init__(
        self,
        cfg: VimConfig,
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
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d, **kw)) if cfg.cls_position != "none" else None
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.seq_len, d, **kw))
        self.head = nn.Linear(d, cfg.num_classes, **kw) if cfg.num_classes > 0 else nn.Identity()
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.layers = nn.ModuleList(Block(cfg, rate, **kw) for rate in rates)
        self.norm_f = RMSNorm(d, cfg.norm_eps, **kw)
        if self.pos_embed.device.type != "meta":
            self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | torch.Generator | None = None) -> None:
        """Upstream initialisation (Mamba mixer init, Vim `segm_init_weights` / `_init_weights`), reproducible by seed.

        Draws happen on the CPU from one generator and are copied in, so a seed gives the same model on any device.
        """
        gen = seeded_generator(seed)
        conv = self.patch_embed.proj
        lecun_std = math.sqrt(1.0 / conv.weight[0].numel()) / 0.87962566103423978  # timm 0.4.12 lecun_normal_
        init_on_cpu_(conv.weight, nn.init.trunc_normal_, gen, std=lecun_std)
        conv.bias.zero_()
        if isinstance(self.head, nn.Linear):
            init_on_cpu_(self.head.weight, nn.init.trunc_normal_, gen, std=0.02)
            self.head.bias.zero_()
        init_on_cpu_(self.pos_embed, nn.init.trunc_normal_, gen, std=0.02)
        if self.cls_token is not None:
            init_on_cpu_(self.cls_token, nn.init.trunc_normal_, gen, std=0.02)
        for layer in self.layers:
            layer.reset_parameters(gen)
        self.norm_f.weight.fill_(1.0)

    def token_layout(self) -> TokenLayout:
        return self.cfg.token_layout()

    def scan_orders(self, device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
        """Per direction, the token visited at each scan step (fwd: 0..L-1, bwd: L-1..0)."""
        return {d.name: d.order(self.cfg.seq_len, device) for d in self.layers[0].mixer.directions}

    def no_weight_decay(self) -> set[str]:
        """Parameters upstream trains without weight decay: embeddings, A_log / D of every direction."""
        return ({"pos_embed", "cls_token"} & {n for n, _ in self.named_parameters()}) | ssm_no_decay(self)

    def _embed(self, images: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(images)
        cls_index = self.cfg.cls_index
        if cls_index is not None:
            cls = self.cls_token.expand(x.shape[0], -1, -1)
            x = torch.cat([x[:, :cls_index], cls, x[:, cls_index:]], dim=1)
        return x + self.pos_embed

    def forward_all(self, images: torch.Tensor, *, return_directions: bool = False) -> MambaOutput:
        """One pass returning logits, final normed tokens, the residual stream per layer, optional branch outputs."""
        residual, layer_tokens, directions = run_layers(
            self.layers,
            self._embed(images),
            self.cfg.residual_in_fp32,
            collect=True,
            return_directions=return_directions,
        )
        final_tokens = self.norm_f(residual)
        return MambaOutput(
            logits=self._head(final_tokens),
            final_tokens=final_tokens,
            layer_tokens=layer_tokens,
            directions=directions,
        )

    def _head(self, tokens: torch.Tensor) -> torch.Tensor:
        cls_index = self.cfg.cls_index
        pooled = tokens.mean(dim=1) if cls_index is None else tokens[:, cls_index]
        return self.head(pooled)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        residual, _, _ = run_layers(self.layers, self._embed(images), self.cfg.residual_in_fp32)
        return self._head(self.norm_f(residual))


def run_layers(
    layers: Sequence[Block],
    embedded: torch.Tensor,
    residual_in_fp32: bool,
    *,
    collect: bool = False,
    return_directions: bool = False,
) -> tuple[torch.Tensor, list[torch.Tensor], list[dict[str, torch.Tensor]] | None]:
    """The residual stream through a stack of ViM layers (ViM's and VideoMamba's): the last residual, with `collect`
    the stream after every layer, with `return_directions` every layer's branch outputs (else None)."""
    residual = embedded
    if residual_in_fp32:
        residual = residual.to(torch.promote_types(residual.dtype, torch.float32))
    layer_tokens: list[torch.Tensor] = []
    directions: list[dict[str, torch.Tensor]] = []
    for layer in layers:
        residual, branch_outputs = layer(residual, return_directions=return_directions)
        if collect:
            layer_tokens.append(residual)
        if return_directions:
            directions.append(branch_outputs)
    return residual, layer_tokens, directions if return_directions else None


def ssm_no_decay(model: nn.Module) -> set[str]:
    """Every A_log / D of the ViM mixers in `model`: upstream trains them without weight decay."""
    return {n for n, _ in model.named_parameters() if n.rsplit(".", 1)[-1] in _NO_DECAY_LEAVES}


@torch.no_grad()
def _init_mixer(mixer: BiMambaMixer, cfg: VimConfig, gen: torch.Generator | None) -> None:
    """Mamba-1 init per direction (independent dt draws), then Vim's out_proj rescale by 1/sqrt(depth)."""
    e, n, r = cfg.d_inner, cfg.d_state, cfg.resolved_dt_rank
    init_on_cpu_(mixer.in_proj.weight, nn.init.kaiming_uniform_, gen, a=math.sqrt(5))
    dt_bound = r**-0.5 * cfg.dt_scale
    for direction in mixer.directions:
        conv: nn.Conv1d = getattr(mixer, direction.param_name("conv1d"))
        x_proj: nn.Linear = getattr(mixer, direction.param_name("x_proj"))
        dt_proj: nn.Linear = getattr(mixer, direction.param_name("dt_proj"))
        init_on_cpu_(conv.weight, nn.init.kaiming_uniform_, gen, a=math.sqrt(5))
        conv_bound = 1.0 / math.sqrt(cfg.d_conv)  # PyTorch's Conv1d default, fan_in = 1 * K for depthwise
        init_on_cpu_(conv.bias, nn.init.uniform_, gen, a=-conv_bound, b=conv_bound)
        init_on_cpu_(x_proj.weight, nn.init.kaiming_uniform_, gen, a=math.sqrt(5))
        init_on_cpu_(dt_proj.weight, nn.init.uniform_, gen, a=-dt_bound, b=dt_bound)
        dt_proj.bias.copy_(_dt_bias(cfg, e, torch.promote_types(dt_proj.bias.dtype, torch.float32), gen))
        a_log = getattr(mixer, direction.param_name("A_log"))
        a_row = torch.log(torch.arange(1, n + 1, dtype=torch.promote_types(a_log.dtype, torch.float32)))
        a_log.copy_(a_row.expand(e, n))
        getattr(mixer, direction.param_name("D")).fill_(1.0)
    init_on_cpu_(mixer.out_proj.weight, nn.init.kaiming_uniform_, gen, a=math.sqrt(5))
    mixer.out_proj.weight.div_(math.sqrt(cfg.depth))


def _dt_bias(cfg: VimConfig, size: int, dtype: torch.dtype, gen: torch.Generator | None) -> torch.Tensor:
    """Inverse softplus of dt ~ log-uniform[dt_min, dt_max] floored at dt_init_floor: softplus(bias) == dt."""
    log_min, log_max = math.log(cfg.dt_min), math.log(cfg.dt_max)
    dt = torch.exp(torch.rand(size, generator=gen, dtype=dtype) * (log_max - log_min) + log_min)
    dt = dt.clamp(min=cfg.dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


register_family("vim", VimConfig, VisionMamba)
for _size, _dim in {"t": 192, "s": 384, "b": 768}.items():
    # hustvl/Vim vim_{tiny,small,base}_patch16_224_bimambav2_..._midclstok_div2
    register(f"vim-{_size}", VimConfig(embed_dim=_dim, depth=24, patch_size=16, img_size=(224, 224)))
for _size, _dim in {"t": 192, "s": 384}.items():
    # hustvl/Vim vim_{tiny,small}_patch16_stride8_224_...: overlapping patches, 27x27 grid
    register(f"vim-{_size}-stride8", VimConfig(embed_dim=_dim, depth=24, patch_size=16, stride=8, img_size=(224, 224)))
