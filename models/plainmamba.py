"""PlainMamba (ChenhongyiYang/PlainMamba, BMVC 2024) target model, as its mmcls `ImageClassifier` holds it.

Parameter names, shapes and state_dict order are upstream's (`backbone.*`, `head.fc.*`), so an upstream checkpoint
loads with `strict=True` and ours loads there. The forward is upstream's, quirks included: `dt_proj`'s bias enters
twice (in the Linear and again as the scan's `delta_bias`), and only the scan input u is put in each direction's
order while dt, B and C stay in raster order (a direction's step j reads raster token j's dt/B/C, plus the learnt
`direction_Bs` row of the move into step j).

Geometry: a 7x7/2 conv stem, `num_convs` 3x3 convs, then a (patch/2)-sized, (patch/2)-strided projection after
zero-padding the bottom/right (mmcv "corner" padding), so the grid is ceil(ceil(H/2) / (patch/2)): any even
`patch_size` works, and an image size divisible by it gives a ViT's grid (patch 14 on 112 px: 8x8). Odd patch sizes
cannot be expressed. Images of another size than `img_size` run as upstream runs them, with pos_embed resampled
(bicubic, in fp32) to their grid; `token_layout()` and `scan_orders()` describe the config's grid.

Distillation hooks: `forward_all` returns the residual stream after each layer and, per layer, the four zig-zag
scans' outputs in their own scan order (`scan_orders()` says which token each step visits).
"""

from __future__ import annotations

import functools
import itertools
import math
from dataclasses import dataclass, replace
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from tmconvert.kernels import selective_scan
from tmconvert.models.errors import ModelConfigError
from tmconvert.models.init import init_on_cpu_, seeded_generator
from tmconvert.models.registry import register, register_family
from tmconvert.models.tokens import TokenLayout, resample_abs_pos_embed
from tmconvert.models.vim import DropPath, MambaOutput

DIRECTIONS = ("row", "row_rev", "col", "col_rev")
DT_INITS = ("mmcls", "mamba")
# Direction codes of upstream's `direction_Bs` rows: 0 = first step, then the move into the step.
_MOVE_CODES = {(0, 1): 1, (0, -1): 2, (-1, 0): 3, (1, 0): 4}  # right, left, up, down


