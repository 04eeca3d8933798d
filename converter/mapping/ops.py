"""The closed vocabulary of tensor operations a mapping file may use.

Each op is a pure function of one tensor and concrete arguments, and works the same on `meta` tensors: `tmconvert
check` and `--dry-run` propagate shapes by running exactly these functions on meta tensors, so a shape that checks
is a shape that converts. Every op also declares its effect (`OpSpec`): whether a call picks a subset or changes
values (what makes a target tensor "subcloned" rather than "inherited"), which source entries its output reads (the
plan's usage report), and which of its arguments name index sets; the planner asks the op, never its name.
`OPS` is the registry the mapping schema validates against; an op's YAML arguments are a
small pydantic model whose values may be literals, references to the source / target configuration
(``source.embed_dim``, ``target.grid``) or names of index sets, and `resolve` turns them into the concrete keyword
arguments of the function (a plan does this once per target tensor).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from tmconvert.models.tokens import resample_abs_pos_embed
from tmconvert.models.videomamba import INFLATE_MODES, inflate_image_kernel

# A configuration reference: `source.<field>` or `target.<field>`; resolved against the actual configs.
REF_PATTERN = r"^(source|target)\.[a-z_][a-z0-9_]*$"


class ResolveContext(Protocol):
    """What an op needs from the plan to turn its YAML arguments into concrete values."""

    def ref(self, value: Any) -> Any:
        """A literal unchanged, or the value of a `source.x` / `target.x` reference."""

    def index(self, set_name: str) -> torch.Tensor:
        """The chosen (sorted) indices of a named index set, for the block being converted."""

    def set_full(self, set_name: str) -> int:
        """The width of the teacher axis a named index set chooses from."""

    def set_ratio(self, set_name: str) -> float:
        """full / kept width of a named index set."""

    def source(self, name: str) -> torch.Tensor:
        """Another source tensor (float32; meta while planning), by its bound name."""


class _Args(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)

    def resolve(self, ctx: ResolveContext) -> dict[str, Any]:
        raise NotImplementedError


IntRef = int | str
GridRef = tuple[int, int] | list[int] | int | str


def _as_grid(value: Any, what: str) -> tuple[int, int]:
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, (tuple, list)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return (int(value[0]), int(value[1]))
    raise ValueError(f"{what} must be an int or a pair of ints, got {value!r}")


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be an integer, got {value!r}")
    return value


# ---------------------------------------------------------------------------------------------------------------
# The functions: pure, tensor in, tensor out, meta-safe.


def select(tensor: torch.Tensor, *, dim: int, index: torch.Tensor, full: int) -> torch.Tensor:
    """Keep the entries at `index` (sorted, chosen by the subcloning engine) of a `full`-wide axis `dim`."""
    if not -tensor.dim() <= dim < tensor.dim():
        raise ValueError(f"dim {dim} out of range for a {tensor.dim()}-d tensor")
    if tensor.shape[dim] != full:
        raise ValueError(f"dim {dim} has {tensor.shape[dim]} entries but the index set chooses among {full}")
    return tensor.index_select(dim, index.to(tensor.device) if tensor.device.type != "meta" else index)


def split_qkv(tensor: torch.Tensor, *, part: int) -> torch.Tensor:
    """One of the three row blocks of a fused timm `attn.qkv` weight (3D x D) or bias (3D): 0 = Q, 1 = K, 2 = V."""
    if tensor.shape[0] % 3:
        raise ValueError(f"a fused qkv tensor needs a first dim divisible by 3, got {tuple(tensor.shape)}")
    rows = tensor.shape[0] // 3
    return tensor.narrow(0, part * rows, rows)


def transpose(tensor: torch.Tensor, *, dims: tuple[int, int]) -> torch.Tensor:
    return tensor.transpose(*dims).contiguous()


def move_token(tensor: torch.Tensor, *, src: int, dst: int | Literal["middle"], dim: int = 1) -> torch.Tensor:
    """Move the token at `src` to `dst` along the token axis; `middle` is P // 2 with P the other tokens' count.

    ViM inserts its cls token at index P // 2 of the patch sequence (after patch P//2 - 1); a DeiT position
    embedding has it at index 0, so `move_token(src=0, dst=middle)` reorders `pos_embed` for ViM.
    """
    length = tensor.shape[dim]
    src = src % length
    dst = (length - 1) // 2 if dst == "middle" else dst % length
    order = [i for i in range(length) if i != src]
    order.insert(dst, src)
    return tensor.index_select(dim, torch.tensor(order, dtype=torch.long))


def concat(pieces: Sequence[torch.Tensor], dim: int) -> torch.Tensor:
    """`torch.cat` that costs the same on `meta` tensors as on real ones.

    Plans run every op on meta tensors, and `torch.cat` there goes through a Python decomposition that imports
    `torch._dynamo` (about a second). Allocating the result and copying the pieces in avoids it.
    """
    first = pieces[0]
    dim = dim % first.dim()
    for piece in pieces[1:]:
        if piece.dim() != first.dim() or any(piece.shape[d] != first.shape[d] for d in range(first.dim()) if d != dim):
            shapes = ", ".join(str(tuple(p.shape)) for p in pieces)
            raise RuntimeError(f"cannot concatenate {shapes} along dim {dim}")
    dtype = functools.reduce(torch.promote_types, (p.dtype for p in pieces))
    shape = list(first.shape)
    shape[dim] = sum(p.shape[dim] for p in pieces)
    out = torch.empty(shape, dtype=dtype, device=first.device)
    offset = 0
    for piece in pieces:
        out.narrow(dim, offset, piece.shape[dim]).copy_(piece)
        offset += piece.shape[dim]
    return out


def keep_prefix(tensor: torch.Tensor, *, prefix: int, keep: int, dim: int = 1) -> torch.Tensor:
    """Make the `prefix` leading tokens `keep` long: keep the first `keep` (cls, dist, patches -> cls, patches), or,
    when there are fewer, put zero slots in front (a position embedding without a cls slot gets one that adds
    nothing: DeiT-III and timm's DINOv2 with registers fold the cls position into the token itself)."""
    if tensor.shape[dim] < prefix:
        raise ValueError(f"a sequence of {tensor.shape[dim]} tokens has no {prefix} prefix tokens")
    rest = tensor.narrow(dim, prefix, tensor.shape[dim] - prefix)
    if keep <= prefix:
        return concat([tensor.narrow(dim, 0, keep), rest], dim=dim)
    pad_shape = list(tensor.shape)
    pad_shape[dim] = keep - prefix
    return concat([tensor.new_zeros(pad_shape), tensor.narrow(dim, 0, prefix), rest], dim=dim)


def resample_grid(
    tensor: torch.Tensor, *, prefix: int, src_grid: tuple[int, int], dst_grid: tuple[int, int]
) -> torch.Tensor:
    """Resample a (1, prefix + H*W, C) position embedding to another patch grid (bicubic, antialiased, as timm)."""
    expected = prefix + src_grid[0] * src_grid[1]
    if tensor.dim() != 3 or tensor.shape[1] != expected:
        raise ValueError(
            f"resample_grid expects (1, {prefix} + {src_grid[0]}*{src_grid[1]}, C), got {tuple(tensor.shape)}"
        )
    return resample_abs_pos_embed(tensor, tuple(dst_grid), tuple(src_grid), num_prefix_tokens=prefix)


def resample_kernel(tensor: torch.Tensor, *, size: tuple[int, int]) -> torch.Tensor:
    """Resample a patch-embedding kernel (D, C, h, w) to (D, C, *size), preserving the patch projection.

    FlexiViT's pseudo-inverse resize: with R the (bilinear, antialiased) resize of a patch from (h, w) to `size`,
    the new kernel w' solves <x, w> = <R x, w'> in the least-squares sense, w' = pinv(R^T) w; an upsampled image
    then yields the embedding the original kernel gave the original image.
    """
    if tensor.dim() != 4:
        raise ValueError(f"resample_kernel expects a (D, C, h, w) kernel, got {tuple(tensor.shape)}")
    old = (tensor.shape[-2], tensor.shape[-1])
    if tuple(old) == tuple(size):
        return tensor
    if tensor.device.type == "meta":
        return tensor.new_empty((*tensor.shape[:2], *size))
    basis = torch.eye(old[0] * old[1], dtype=torch.float32).reshape(-1, 1, *old)
    resize = F.interpolate(basis, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
    resize_matrix = resize.reshape(old[0] * old[1], -1).T  # (new_hw, old_hw): flattened patch -> resized patch
    pinv = torch.linalg.pinv(resize_matrix.T.double()).float()  # (new_hw, old_hw)
    flat = tensor.float().reshape(-1, old[0] * old[1])
    return (flat @ pinv.T).reshape(*tensor.shape[:2], *size).to(tensor.dtype)


def inflate_time(tensor: torch.Tensor, *, frames: int, mode: str) -> torch.Tensor:
    """A 2-D patch kernel (D, C, h, w) as a 3-D tubelet kernel (D, C, frames, h, w) (VideoMamba's `inflate_weight`).

    `center`: the kernel in the middle time slice, zeros elsewhere; `average`: repeated over time / frames. Either
    way a clip of identical frames gets exactly the image's patch embedding; they differ on frames that differ.
    """
    if tensor.dim() != 4:
        raise ValueError(f"inflate_time expects a (D, C, h, w) kernel, got {tuple(tensor.shape)}")
    if frames <= 0:
        raise ValueError(f"inflate_time needs frames >= 1, got {frames}")
    if tensor.device.type == "meta":
        return tensor.new_empty((*tensor.shape[:2], frames, *tensor.shape[2:]))
    return inflate_image_kernel(tensor, frames, mode)


def _subpixel(k: int, in_chans: int) -> tuple[int, int, int, int]:
    """Channel k of a `space_to_depth` stem: (sign, input channel, row offset, column offset) of what it passes."""
    k %= 8 * in_chans
    sign, rest = (1, k) if k < 4 * in_chans else (-1, k - 4 * in_chans)
    return sign, rest // 4, (rest % 4) // 2, rest % 2


def space_to_depth(tensor: torch.Tensor, *, channels: int, kernel: int | None = None) -> torch.Tensor:
    """A patch kernel (D, C, p, p) re-expressed for a conv (kernel = stride = p/2, `channels` inputs) that reads the
    output of a `space_to_depth` stem: the same patch embedding, computed from the stem's sub-pixel channels.

    Stem channel k < 8C carries sign * pixel (c, 2y + a, 2x + b) after ReLU (sign +1 for k < 4C, -1 after), so the
    kernel's entry (d, k, u, v) is sign * W[d, c, 2u + a, 2v + b]: the + and - halves add up to W x. Channels from 8C
    on repeat the pattern in the stem and get zero weight here, so each pixel counts once. `kernel`: the conv is a
    larger K x K one with padding K // 2 and the same stride (VMamba's 3x3 stride-2 conv for p = 4), so the p/2 x p/2
    kernel sits at taps K // 2 on, zeros around it.
    """
    if tensor.dim() != 4 or tensor.shape[-1] % 2 or tensor.shape[-2] % 2:
        raise ValueError(f"space_to_depth expects a (D, C, p, p) kernel with an even patch, got {tuple(tensor.shape)}")
    out_dim, in_chans, height, width = tensor.shape
    if channels < 8 * in_chans:
        raise ValueError(f"a space_to_depth stem for {in_chans} image channels needs {8 * in_chans}, got {channels}")
    size = (height // 2, width // 2) if kernel is None else (kernel, kernel)
    if kernel is not None and kernel // 2 + max(height, width) // 2 > kernel:
        raise ValueError(f"a {height}x{width} patch over a stride-2 stem does not fit a {kernel}x{kernel} kernel")
    if tensor.device.type == "meta":
        return tensor.new_empty((out_dim, channels, *size))
    out = tensor.new_zeros((out_dim, channels, *size))
    at = 0 if kernel is None else kernel // 2
    for k in range(8 * in_chans):
        sign, c, a, b = _subpixel(k, in_chans)
        out[:, k, at : at + height // 2, at : at + width // 2] = sign * tensor[:, c, a::2, b::2]
    return out


def spread_kernel(tensor: torch.Tensor, *, size: int, span: int) -> torch.Tensor:
    """A matrix (O, I) as a size x size conv kernel (O, I, size, size) that averages the span x span taps from
    size // 2 on: with stride `span` and padding size // 2 (VMamba's 3x3 stride-2 patch merging, span 2) each output
    token is the matrix applied to the mean of the span x span block of input tokens it covers."""
    if tensor.dim() != 2:
        raise ValueError(f"spread_kernel expects a matrix (out, in), got {tuple(tensor.shape)}")
    at = size // 2
    if span <= 0 or at + span > size:
        raise ValueError(f"a {span}x{span} window from tap {at} does not fit a {size}x{size} kernel")
    if tensor.device.type == "meta":
        return tensor.new_empty((*tensor.shape, size, size))
    out = tensor.new_zeros((*tensor.shape, size, size))
    out[..., at : at + span, at : at + span] = (tensor / span**2)[..., None, None]
    return out


def scale_by(tensor: torch.Tensor, *, factor: torch.Tensor, dim: int) -> torch.Tensor:
    """Multiply each entry along `dim` by the matching entry of the 1-D `factor` (folds LayerScale into a matrix:
    `diag(gamma) @ W` is `scale_by(W, factor=gamma, dim=0)`)."""
    if not -tensor.dim() <= dim < tensor.dim():
        raise ValueError(f"dim {dim} out of range for a {tensor.dim()}-d tensor")
    if factor.dim() != 1 or factor.shape[0] != tensor.shape[dim]:
        raise ValueError(
            f"a factor of shape {tuple(factor.shape)} cannot scale the {tensor.shape[dim]} entries of dim {dim}"
        )
    shape = [1] * tensor.dim()
    shape[dim] = -1
    return tensor.clone().mul_(factor.reshape(shape).to(tensor.dtype))


def scale(tensor: torch.Tensor, *, factor: float) -> torch.Tensor:
    # clone + in-place multiply: the out-of-place `tensor * factor` on meta tensors (plans) imports torch._dynamo
    return tensor.clone().mul_(factor)


# ---------------------------------------------------------------------------------------------------------------
# The YAML arguments of each op.


class SelectArgs(_Args):
    dim: int
    set: str = Field(description="name of an index set declared under `index_sets`")

    def resolve(self, ctx: ResolveContext) -> dict[str, Any]:
        return {"dim": self.dim, "index": ctx.index(self.set), "full": ctx.set_full(self.set)}


class SplitQkvArgs(_Args):
    part: Literal["q", "k", "v"]

    def resolve(self, ctx: ResolveContext) -> dict[str, Any]:
        return {"part": "qkv".index(self.part)}


class TransposeArgs(_Args):
    dims: tuple[int, int]

    def resolve(self, ctx: ResolveContext) -> dict[str, Any]:
        return {"dims": self.dims}


class MoveTokenArgs(_Args):
    src: int = Field(alias="from")
    dst: IntRef = Field(alias="to", description="an index, `middle`, or a config reference")
    dim: int = 1

    def resolve(self, ctx: ResolveContext) -> dict[str, Any]:
        dst = self.dst if self.dst == "middle" else _as_int(ctx.ref(self.dst), "move_token.to")
        return {"src": self.src, "dst": dst, "dim": self.dim}


class KeepPrefixArgs(_Args):
    prefix: IntRef
    keep: IntRef
    dim: int = 1

    def resolve(self, ctx: ResolveContext) -> dict[str, Any]:
        return {
            "prefix": _as_int(ctx.ref(self.prefix), "keep_prefix.prefix"),
            "keep": _as_int(ctx.ref(self.keep), "keep_prefix.keep"),
            "dim": self.dim,
        }


class ResampleGridArgs(_Args):
    prefix: IntRef
    src_grid: GridRef = Field(alias="from")
    dst_grid: GridRef = Field(alias="to")

    def resolve(self, ctx: ResolveContext) -> dict[str, Any]:
        return {
            "prefix": _as_int(ctx.ref(self.prefix), "resample_grid.prefix"),
            "src_grid": _as_grid(ctx.ref(self.src_grid), "resample_grid.from"),
            "dst_grid": _as_grid(ctx.ref(self.dst_grid), "resample_grid.to"),
        }


class ResampleKernelArgs(_Args):
    size: GridRef = Field(alias="to")

    def resolve(self, ctx: ResolveContext) -> dict[str, Any]:
        return {"size": _as_grid(ctx.ref(self.size), "resample_kernel.to")}


class InflateTimeArgs(_Args):
    frames: IntRef = Field(description="the tubelet's frames, e.g. target.tubelet")
    mode: Literal[INFLATE_MODES] = Field(description="center: the middle frame; average: all frames / frames")

    def resolve(self, ctx: ResolveContext) -> dict[str, Any]:
        return {"frames": _as_int(ctx.ref(self.frames), "inflate_time.frames"), "mode": self.mode}


class SpaceToDepthArgs(_Args):
    channels: IntRef = Field(description="the stem's width, e.g. target.stem_channels")
    kernel: IntRef | None = Field(None, description="a K x K conv (padding K // 2) instead of kernel = stride")

    def resolve(self, ctx: ResolveContext) -> dict[str, Any]:
        kernel = None if self.kernel is None else _as_int(ctx.ref(self.kernel), "space_to_depth.kernel")
        return {"channels": _as_int(ctx.ref(self.channels), "space_to_depth.channels"), "kernel": kernel}


class SpreadKernelArgs(_Args):
    size: IntRef = Field(description="the conv's kernel size K (padding K // 2)")
    span: IntRef = Field(description="its stride: the window of input tokens each output token averages")

    def resolve(self, ctx: ResolveContext) -> dict[str, Any]:
        return {
            "size": _as_int(ctx.ref(self.size), "spread_kernel.size"),
            "span": _as_int(ctx.ref(self.span), "spread_kernel.span"),
        }


class ScaleByArgs(_Args):
    by: str = Field(description="a source tensor name (may use {layer} / {block}), 1-D")
    dim: int

    def resolve(self, ctx: ResolveContext) -> dict[str, Any]:
        return {"factor": ctx.source(self.by), "dim": self.dim}


class ScaleArgs(_Args):
    factor: float | None = None
    sqrt_ratio: str | None = Field(default=None, description="index set name: multiply by sqrt(full / kept)")

    @model_validator(mode="after")
    def _one_of(self) -> ScaleArgs:
        if (self.factor is None) == (self.sqrt_ratio is None):
            raise ValueError("scale takes either a number or {sqrt_ratio: <index set>}")
        return self

    def resolve(self, ctx: ResolveContext) -> dict[str, Any]:
        if self.factor is not None:
            return {"factor": float(self.factor)}
        return {"factor": math.sqrt(ctx.set_ratio(self.sqrt_ratio))}

    @field_validator("factor")
    @classmethod
    def _finite(cls, value: float | None) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError("scale factor must be finite")
        return value


Subclones = Callable[[dict[str, Any], torch.Tensor, torch.Tensor], bool]


def _never(_kwargs: dict[str, Any], _before: torch.Tensor, _after: torch.Tensor) -> bool:
    return False


def _drops_entries(_kwargs: dict[str, Any], before: torch.Tensor, after: torch.Tensor) -> bool:
    return after.numel() < before.numel()


def _always(_kwargs: dict[str, Any], _before: torch.Tensor, _after: torch.Tensor) -> bool:
    return True


def _factor_not_one(kwargs: dict[str, Any], _before: torch.Tensor, _after: torch.Tensor) -> bool:
    return kwargs["factor"] != 1.0


def _shape_changes(_kwargs: dict[str, Any], before: torch.Tensor, after: torch.Tensor) -> bool:
    return tuple(after.shape) != tuple(before.shape)


def _averages_frames(kwargs: dict[str, Any], _before: torch.Tensor, _after: torch.Tensor) -> bool:
    return kwargs["mode"] == "average" and kwargs["frames"] > 1


@dataclass(frozen=True)
class OpSpec:
    """One op of the vocabulary: its YAML arguments, its function, and its declared effect.

    `subclones(kwargs, before, after)`: whether this call picked a strict subset of entries or changed values (the
    plan's "subcloned" kind); a pure re-layout (transpose, a fixed Q/K/V part, moving a token) does not.
    `reads`: which entries of its input the output is made of, for the plan's usage report: `moved` (the op's own
    output, run on element ids, says which), `same` (every output entry is its input entry, values changed) or
    `all` (outputs mix many inputs, e.g. resampling). `set_fields`: the arguments that name an index set;
    `source_fields`: the arguments that name another source tensor (read whole, bound like `from:`).
    """

    name: str
    args: type[_Args]
    fn: Callable[..., torch.Tensor]
    shorthand: str | None  # `op: value` fills this argument (e.g. `split_qkv: v`, `scale: 0.5`)
    summary: str
    subclones: Subclones = _never
    reads: Literal["moved", "same", "all"] = "moved"
    set_fields: tuple[str, ...] = ()
    source_fields: tuple[str, ...] = ()


OPS: dict[str, OpSpec] = {
    spec.name: spec
    for spec in (
        OpSpec(
            "select",
            SelectArgs,
            select,
            None,
            "keep the entries of a named index set along a dim",
            subclones=_drops_entries,
            set_fields=("set",),
        ),
        OpSpec("split_qkv", SplitQkvArgs, split_qkv, "part", "Q, K or V rows of a fused qkv tensor"),
        OpSpec("transpose", TransposeArgs, transpose, "dims", "swap two dims"),
        OpSpec("move_token", MoveTokenArgs, move_token, None, "move one token position (cls to the middle)"),
        OpSpec("keep_prefix", KeepPrefixArgs, keep_prefix, None, "keep or zero-pad the prefix slots (dist, no cls)"),
        OpSpec(
            "resample_grid",
            ResampleGridArgs,
            resample_grid,
            None,
            "resample a position grid",
            subclones=_shape_changes,
            reads="all",
        ),
        OpSpec(
            "resample_kernel",
            ResampleKernelArgs,
            resample_kernel,
            "size",
            "resample a patch kernel",
            subclones=_shape_changes,
            reads="all",
        ),
        OpSpec(
            "inflate_time",
            InflateTimeArgs,
            inflate_time,
            None,
            "2-D patch kernel -> 3-D tubelet kernel (center or average over its frames)",
            subclones=_averages_frames,
            reads="all",
        ),
        OpSpec(
            "space_to_depth",
            SpaceToDepthArgs,
            space_to_depth,
            "channels",
            "patch kernel -> the projection after a `space_to_depth` stem (same embedding)",
            reads="all",
        ),
        OpSpec(
            "spread_kernel",
            SpreadKernelArgs,
            spread_kernel,
            None,
            "matrix -> a strided conv kernel averaging the window each output token covers (patch merging)",
            subclones=_always,
            reads="all",
        ),
        OpSpec(
            "scale_by",
            ScaleByArgs,
            scale_by,
            None,
            "multiply along a dim by another (1-D) source tensor, e.g. fold LayerScale",
            subclones=_always,
            reads="same",
            source_fields=("by",),
        ),
        OpSpec(
            "scale",
            ScaleArgs,
            scale,
            "factor",
            "multiply by a number or sqrt(full/kept) of a set",
            subclones=_factor_not_one,
            reads="same",
            set_fields=("sqrt_ratio",),
        ),
    )
}


# ---------------------------------------------------------------------------------------------------------------
# Initialisers (`init: <name>`): a whole target tensor made from its shape alone.


def _constant(value: float) -> Callable[[tuple[int, ...], str], torch.Tensor]:
    return lambda shape, device: torch.full(shape, value, device=device)


def _kernel_shape(name: str, shape: tuple[int, ...]) -> None:
    if len(shape) < 3:
        raise ValueError(f"{name} needs a conv kernel (out, in, taps...), got shape {shape}")


def conv_identity(shape: tuple[int, ...], device: str) -> torch.Tensor:
    """A causal depthwise kernel that passes its input through: last tap 1, others 0."""
    _kernel_shape("conv_identity", shape)
    tensor = torch.zeros(shape, device=device)
    tensor[..., -1] = 1.0
    return tensor


def dirac(shape: tuple[int, ...], device: str) -> torch.Tensor:
    """A same-padded conv that passes its input through: output channel k reads input channel k (its own channel in
    a depthwise kernel) at the centre tap, with weight 1."""
    _kernel_shape("dirac", shape)
    if any(size % 2 == 0 for size in shape[2:]):
        raise ValueError(f"dirac needs odd kernel sizes (a centre tap), got shape {shape}")
    tensor = torch.zeros(shape, device=device)
    if device == "meta":
        return tensor
    centre = tuple(size // 2 for size in shape[2:])
    for k in range(shape[0] if shape[1] == 1 else min(shape[0], shape[1])):
        tensor[(k, 0 if shape[1] == 1 else k, *centre)] = 1.0
    return tensor


def space_to_depth_stem(shape: tuple[int, ...], device: str) -> torch.Tensor:
    """A stride-2 stem kernel (S, C, K, K), padding K // 2, whose channel k passes one pixel of each 2x2 block:
    sign * pixel (c, 2y + a, 2x + b) by `_subpixel(k)` (a ReLU after it keeps the + half in channels < 4C and the -
    half up to 8C; the pattern repeats over the remaining channels, so none is dead). The projection made by the
    `space_to_depth` op then computes the teacher's patch embedding exactly (BatchNorm at its init is the identity)."""
    if len(shape) != 4 or shape[2] != shape[3] or shape[2] < 3:
        raise ValueError(f"space_to_depth needs a square stem kernel (S, C, K, K), K >= 3, got shape {shape}")
    tensor = torch.zeros(shape, device=device)
    if device == "meta":
        return tensor
    centre = shape[2] // 2
    for k in range(shape[0]):
        sign, c, a, b = _subpixel(k, shape[1])
        tensor[k, c, centre + a, centre + b] = float(sign)
    return tensor


@dataclass(frozen=True)
class InitSpec:
    """A named initialiser: `fn(shape, device)` makes the whole target tensor; `default` has none (the target
    model's own upstream init, seeded, comes from the engine)."""

    name: str
    fn: Callable[[tuple[int, ...], str], torch.Tensor] | None
    summary: str


INITS: dict[str, InitSpec] = {
    spec.name: spec
    for spec in (
        InitSpec("default", None, "the target model's upstream initialisation (seeded by --seed)"),
        InitSpec("zeros", _constant(0.0), "all zeros (a zero out_proj makes a layer an identity)"),
        InitSpec("ones", _constant(1.0), "all ones"),
        InitSpec("conv_identity", conv_identity, "causal depthwise kernel passing its input through (last tap 1)"),
        InitSpec("dirac", dirac, "same-padded conv passing its input through (centre tap 1 per channel)"),
        InitSpec("space_to_depth", space_to_depth_stem, "stride-2 stem passing each 2x2 block's pixels, + and -"),
    )
}


def parse_op(raw: Any) -> tuple[OpSpec, _Args]:
    """Validate one YAML op (a one-key mapping `{name: args}`); raises ValueError with a readable message."""
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ValueError(f"an op is a one-key mapping like {{select: {{dim: 0, set: residual}}}}, got {raw!r}")
    ((name, args),) = raw.items()
    spec = OPS.get(name)
    if spec is None:
        raise ValueError(f"unknown op {name!r}; the vocabulary is: {', '.join(OPS)}")
    if not isinstance(args, dict):
        if spec.shorthand is None:
            raise ValueError(f"op {name!r} needs a mapping of arguments, got {args!r}")
        field = spec.args.model_fields[spec.shorthand]
        args = {field.alias or spec.shorthand: args}
    return spec, spec.args.model_validate(args)
