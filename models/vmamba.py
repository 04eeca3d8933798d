"""VMamba (MzeroMiko/VMamba, NeurIPS 2024) target model: the v2 classifier `VSSM` with the `v05_noz` SS2D mixer.

Configs (upstream `classification/configs/vssm/`): `vmamba-t` is `vmambav2v_tiny_224.yaml` (dims 96..768, depths
2,2,8,2, ssm_ratio 1.0), `vmamba-s` is `vmambav2_small_224.yaml` (dims 96..768, depths 2,2,15,2, ssm_ratio 2.0) and
`vmamba-b` is `vmambav2_base_224.yaml` (dims 128..1024, depths 2,2,15,2, ssm_ratio 2.0); all three use d_state 1,
dt_rank "auto", a 3x3 depthwise conv without bias, forward_type `v05_noz` (no z gate), mlp_ratio 4, patch embed
"v2", downsample "v3", norm "ln2d". Their yaml drop-path rates (0.2 / 0.3 / 0.6) are training settings: here
`drop_path_rate` defaults to 0.0 and a recipe sets it. With 1000 classes they hold 30,249,064 / 50,147,752 /
88,557,800 parameters (published 30.2M / 50.1M / 88.6M), key tables and order checked against upstream VSSM.

Parameter names, shapes and state_dict order are upstream's, so an upstream checkpoint loads with `strict=True`. The
maths is upstream's channel-first (`ln2d`, `Linear2d`) model; tensors here run channel-last (B, H, W, C), which is
the same computation (a `Linear2d` is a 1x1 conv, i.e. a Linear over channels; a `LayerNorm2d` normalises over
channels). Upstream's `Sequential` indices are kept by `Permute` modules where upstream has `Identity` or `Permute`
(its channel-last variant has exactly these keys too): patch_embed.{0 conv, 2 LN, 5 conv, 7 LN}, downsample.{1 conv,
3 LN}, the last stage's downsample an `Identity`.

SS2D (`v05_noz`) on a stage grid (H, W), E = ssm_ratio * d, R = dt_rank, N = d_state: x = in_proj(x) (no bias, no
z half); x = silu(dwconv3x3(x)); the four cross-scans xs_k (k = row, col, row_rev, col_rev: raster order, column-major
order, and their flips); per direction dt/B/C = x_proj_weight[k] @ xs_k split [R, N, N], delta = dt_projs_weight[k]
@ dt; one selective scan over the 4E channels with grouped B/C (channels k*E..(k+1)*E-1 read group k), A =
-exp(A_logs), D = Ds, delta_bias = dt_projs_bias, softplus; the four outputs put back in raster order and summed
(`cross_merge`); out_norm (LayerNorm over E); out_proj (no bias). Block: x + dp(op(norm(x))), then
x + dp(mlp(norm2(x))) with mlp = fc2(gelu(fc1(.))).

Distillation hooks: `forward_all` returns every block's output (the stages have different grids and widths:
`layer_tokens[i]` is (B, L_s, C_s) for the stage `block_stages()[i]`, grid `stage_grids()[s]`), the last stage's
tokens after `classifier.norm`, and per block the four scan outputs ys_k (B, L_s, E_s) in their own scan order
(before the merge and out_norm); `scan_orders(stage)` says which raster token each step visits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from tmconvert.kernels import selective_scan
from tmconvert.models.errors import ModelConfigError
from tmconvert.models.init import init_on_cpu_, seeded_generator
from tmconvert.models.registry import register, register_family
from tmconvert.models.tokens import TokenLayout
from tmconvert.models.vim import DropPath, MambaOutput

# Upstream's cross-scan order k = 0..3 (csm_triton.py `cross_scan_fwd`, scans=0): none, transpose, flip, both.
DIRECTIONS = ("row", "col", "row_rev", "col_rev")


class PerStage(tuple):
    """One value per stage, read as `value(stage)` or `value[stage]`; tables, JSON and mapping files (`keep:
    target.d_inner`: one set per stage) see the tuple."""

    def __call__(self, stage: int) -> int:
        return self[stage]


@dataclass(frozen=True)
class VMambaConfig:
    """Shape and init hyper-parameters of a VMamba v2 classifier; defaults are VMamba-T (`vmambav2v_tiny_224`).

    `dims` may be given as one int d (upstream's `dims=int`): stage s then has width d * 2**s.
    """

    # MzeroMiko/VMamba classification (Swin's `load_checkpoint`) reads `checkpoint['model']` (`--format upstream`)
    upstream_container: ClassVar[str] = "model"

    dims: tuple[int, ...] = (96, 192, 384, 768)
    depths: tuple[int, ...] = (2, 2, 8, 2)
    ssm_ratio: float = 1.0
    d_state: int = 1
    dt_rank: int | None = None  # None: ceil(d / 16) per stage, upstream's "auto"
    d_conv: int = 3
    mlp_ratio: float = 4.0
    patch_size: int = 4  # patch embed "v2": two 3x3 stride-2 convs, so 4 is the only size it expresses
    img_size: tuple[int, int] = (224, 224)
    in_chans: int = 3
    num_classes: int = 1000
    norm_eps: float = 1e-5  # nn.LayerNorm / LayerNorm2d default, everywhere upstream
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        size = (self.img_size, self.img_size) if isinstance(self.img_size, int) else tuple(self.img_size)
        object.__setattr__(self, "img_size", size)
        depths = (self.depths,) if isinstance(self.depths, int) else tuple(self.depths)
        object.__setattr__(self, "depths", depths)
        if isinstance(self.dims, int):
            object.__setattr__(self, "dims", tuple(self.dims * 2**s for s in range(len(depths))))
        else:
            object.__setattr__(self, "dims", tuple(self.dims))
        if not depths or len(self.dims) != len(depths):
            raise ModelConfigError(
                f"VMambaConfig: need one dim per stage and at least one stage, got dims {self.dims}, depths {depths}"
            )
        if any(not isinstance(v, int) or v <= 0 for v in self.dims + depths):
            raise ModelConfigError(f"VMambaConfig: dims and depths must be positive ints, got {self.dims}, {depths}")
        if self.dims[0] % 2:
            raise ModelConfigError(f"VMambaConfig: dims[0] must be even (the stem's first conv: d/2), got {self.dims}")
        if self.patch_size != 4:
            raise ModelConfigError(
                f"VMambaConfig.patch_size must be 4 (patch embed v2 is two 3x3 stride-2 convs), got {self.patch_size}"
            )
        for name in ("d_state", "in_chans"):
            if getattr(self, name) <= 0:
                raise ModelConfigError(f"VMambaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.d_conv < 3 or self.d_conv % 2 == 0:
            raise ModelConfigError(f"VMambaConfig.d_conv must be odd and >= 3, got {self.d_conv}")
        if self.dt_rank is not None and self.dt_rank <= 0:
            raise ModelConfigError(f"VMambaConfig.dt_rank must be positive or None, got {self.dt_rank}")
        if any(int(self.ssm_ratio * d) <= 0 for d in self.dims) or any(int(self.mlp_ratio * d) <= 0 for d in self.dims):
            raise ModelConfigError(
                f"VMambaConfig: ssm_ratio {self.ssm_ratio} and mlp_ratio {self.mlp_ratio} must give positive widths"
            )
        if self.num_classes < 0:
            raise ModelConfigError(f"VMambaConfig.num_classes must be >= 0, got {self.num_classes}")
        if len(self.img_size) != 2 or min(self.img_size) < 1:
            raise ModelConfigError(f"VMambaConfig.img_size must be two positive sides, got {self.img_size}")
        if not 0.0 < self.dt_min <= self.dt_max:
            raise ModelConfigError(f"VMambaConfig: need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ModelConfigError(f"VMambaConfig.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def num_stages(self) -> int:
        return len(self.depths)

    @property
    def depth(self) -> int:
        """Blocks over all stages (the converter's student depth; `depths` says how they split into stages)."""
        return sum(self.depths)

    @property
    def stem_channels(self) -> int:
        """The width between the stem's two convs, d_0 / 2."""
        return self.dims[0] // 2

    @property
    def stem_holds_pixels(self) -> bool:
        """Whether that width holds every pixel of a 2x2 block with both signs (8 * in_chans channels): then a
        converter can build the stem to embed a teacher's patches (`init: space_to_depth`)."""
        return self.stem_channels >= 8 * self.in_chans

    @property
    def embed_dim(self) -> PerStage:
        """The residual width of every stage (`dims`), under the name flat families give their one width."""
        return PerStage(self.dims)

    @property
    def d_inner(self) -> PerStage:
        """SS2D's inner width E_s = ssm_ratio * d_s of every stage: `d_inner(s)` or `d_inner[s]`."""
        return PerStage(int(self.ssm_ratio * d) for d in self.dims)

    def resolved_dt_rank(self, stage: int) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.dims[stage] / 16)

    @property
    def mlp_hidden(self) -> PerStage:
        """The block MLP's hidden width of every stage: `mlp_hidden(s)` or `mlp_hidden[s]`."""
        return PerStage(int(d * self.mlp_ratio) for d in self.dims)

    def stage_grids(self) -> list[tuple[int, int]]:
        return stage_grids(self.img_size, self.num_stages)

    def block_stages(self) -> list[int]:
        return [s for s, depth in enumerate(self.depths) for _ in range(depth)]

    def token_layout(self, stage: int = 0) -> TokenLayout:
        grid = self.stage_grids()[stage]
        return TokenLayout(grid=grid, cls_index=None, patch_indices=tuple(range(grid[0] * grid[1])))

    def for_teacher(
        self, *, img_size: tuple[int, int], patch_size: int, in_chans: int, num_classes: int, class_token: bool
    ) -> VMambaConfig:
        """This VMamba reading a ViT teacher's images and predicting its classes (the converter's target adaptation).

        Only the images and classes follow the teacher: the stem always patches by 4 (then each stage halves the
        grid), so a /16 teacher's grid is the third stage's, whatever `patch_size` says. Pooling is always the mean
        of the last stage's tokens, with or without the teacher's cls token (`class_token`).
        """
        return replace(self, img_size=img_size, in_chans=in_chans, num_classes=num_classes)


def _half(n: int) -> int:
    """Output side of a 3x3 stride-2 conv with padding 1: ceil(n / 2)."""
    return (n + 1) // 2


def stage_grids(img_size: tuple[int, int], num_stages: int) -> list[tuple[int, int]]:
    """(H, W) of every stage: the stem halves twice, each downsample once more."""
    h, w = _half(_half(img_size[0])), _half(_half(img_size[1]))
    grids = [(h, w)]
    for _ in range(num_stages - 1):
        h, w = _half(h), _half(w)
        grids.append((h, w))
    return grids


def scan_orders(grid: tuple[int, int], device: torch.device | str | None = None) -> dict[str, torch.Tensor]:
    """Per direction, the raster token (h * W + w) visited at scan step j, on an (H, W) grid."""
    h, w = grid
    row = torch.arange(h * w, device=device)
    col = row.view(h, w).t().reshape(-1)  # step w * H + h visits token h * W + w
    return {"row": row, "col": col, "row_rev": row.flip(0), "col_rev": col.flip(0)}


def cross_scan(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, 4, C, L): the sequences row, col, row_rev, col_rev (upstream `cross_scan_fn`, scans=0)."""
    row = x.flatten(2)
    col = x.transpose(2, 3).flatten(2)
    pair = torch.stack([row, col], dim=1)
    return torch.cat([pair, pair.flip(-1)], dim=1)


def cross_merge(ys: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """(B, 4, C, L) in scan order -> (B, C, L) raster: each direction put back at its tokens, summed."""
    h, w = grid
    pair = ys[:, 0:2] + ys[:, 2:4].flip(-1)
    col = pair[:, 1].unflatten(-1, (w, h)).transpose(-2, -1).flatten(-2)
    return pair[:, 0] + col


# --------------------------------------------------------------------------------------------------------------------
# Modules


class Permute(nn.Module):
    """Holds a Sequential index upstream fills with a Permute (channel-last) or an Identity (channel-first)."""

    def __init__(self, *dims: int):
        super().__init__()
        self.dims = dims

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.permute(*self.dims)


def _patch_embed(cfg: VMambaConfig, kw: dict) -> nn.Sequential:
    """Upstream `_make_patch_embed_v2`: (B, C, H, W) -> (B, H/4, W/4, d); keys 0, 2, 5, 7."""
    d = cfg.dims[0]
    return nn.Sequential(
        nn.Conv2d(cfg.in_chans, d // 2, kernel_size=3, stride=2, padding=1, **kw),
        Permute(0, 2, 3, 1),
        nn.LayerNorm(d // 2, eps=cfg.norm_eps, **kw),
        Permute(0, 3, 1, 2),
        nn.GELU(),
        nn.Conv2d(d // 2, d, kernel_size=3, stride=2, padding=1, **kw),
        Permute(0, 2, 3, 1),
        nn.LayerNorm(d, eps=cfg.norm_eps, **kw),
    )


def _downsample(dim: int, out_dim: int, eps: float, kw: dict) -> nn.Sequential:
    """Upstream `_make_downsample_v3`: (B, H, W, d) -> (B, H/2, W/2, out_dim); keys 1, 3."""
    return nn.Sequential(
        Permute(0, 3, 1, 2),
        nn.Conv2d(dim, out_dim, kernel_size=3, stride=2, padding=1, **kw),
        Permute(0, 2, 3, 1),
        nn.LayerNorm(out_dim, eps=eps, **kw),
    )


class SS2D(nn.Module):
    """Upstream SS2D `v05_noz` (initialize "v0"): four cross-scans of one depthwise-conv feature map."""

    def __init__(
        self, cfg: VMambaConfig, stage: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        d, e, n, r, k = cfg.dims[stage], cfg.d_inner(stage), cfg.d_state, cfg.resolved_dt_rank(stage), len(DIRECTIONS)
        self.d_inner, self.d_state, self.dt_rank = e, n, r
        # Registration order reproduces upstream's state_dict order: own parameters first, then submodules.
        self.x_proj_weight = nn.Parameter(torch.empty(k, r + 2 * n, e, **kw))
        self.A_logs = nn.Parameter(torch.empty(k * e, n, **kw))
        self.Ds = nn.Parameter(torch.empty(k * e, **kw))
        self.dt_projs_weight = nn.Parameter(torch.empty(k, e, r, **kw))
        self.dt_projs_bias = nn.Parameter(torch.empty(k, e, **kw))
        self.out_norm = nn.LayerNorm(e, eps=cfg.norm_eps, **kw)
        self.in_proj = nn.Linear(d, e, bias=False, **kw)
        self.conv2d = nn.Conv2d(e, e, kernel_size=cfg.d_conv, padding=cfg.d_conv // 2, groups=e, bias=False, **kw)
        self.out_proj = nn.Linear(e, d, bias=False, **kw)

    def scans(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, H, W, d), already normed -> the four selective-scan outputs (B, 4, E, L), each in its scan order."""
        batch, h, w, _ = x.shape
        e, n, r, k, length = self.d_inner, self.d_state, self.dt_rank, len(DIRECTIONS), h * w
        u = F.silu(self.conv2d(self.in_proj(x).permute(0, 3, 1, 2)))  # (B, E, H, W)
        xs = cross_scan(u)  # (B, 4, E, L)
        x_dbl = torch.matmul(self.x_proj_weight, xs)  # (B, 4, R + 2N, L)
        dts, b_mat, c_mat = x_dbl.split([r, n, n], dim=2)
        delta = torch.matmul(self.dt_projs_weight, dts)  # (B, 4, E, L); the bias goes in as delta_bias
        fp = torch.promote_types(self.A_logs.dtype, torch.float32)
        ys = selective_scan(
            xs.reshape(batch, k * e, length),
            delta.reshape(batch, k * e, length),
            -torch.exp(self.A_logs.to(fp)),
            b_mat.contiguous(),
            c_mat.contiguous(),
            D=self.Ds.to(fp),
            delta_bias=self.dt_projs_bias.reshape(-1).to(fp),
            delta_softplus=True,
        )
        return ys.view(batch, k, e, length)

    def project(self, merged: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """The merged scans (B, E, L) raster -> out_proj(out_norm(.)) as (B, H, W, d)."""
        y = self.out_norm(merged.transpose(1, 2))
        return self.out_proj(y).unflatten(1, grid)

    def forward(
        self, x: torch.Tensor, *, return_directions: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """x (B, H, W, d) -> (B, H, W, d); with `return_directions`, each scan's output (B, L, E) in scan order."""
        grid = (x.shape[1], x.shape[2])
        ys = self.scans(x)
        out = self.project(cross_merge(ys, grid), grid)
        if not return_directions:
            return out, None
        return out, {name: ys[:, i].transpose(1, 2) for i, name in enumerate(DIRECTIONS)}


class Mlp(nn.Module):
    """fc1 -> GELU -> fc2 (upstream `Mlp` with Linear2d layers: keys `fc1.*`, `fc2.*`)."""

    def __init__(self, dim: int, hidden: int, device: torch.device | str | None = None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class VSSBlock(nn.Module):
    """x + dp(op(norm(x))), then x + dp(mlp(norm2(x))); x is (B, H, W, d)."""

    def __init__(
        self,
        cfg: VMambaConfig,
        stage: int,
        drop_path: float,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        d = cfg.dims[stage]
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps, **kw)
        self.op = SS2D(cfg, stage, **kw)
        self.drop_path = DropPath(drop_path)
        self.norm2 = nn.LayerNorm(d, eps=cfg.norm_eps, **kw)
        self.mlp = Mlp(d, cfg.mlp_hidden(stage), **kw)

    def forward(
        self, x: torch.Tensor, *, return_directions: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        out, directions = self.op(self.norm(x), return_directions=return_directions)
        x = x + self.drop_path(out)
        x = x + self.drop_path(self.mlp(self.norm2(x)))
        return x, directions


class VSSStage(nn.Module):
    """One stage (keys `blocks.{j}.*`, then `downsample.*`; the last stage's downsample is an Identity)."""

    def __init__(
        self,
        cfg: VMambaConfig,
        stage: int,
        rates: list[float],
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.blocks = nn.ModuleList(VSSBlock(cfg, stage, rate, **kw) for rate in rates)
        last = stage == cfg.num_stages - 1
        self.downsample = nn.Identity() if last else _downsample(cfg.dims[stage], cfg.dims[stage + 1], cfg.norm_eps, kw)


class Classifier(nn.Module):
    """Upstream's `classifier` Sequential: norm (LayerNorm2d), avgpool, flatten, head; keys `norm.*`, `head.*`."""

    def __init__(self, cfg: VMambaConfig, device: torch.device | str | None = None, dtype=None):
        super().__init__()
        c = cfg.dims[-1]
        self.norm = nn.LayerNorm(c, eps=cfg.norm_eps, device=device, dtype=dtype)
        self.head = nn.Linear(c, cfg.num_classes, device=device, dtype=dtype) if cfg.num_classes > 0 else nn.Identity()


class VMamba(nn.Module):
    """MzeroMiko/VMamba `VSSM` (v2: patch embed v2, downsample v3, ln2d, SS2D v05_noz), upstream-exact keys.

    `VMamba(cfg, device="meta")` allocates nothing and skips init: use it to read the key/shape table. Images of
    any size run (there is no position embedding); `stage_grids()`, `token_layout()` and `scan_orders()` describe
    the config's `img_size`.
    """

    def __init__(
        self,
        cfg: VMambaConfig,
        *,
        seed: int | torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        kw = {"device": device, "dtype": dtype}
        self.patch_embed = _patch_embed(cfg, kw)
        rates = torch.linspace(0, cfg.drop_path_rate, sum(cfg.depths)).tolist()
        starts = [sum(cfg.depths[:s]) for s in range(cfg.num_stages)]
        self.layers = nn.ModuleList(
            VSSStage(cfg, s, rates[starts[s] : starts[s] + depth], **kw) for s, depth in enumerate(cfg.depths)
        )
        self.classifier = Classifier(cfg, **kw)
        if self.classifier.norm.weight.device.type != "meta":
            self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | torch.Generator | None = None) -> None:
        """Upstream's effective init (constructors, then `VSSM._init_weights` over every module), reproducible by seed.

        Every nn.Linear, Linear2d included (in_proj, out_proj, mlp fc1/fc2, classifier.head): TN(0.02), bias 0.
        LayerNorms 1/0. Convs keep PyTorch's default (kaiming-uniform a=sqrt(5), bias U(+-1/sqrt(fan_in))).
        x_proj_weight: each direction an nn.Linear default (kaiming-uniform a=sqrt(5)), never re-initialised (a bare
        Parameter). Per direction Mamba-1 dt init: dt_projs_weight U(+-R^-0.5 * dt_scale), softplus(dt_projs_bias)
        log-uniform in [dt_min, dt_max] floored at dt_init_floor. A_logs rows log(1..N), Ds 1. Draws happen on the
        CPU from one generator, so a seed gives the same model on any device.
        """
        gen = seeded_generator(seed)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                init_on_cpu_(module.weight, nn.init.kaiming_uniform_, gen, a=math.sqrt(5))
                if module.bias is not None:
                    bound = 1.0 / math.sqrt(module.weight[0].numel())
                    init_on_cpu_(module.bias, nn.init.uniform_, gen, a=-bound, b=bound)
            elif isinstance(module, nn.Linear):
                init_on_cpu_(module.weight, nn.init.trunc_normal_, gen, std=0.02)
                if module.bias is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.reset_parameters()
            elif isinstance(module, SS2D):
                _init_ssm(module, self.cfg, gen)

    def stage_grids(self) -> list[tuple[int, int]]:
        """(H, W) of every stage for the config's img_size (56, 28, 14, 7 at 224 px)."""
        return self.cfg.stage_grids()

    def block_stages(self) -> list[int]:
        """The stage of every block, blocks numbered over all stages (the index of `layer_tokens`)."""
        return self.cfg.block_stages()

    def token_layout(self, stage: int = 0) -> TokenLayout:
        """A stage's tokens: its grid in raster order, no cls token."""
        return self.cfg.token_layout(stage)

    def scan_orders(
        self, stage: int = 0, device: torch.device | str | None = None, grid: tuple[int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """Per direction, the raster token visited at each scan step, on `stage`'s grid (or `grid` if given)."""
        return scan_orders(tuple(grid) if grid is not None else self.stage_grids()[stage], device)

    def no_weight_decay(self) -> set[str]:
        """Every A_logs / Ds (marked `_no_weight_decay` upstream; VMamba has no embeddings)."""
        return {n for n, _ in self.named_parameters() if n.rsplit(".", 1)[-1] in ("A_logs", "Ds")}

    def _run(
        self, images: torch.Tensor, record: bool, return_directions: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor], list[dict[str, torch.Tensor]]]:
        x = self.patch_embed(images)  # (B, H, W, d)
        layer_tokens: list[torch.Tensor] = []
        directions: list[dict[str, torch.Tensor]] = []
        for stage in self.layers:
            for block in stage.blocks:
                x, scans = block(x, return_directions=return_directions)
                if record:
                    layer_tokens.append(x.flatten(1, 2))
                if return_directions:
                    directions.append(scans)
            x = stage.downsample(x)
        return self.classifier.norm(x).flatten(1, 2), layer_tokens, directions

    def forward_all(self, images: torch.Tensor, *, return_directions: bool = False) -> MambaOutput:
        """One pass returning logits, the last stage's tokens after `classifier.norm` (B, L, C), every block's output
        (B, L_s, C_s) in raster order, and optionally per block the four scans' outputs.

        `directions[i][name]` is (B, L_s, E_s): scan `name`'s selective-scan output y_k (D-skip included, before the
        four are merged and out_norm'ed) with step j at index j, i.e. token `scan_orders(block_stages()[i])[name][j]`.
        """
        final_tokens, layer_tokens, directions = self._run(images, True, return_directions)
        return MambaOutput(
            logits=self.classifier.head(final_tokens.mean(dim=1)),
            final_tokens=final_tokens,
            layer_tokens=layer_tokens,
            directions=directions if return_directions else None,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        final_tokens, _, _ = self._run(images, False, False)
        return self.classifier.head(final_tokens.mean(dim=1))


@torch.no_grad()
def _init_ssm(op: SS2D, cfg: VMambaConfig, gen: torch.Generator | None) -> None:
    """SS2D's own parameters as `mamba_init.init_dt_A_D` and the stacked x_proj Linears leave them."""
    k = len(DIRECTIONS)
    e, n, r = op.d_inner, op.d_state, op.dt_rank
    fp = torch.promote_types(op.A_logs.dtype, torch.float32)
    for i in range(k):
        init_on_cpu_(op.x_proj_weight[i], nn.init.kaiming_uniform_, gen, a=math.sqrt(5))
    bound = r**-0.5 * cfg.dt_scale
    log_min, log_max = math.log(cfg.dt_min), math.log(cfg.dt_max)
    for i in range(k):
        init_on_cpu_(op.dt_projs_weight[i], nn.init.uniform_, gen, a=-bound, b=bound)
        dt = torch.exp(torch.rand(e, generator=gen, dtype=fp) * (log_max - log_min) + log_min)
        dt = dt.clamp(min=cfg.dt_init_floor)
        op.dt_projs_bias[i].copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
    op.A_logs.copy_(torch.log(torch.arange(1, n + 1, dtype=fp)).expand(k * e, n))
    op.Ds.fill_(1.0)


register_family("vmamba", VMambaConfig, VMamba)
# MzeroMiko/VMamba classification/configs/vssm/: vmambav2v_tiny_224, vmambav2_small_224, vmambav2_base_224
register("vmamba-t", VMambaConfig(dims=96, depths=(2, 2, 8, 2), ssm_ratio=1.0, d_state=1))
register("vmamba-s", VMambaConfig(dims=96, depths=(2, 2, 15, 2), ssm_ratio=2.0, d_state=1))
register("vmamba-b", VMambaConfig(dims=128, depths=(2, 2, 15, 2), ssm_ratio=2.0, d_state=1))