@dataclass(frozen=True)
class PlainMambaConfig:
    """Shape and init hyper-parameters of a PlainMamba; defaults are PlainMamba-L1 (upstream `arch_zoo['L1']`).

    `dt_init`: "mmcls" is what upstream training starts from (the classifier's TruncNormal init_cfg re-initialises
    every Linear, dt_proj included: weight ~ TN(0.02), bias 0); "mamba" keeps PlainMamba2D's constructor init for
    dt_proj (weight ~ U(+-dt_rank^-0.5 * dt_scale), softplus(bias) log-uniform in [dt_min, dt_max]).
    """

    upstream_container: ClassVar[str] = "state_dict"  # mmcls (PlainMamba's classifier) reads `checkpoint['state_dict']`

    embed_dim: int = 192
    depth: int = 24
    num_convs: int = 1  # 3x3 conv-BN-ReLU blocks between the stem and the projection
    dwconv_layers: tuple[int, ...] = (0,)  # layers followed by a 3x3 depthwise conv-BN-GELU (L1 only)
    d_state: int = 16
    expand: int = 2
    conv_size: int = 7
    dt_rank: int | None = None  # None: ceil(embed_dim / 16), upstream's "auto"
    patch_size: int = 16
    img_size: tuple[int, int] = (224, 224)
    in_chans: int = 3
    num_classes: int = 1000
    stem_channels: int = 64
    norm_eps: float = 1e-5  # per-layer nn.LayerNorm default
    final_norm_eps: float = 1e-6  # `ln1`, upstream norm_cfg
    dt_init: str = "mmcls"
    dt_min: float = 0.001
    dt_max: float = 0.1
    dt_init_floor: float = 1e-4
    dt_scale: float = 1.0
    drop_path_rate: float = 0.0

    def __post_init__(self) -> None:
        size = (self.img_size, self.img_size) if isinstance(self.img_size, int) else tuple(self.img_size)
        object.__setattr__(self, "img_size", size)
        object.__setattr__(self, "dwconv_layers", tuple(self.dwconv_layers))
        for name in ("embed_dim", "depth", "d_state", "expand", "patch_size", "in_chans", "stem_channels"):
            if getattr(self, name) <= 0:
                raise ModelConfigError(f"PlainMambaConfig.{name} must be positive, got {getattr(self, name)}")
        if self.patch_size % 2:
            raise ModelConfigError(
                f"PlainMambaConfig.patch_size must be even (a stride-2 stem, then a patch/2 projection), "
                f"got {self.patch_size}"
            )
        if self.conv_size <= 0 or self.conv_size % 2 == 0:
            raise ModelConfigError(f"PlainMambaConfig.conv_size must be odd and positive, got {self.conv_size}")
        if self.dt_rank is not None and self.dt_rank <= 0:
            raise ModelConfigError(f"PlainMambaConfig.dt_rank must be positive or None, got {self.dt_rank}")
        if self.num_convs < 0 or self.num_classes < 0:
            raise ModelConfigError(
                f"PlainMambaConfig: num_convs and num_classes must be >= 0, got {self.num_convs}, {self.num_classes}"
            )
        if len(set(self.dwconv_layers)) != len(self.dwconv_layers) or any(
            not 0 <= i < self.depth for i in self.dwconv_layers
        ):
            raise ModelConfigError(
                f"PlainMambaConfig.dwconv_layers must be distinct layer indices in [0, {self.depth}), "
                f"got {self.dwconv_layers}"
            )
        if len(self.img_size) != 2 or min(self.img_size) < 2:
            raise ModelConfigError(f"PlainMambaConfig.img_size must be two sides of at least 2 px, got {self.img_size}")
        if self.dt_init not in DT_INITS:
            raise ModelConfigError(f"PlainMambaConfig.dt_init must be one of {DT_INITS}, got {self.dt_init!r}")
        if not 0.0 < self.dt_min <= self.dt_max:
            raise ModelConfigError(f"PlainMambaConfig: need 0 < dt_min <= dt_max, got {self.dt_min}, {self.dt_max}")
        if not 0.0 <= self.drop_path_rate < 1.0:
            raise ModelConfigError(f"PlainMambaConfig.drop_path_rate must be in [0, 1), got {self.drop_path_rate}")

    @property
    def resolved_dt_rank(self) -> int:
        return self.dt_rank if self.dt_rank is not None else math.ceil(self.embed_dim / 16)

    @property
    def d_inner(self) -> int:
        return self.expand * self.embed_dim

    @property
    def grid(self) -> tuple[int, int]:
        """pos_embed's grid, computed as upstream's ConvPatchEmbed does (from img_size // 2, not the stem's ceil)."""
        step = self.patch_size // 2
        return (-(-(self.img_size[0] // 2) // step), -(-(self.img_size[1] // 2) // step))

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def seq_len(self) -> int:
        return self.num_patches  # no cls token: the head averages every token

    def token_layout(self) -> TokenLayout:
        return TokenLayout(grid=self.grid, cls_index=None, patch_indices=tuple(range(self.num_patches)))

    def for_teacher(
        self, *, img_size: tuple[int, int], patch_size: int, in_chans: int, num_classes: int, class_token: bool
    ) -> PlainMambaConfig:
        """This PlainMamba reading a ViT teacher's images and predicting its classes (the converter's target
        adaptation): the teacher's patch size and image size, so the stem (stride 2) and projection (stride p/2) give
        the teacher's token grid. An odd patch cannot be split over the stride-2 stem (refused in `__post_init__`).
        Pooling is always the mean of the patch tokens, whether or not the teacher has a cls token (`class_token`)."""
        return replace(self, img_size=img_size, patch_size=patch_size, in_chans=in_chans, num_classes=num_classes)


# --------------------------------------------------------------------------------------------------------------------
# The four zig-zag scans


def zigzag_paths(grid: tuple[int, int]) -> tuple[list[tuple[int, int]], ...]:
    """The (row, col) cells each direction visits: row-wise zig-zag from (0, 0), its reverse, column-wise, reverse."""
    h, w = grid
    rows = [(i, j if i % 2 == 0 else w - 1 - j) for i in range(h) for j in range(w)]
    cols = [(i if j % 2 == 0 else h - 1 - i, j) for j in range(w) for i in range(h)]
    return rows, rows[::-1], cols, cols[::-1]


class ScanPlan(NamedTuple):
    """Per direction (rows in DIRECTIONS order): token visited at step j, step visiting token t, direction code."""

    orders: torch.Tensor  # (4, L)
    inverse: torch.Tensor  # (4, L)
    codes: torch.Tensor  # (4, L), upstream's get_permute_order directions: move into step j, 0 at j = 0


@functools.lru_cache(maxsize=64)
def scan_plan(grid: tuple[int, int], device: torch.device) -> ScanPlan:
    """Cached per grid and device, so a forward neither rebuilds nor copies them (CUDA-graph safe after warm-up)."""
    w = grid[1]
    paths = zigzag_paths(grid)
    with torch.inference_mode(False):  # the indices are saved for backward: never inference tensors
        orders = torch.tensor([[i * w + j for i, j in path] for path in paths])
        codes = [[0] + [_MOVE_CODES[(b[0] - a[0], b[1] - a[1])] for a, b in itertools.pairwise(p)] for p in paths]
        return ScanPlan(orders.to(device), orders.argsort(dim=-1).to(device), torch.tensor(codes, device=device))


# --------------------------------------------------------------------------------------------------------------------
# Modules


class ConvPatchEmbed(nn.Module):
    """Upstream's ConvPatchEmbed: conv7x7/2-BN-ReLU stem, `num_convs` conv3x3-BN-ReLU, corner pad, projection."""

    def __init__(
        self, cfg: PlainMambaConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        c = cfg.stem_channels
        self.stem = nn.Sequential(
            nn.Conv2d(cfg.in_chans, c, kernel_size=7, stride=2, padding=3, bias=False, **kw),
            nn.BatchNorm2d(c, **kw),
            nn.ReLU(inplace=True),
        )
        if cfg.num_convs > 0:
            blocks = [
                (nn.Conv2d(c, c, 3, padding=1, bias=False, **kw), nn.BatchNorm2d(c, **kw), nn.ReLU(inplace=True))
                for _ in range(cfg.num_convs)
            ]
            self.convs = nn.Sequential(*(m for block in blocks for m in block))  # keys convs.{3j}, convs.{3j+1}
        else:
            self.convs = None
        self.step = cfg.patch_size // 2
        self.projection = nn.Conv2d(c, cfg.embed_dim, kernel_size=self.step, stride=self.step, **kw)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """(B, C, H, W) -> tokens (B, L, D) in raster order, and the grid."""
        x = self.stem(images)
        if self.convs is not None:
            x = self.convs(x)
        pad_h, pad_w = (-x.shape[-2]) % self.step, (-x.shape[-1]) % self.step
        if pad_h or pad_w:
            x = F.pad(x, (0, pad_w, 0, pad_h))
        x = self.projection(x)
        return x.flatten(2).transpose(1, 2), (x.shape[-2], x.shape[-1])


class PlainMamba2D(nn.Module):
    """Upstream's PlainMamba2D mixer: in_proj, depthwise conv2d + SiLU, four zig-zag selective scans summed, gate."""

    def __init__(
        self, cfg: PlainMambaConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        d, e, n, r, k = cfg.embed_dim, cfg.d_inner, cfg.d_state, cfg.resolved_dt_rank, cfg.conv_size
        self.d_inner, self.d_state, self.dt_rank = e, n, r
        # Registration order reproduces upstream's state_dict order (own parameters first, then submodules).
        self.A_log = nn.Parameter(torch.empty(e, n, **kw))
        self.D = nn.Parameter(torch.empty(e, **kw))
        self.direction_Bs = nn.Parameter(torch.empty(len(DIRECTIONS) + 1, n, **kw))
        self.in_proj = nn.Linear(d, 2 * e, bias=True, **kw)
        self.conv2d = nn.Conv2d(e, e, kernel_size=k, padding=k // 2, groups=e, bias=True, **kw)
        self.x_proj = nn.Linear(e, r + 2 * n, bias=False, **kw)
        self.dt_proj = nn.Linear(r, e, bias=True, **kw)
        self.out_proj = nn.Linear(e, d, bias=True, **kw)

    def forward(
        self, x: torch.Tensor, grid: tuple[int, int], plan: ScanPlan, *, return_directions: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """x (B, L, D) in raster order -> (B, L, D); with `return_directions`, each scan's output (B, L, E).

        A direction's output is its selective scan's y (D-skip included, before the four are summed and gated by
        silu(z)), with step j on the time axis: the token it belongs to is `plan.orders[k, j]`.
        """
        batch, length, _ = x.shape
        e, n, k = self.d_inner, self.d_state, len(DIRECTIONS)
        xs, z = self.in_proj(x).chunk(2, dim=-1)
        u = F.silu(self.conv2d(xs.transpose(1, 2).reshape(batch, e, *grid))).flatten(2)  # (B, E, L) raster
        dt, b_mat, c_mat = self.x_proj(u.transpose(1, 2)).split([self.dt_rank, n, n], dim=-1)
        delta = self.dt_proj(dt).transpose(1, 2)  # bias included here AND passed again as delta_bias (upstream)
        fp = torch.promote_types(self.A_log.dtype, torch.float32)
        # The four scans run as one batch of 4B sequences; only u is permuted, dt / B / C stay in raster order.
        u_scans = u[:, :, plan.orders].permute(2, 0, 1, 3).reshape(k * batch, e, length)
        step_b = self.direction_Bs[plan.codes].transpose(1, 2).to(b_mat.dtype)  # (4, N, L)
        b_scans = (b_mat.transpose(1, 2).unsqueeze(0) + step_b.unsqueeze(1)).reshape(k * batch, n, length)
        c_scans = c_mat.transpose(1, 2).expand(k, batch, n, length).reshape(k * batch, n, length)
        delta_scans = delta.expand(k, batch, e, length).reshape(k * batch, e, length)
        y = selective_scan(
            u_scans,
            delta_scans,
            -torch.exp(self.A_log.to(fp)),
            b_scans,
            c_scans,
            D=self.D.to(fp),
            z=None,
            delta_bias=self.dt_proj.bias.to(fp),
            delta_softplus=True,
        ).view(k, batch, e, length)
        summed = y.gather(-1, plan.inverse[:, None, None, :].expand_as(y)).sum(0)  # back to token order, (B, E, L)
        out = self.out_proj(summed.transpose(1, 2) * F.silu(z))
        if not return_directions:
            return out, None
        return out, {name: y[i].transpose(1, 2) for i, name in enumerate(DIRECTIONS)}


class PlainMambaLayer(nn.Module):
    """x + drop_path(mixer(LayerNorm(x))), then, where configured, conv3x3dw-BN-GELU on the result (no residual)."""

    def __init__(
        self,
        cfg: PlainMambaConfig,
        drop_path: float,
        with_dwconv: bool,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        d = cfg.embed_dim
        self.norm = nn.LayerNorm(d, eps=cfg.norm_eps, **kw)
        self.dw = (
            nn.Sequential(
                nn.Conv2d(d, d, kernel_size=3, padding=1, groups=d, bias=False, **kw),
                nn.BatchNorm2d(d, **kw),
                nn.GELU(),
            )
            if with_dwconv
            else None
        )
        self.mamba = PlainMamba2D(cfg, **kw)
        self.drop_path = DropPath(drop_path)

    def forward(
        self, x: torch.Tensor, grid: tuple[int, int], plan: ScanPlan, *, return_directions: bool = False
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        mixed, directions = self.mamba(self.norm(x), grid, plan, return_directions=return_directions)
        x = x + self.drop_path(mixed)
        if self.dw is not None:
            batch, length, d = x.shape
            x = self.dw(x.transpose(1, 2).reshape(batch, d, *grid)).reshape(batch, d, length).transpose(1, 2)
        return x, directions


class PlainMambaBackbone(nn.Module):
    """Upstream's `PlainMamba` backbone (keys `backbone.*`): patch_embed, pos_embed, layers, final LayerNorm `ln1`."""

    def __init__(
        self, cfg: PlainMambaConfig, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ):
        super().__init__()
        kw = {"device": device, "dtype": dtype}
        self.grid = cfg.grid
        self.patch_embed = ConvPatchEmbed(cfg, **kw)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches, cfg.embed_dim, **kw))
        rates = torch.linspace(0, cfg.drop_path_rate, cfg.depth).tolist()
        self.layers = nn.ModuleList(
            PlainMambaLayer(cfg, rate, i in cfg.dwconv_layers, **kw) for i, rate in enumerate(rates)
        )
        self.ln1 = nn.LayerNorm(cfg.embed_dim, eps=cfg.final_norm_eps, **kw)

    def embed(self, images: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens plus pos_embed, resampled (bicubic, as mmcls `resize_pos_embed`) when the grid differs."""
        x, grid = self.patch_embed(images)
        pos = resample_abs_pos_embed(
            self.pos_embed, grid, old_grid=self.grid, num_prefix_tokens=0, interpolation="bicubic", antialias=False
        )
        return x + pos, grid


class LinearClsHead(nn.Module):
    """mmcls LinearClsHead: keys `head.fc.*`."""

    def __init__(
        self, dim: int, num_classes: int, device: torch.device | str | None = None, dtype: torch.dtype | None = None
    ):
        super().__init__()
        self.fc = nn.Linear(dim, num_classes, device=device, dtype=dtype)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.fc(pooled)


class PlainMamba(nn.Module):
    """PlainMamba classifier: backbone, mean of every token after `ln1` (upstream's CustomAveragePooling), head.

    `PlainMamba(cfg, device="meta")` allocates nothing and skips init: use it to read the key/shape table.
    """

    def __init__(
        self,
        cfg: PlainMambaConfig,
        *,
        seed: int | torch.Generator | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ):
        super().__init__()
        self.cfg = cfg
        kw = {"device": device, "dtype": dtype}
        self.backbone = PlainMambaBackbone(cfg, **kw)
        self.head = LinearClsHead(cfg.embed_dim, cfg.num_classes, **kw) if cfg.num_classes > 0 else nn.Identity()
        if self.backbone.pos_embed.device.type != "meta":
            self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | torch.Generator | None = None) -> None:
        """Upstream's effective init (module constructors, then mmcls `init_weights`), reproducible by seed.

        Convs keep PyTorch's default init and BatchNorm 1/0; every Linear is TN(0.02) with zero bias (the classifier's
        init_cfg), then head.fc N(0, 0.01) (LinearClsHead's); pos_embed and direction_Bs TN(0.02); A_log log(1..N);
        D 1; dt_proj per `cfg.dt_init`. Draws happen on the CPU from one generator, so a seed gives the same model on
        any device.
        """
        cfg = self.cfg
        gen = seeded_generator(seed)
        backbone = self.backbone
        for module in backbone.patch_embed.modules():
            _default_init(module, gen)
        init_on_cpu_(backbone.pos_embed, nn.init.trunc_normal_, gen, std=0.02)
        for layer in backbone.layers:
            for module in layer.modules():
                _default_init(module, gen)
            _init_mixer(layer.mamba, cfg, gen)
        backbone.ln1.reset_parameters()
        if isinstance(self.head, LinearClsHead):
            init_on_cpu_(self.head.fc.weight, nn.init.normal_, gen, std=0.01)
            self.head.fc.bias.zero_()

    def token_layout(self) -> TokenLayout:
        return self.cfg.token_layout()

    def scan_orders(
        self, device: torch.device | str | None = None, grid: tuple[int, int] | None = None
    ) -> dict[str, torch.Tensor]:
        """Per direction, the token (raster index) visited at each scan step, on the config's grid unless given."""
        plan = scan_plan(tuple(grid or self.cfg.grid), torch.device(device if device is not None else "cpu"))
        return {name: plan.orders[i].clone() for i, name in enumerate(DIRECTIONS)}  # clones: the plan is shared

    def no_weight_decay(self) -> set[str]:
        """Upstream's decay_mult=0 custom keys: pos_embed, A_log, D, direction_Bs (norms and biases are 1-D anyway)."""
        return {
            n
            for n, _ in self.named_parameters()
            if n == "backbone.pos_embed" or n.rsplit(".", 1)[-1] in ("A_log", "D", "direction_Bs")
        }

    def forward_all(self, images: torch.Tensor, *, return_directions: bool = False) -> MambaOutput:
        """One pass returning logits, final normed tokens, the residual stream per layer, optional scan outputs.

        `directions[layer][name]` is (B, L, E): that zig-zag scan's selective-scan output y_k (D-skip included, not
        yet summed with the others nor gated by silu(z)) with step j at index j, i.e. token `scan_orders()[name][j]`.
        """
        x, grid = self.backbone.embed(images)
        plan = scan_plan(grid, x.device)
        layer_tokens: list[torch.Tensor] = []
        directions: list[dict[str, torch.Tensor]] = []
        for layer in self.backbone.layers:
            x, scans = layer(x, grid, plan, return_directions=return_directions)
            layer_tokens.append(x)
            if return_directions:
                directions.append(scans)
        final_tokens = self.backbone.ln1(x)
        return MambaOutput(
            logits=self.head(final_tokens.mean(dim=1)),
            final_tokens=final_tokens,
            layer_tokens=layer_tokens,
            directions=directions if return_directions else None,
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x, grid = self.backbone.embed(images)
        plan = scan_plan(grid, x.device)
        for layer in self.backbone.layers:
            x, _ = layer(x, grid, plan)
        return self.head(self.backbone.ln1(x).mean(dim=1))


@torch.no_grad()
def _default_init(module: nn.Module, gen: torch.Generator | None) -> None:
    """PyTorch's own init for convs (kaiming-uniform a=sqrt(5), bias U(+-1/sqrt(fan_in))) and BatchNorm / LayerNorm,
    which upstream never re-initialises (mmcls's init_cfg covers Linear and LayerNorm, both set as PyTorch would)."""
    if isinstance(module, nn.Conv2d):
        init_on_cpu_(module.weight, nn.init.kaiming_uniform_, gen, a=math.sqrt(5))
        if module.bias is not None:
            bound = 1.0 / math.sqrt(module.weight[0].numel())
            init_on_cpu_(module.bias, nn.init.uniform_, gen, a=-bound, b=bound)
    elif isinstance(module, (nn.BatchNorm2d, nn.LayerNorm)):
        module.reset_parameters()


@torch.no_grad()
def _init_mixer(mixer: PlainMamba2D, cfg: PlainMambaConfig, gen: torch.Generator | None) -> None:
    """Linear layers as mmcls leaves them (TN(0.02), zero bias), S4D-real A, D = 1, dt_proj per `cfg.dt_init`."""
    for linear in (mixer.in_proj, mixer.x_proj, mixer.out_proj):
        init_on_cpu_(linear.weight, nn.init.trunc_normal_, gen, std=0.02)
        if linear.bias is not None:
            linear.bias.zero_()
    if cfg.dt_init == "mmcls":
        init_on_cpu_(mixer.dt_proj.weight, nn.init.trunc_normal_, gen, std=0.02)
        mixer.dt_proj.bias.zero_()
    else:
        bound = cfg.resolved_dt_rank**-0.5 * cfg.dt_scale
        init_on_cpu_(mixer.dt_proj.weight, nn.init.uniform_, gen, a=-bound, b=bound)
        mixer.dt_proj.bias.copy_(_dt_bias(cfg, torch.promote_types(mixer.dt_proj.bias.dtype, torch.float32), gen))
    a_row = torch.log(torch.arange(1, cfg.d_state + 1, dtype=torch.promote_types(mixer.A_log.dtype, torch.float32)))
    mixer.A_log.copy_(a_row.expand(cfg.d_inner, cfg.d_state))
    mixer.D.fill_(1.0)
    init_on_cpu_(mixer.direction_Bs, nn.init.trunc_normal_, gen, std=0.02)


def _dt_bias(cfg: PlainMambaConfig, dtype: torch.dtype, gen: torch.Generator | None) -> torch.Tensor:
    """Inverse softplus of dt ~ log-uniform[dt_min, dt_max] floored at dt_init_floor: softplus(bias) == dt."""
    log_min, log_max = math.log(cfg.dt_min), math.log(cfg.dt_max)
    dt = torch.exp(torch.rand(cfg.d_inner, generator=gen, dtype=dtype) * (log_max - log_min) + log_min)
    dt = dt.clamp(min=cfg.dt_init_floor)
    return dt + torch.log(-torch.expm1(-dt))


register_family("plainmamba", PlainMambaConfig, PlainMamba)
# ChenhongyiYang/PlainMamba arch_zoo L1 / L2 / L3 (plain_mamba_l{1,2,3}_in1k_300e.py)
register("plainmamba-l1", PlainMambaConfig(embed_dim=192, depth=24, num_convs=1, dwconv_layers=(0,)))
register("plainmamba-l2", PlainMambaConfig(embed_dim=384, depth=24, num_convs=2, dwconv_layers=()))
register("plainmamba-l3", PlainMambaConfig(embed_dim=448, depth=36, num_convs=2, dwconv_layers=()))
