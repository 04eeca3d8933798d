"""The interpreter of the mapping language: rules bound to one target tensor, and their evaluation.

`bind` fills a rule's `{layer}` / `{block}` placeholders and turns it into a tree of nodes (a source tensor with an
op chain, an initialiser, a fitted tensor, a concat). `evaluate` computes the tensor a tree produces for one target
region: on `meta` tensors when planning and checking (shapes only), on real tensors when converting; every op chain
runs through `apply_chain`, which the plan also uses to trace which source entries an output reads and whether it
subclones.
Problems are raised as `RuleError`s carrying the YAML path of the rule part that failed.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from tmconvert.converter.mapping.fits import FITS
from tmconvert.converter.mapping.ops import INITS, OpSpec, concat
from tmconvert.converter.mapping.schema import (
    ConcatExpr,
    EyeExpr,
    FitExpr,
    FromExpr,
    InitExpr,
    OpCall,
    fill_template,
    is_ref,
)


class RuleError(Exception):
    """A problem at one YAML path of the mapping (the planner collects them into problems)."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path
        self.message = message


@dataclass(frozen=True)
class SourceNode:
    name: str
    ops: tuple[OpCall, ...]
    path: str
    size: Any = None


@dataclass(frozen=True)
class EyeNode:
    """The n x n identity (n may be a config reference) and an op chain: a channel map, no teacher values."""

    n: Any
    ops: tuple[OpCall, ...]
    path: str
    size: Any = None

    @property
    def name(self) -> str:
        return f"eye({self.n})"


@dataclass(frozen=True)
class InitNode:
    init: str
    path: str
    size: Any = None


@dataclass(frozen=True)
class FitNode:
    """A tensor fitted to teacher block `block`'s sub-layer; `sources` are what the fit reads there."""

    fit: str
    block: int | None
    sources: tuple[str, ...]
    path: str
    size: Any = None


@dataclass(frozen=True)
class ConcatNode:
    dim: int
    parts: tuple[Node, ...]
    path: str
    size: Any = None


Node = SourceNode | EyeNode | InitNode | FitNode | ConcatNode


def describe(node: Node, resolve: Callable[[Any], Any] | None = None) -> str:
    """One-line human form: `blocks.0.mlp.fc1.weight | select(dim=0, set=hidden) | ...`, `init:default`, `cat0[...]`.

    With `resolve`, config references in op arguments show their values.
    """
    if isinstance(node, (SourceNode, EyeNode)):
        head = node.name
        if isinstance(node, EyeNode) and resolve is not None and is_ref(node.n):
            with contextlib.suppress(ValueError):
                head = f"eye({resolve(node.n)})"
        return " | ".join([head, *(op.describe(resolve) for op in node.ops)])
    if isinstance(node, InitNode):
        return f"init:{node.init}"
    if isinstance(node, FitNode):
        return f"fit:{node.fit}(block {node.block})"
    return f"cat{node.dim}[" + " ; ".join(describe(p, resolve) for p in node.parts) + "]"


def node_sources(node: Node) -> list[str]:
    """Every source tensor an expression reads: each `from:` and the tensors its ops name."""
    return [name for name, _ in source_paths(node)]


def source_paths(node: Node) -> list[tuple[str, str]]:
    """(source tensor, YAML path that names it) for every source an expression reads."""
    if isinstance(node, (SourceNode, EyeNode)):
        named_by_ops = [(s, f"{node.path}.ops[{i}]") for i, op in enumerate(node.ops) for s in op.referenced_sources()]
        own = [(node.name, f"{node.path}.from")] if isinstance(node, SourceNode) else []
        return [*own, *named_by_ops]
    if isinstance(node, FitNode):
        return [(name, f"{node.path}.fit") for name in node.sources]
    if isinstance(node, ConcatNode):
        return [s for p in node.parts for s in source_paths(p)]
    return []


def node_inits(node: Node) -> list[str]:
    if isinstance(node, InitNode):
        return [node.init]
    if isinstance(node, ConcatNode):
        return [s for p in node.parts for s in node_inits(p)]
    return []


def bind(expr: Any, path: str, binding: dict[str, int]) -> Node:
    """A rule expression with its placeholders filled from `binding` ({"layer": j, "block": b}), as nodes."""
    if isinstance(expr, (FromExpr, EyeExpr)):
        where = "a rule outside per-layer patterns" if "layer" not in binding else "a layer no teacher block feeds"
        try:
            name = fill_template(expr.source, binding) if isinstance(expr, FromExpr) else ""
        except KeyError as exc:
            raise RuleError(f"{path}.from", f"placeholder {{{exc.args[0]}}} has no value in {where}") from None
        ops = []
        for i, op in enumerate(expr.ops):
            try:
                ops.append(op.bound(binding))
            except KeyError as exc:
                raise RuleError(f"{path}.ops[{i}]", f"placeholder {{{exc.args[0]}}} has no value in {where}") from None
        if isinstance(expr, EyeExpr):
            return EyeNode(expr.eye, tuple(ops), path, expr.size)
        return SourceNode(name, tuple(ops), path, expr.size)
    if isinstance(expr, InitExpr):
        return InitNode(expr.init, path, expr.size)
    if isinstance(expr, FitExpr):
        if "block" not in binding:
            raise RuleError(f"{path}.fit", "a fit makes a layer from a teacher block: use it in inherited layers only")
        sources = tuple(fill_template(t, binding) for t in FITS[expr.fit].reads)
        return FitNode(expr.fit, binding["block"], sources, path, expr.size)
    assert isinstance(expr, ConcatExpr)
    parts = tuple(bind(p, f"{path}.concat.parts[{i}]", binding) for i, p in enumerate(expr.concat.parts))
    return ConcatNode(expr.concat.dim, parts, path, expr.size)


def walk(node: Node) -> list[tuple[Node, str]]:
    out = [(node, node.path)]
    if isinstance(node, ConcatNode):
        for p in node.parts:
            out.extend(walk(p))
    return out


class IndexSetSpec(Protocol):
    """What the interpreter needs of a resolved index set."""

    full: int  # width of the teacher axis it chooses from
    keep: int  # entries kept
    per: str  # "model" or "block"


class FailedIndexSetError(Exception):
    """A rule uses an index set whose own declaration is already reported as a problem: nothing new to report.

    Not a ValueError, so it passes the op-level handlers that turn ValueErrors into problems at the op's path."""


class OpContext:
    """`ops.ResolveContext` for one target tensor: config references, and index sets at the tensor's block (and, for
    sets chosen per stage of a hierarchical student, at its stage)."""

    def __init__(
        self,
        configs: dict[str, Any],
        sets: Mapping[str, IndexSetSpec],
        selection: Any,
        block: int | None,
        failed: frozenset[str] = frozenset(),
        load: Callable[[str], torch.Tensor] | None = None,
        stage: int | None = None,
    ):
        self.configs = configs
        self.sets = sets
        self.selection = selection
        self.block = block
        self.failed = failed
        self.load = load
        self.stage = stage

    def source(self, name: str) -> torch.Tensor:
        if self.load is None:
            raise ValueError(f"source tensor {name} cannot be read here")
        return self.load(name)

    def ref(self, value: Any) -> Any:
        if not is_ref(value):
            return value
        side, attr = value.split(".", 1)
        config = self.configs[side]
        if not hasattr(config, attr):
            raise ValueError(f"{value}: {type(config).__name__} has no field {attr!r}")
        resolved = getattr(config, attr)
        if resolved is None:
            raise ValueError(f"{value} is not set for this {side} ({type(config).__name__}.{attr} is None)")
        return resolved

    def _key(self, name: str) -> str:
        """The resolved set a rule's set name means for this tensor: the set itself, or, for a set chosen per stage,
        `name@S` of the tensor's stage (a name may say `name@S` itself; S = -1 is the last stage, +1 the next)."""
        base, at, where = name.partition("@")
        if base in self.failed:
            raise FailedIndexSetError(base)
        if not at and name in self.sets:
            return name
        stages = sorted(int(k.rpartition("@")[2]) for k in self.sets if k.rpartition("@")[0] == base)
        if not stages:
            known = ", ".join(dict.fromkeys(k.partition("@")[0] for k in self.sets)) or "none declared"
            if at and base in self.sets:
                raise ValueError(f"index set {base!r} is one set for every stage: write {base!r}, not {name!r}")
            raise ValueError(f"unknown index set {name!r} (index_sets: {known})")
        if at:
            try:
                stage = int(where)
            except ValueError:
                raise ValueError(f"index set {name!r}: `@` takes a stage number (-1: the last, +1: the next)") from None
            if where.startswith("+"):  # relative to this tensor's stage (a downsampling reads the next one's set)
                if self.stage is None:
                    raise ValueError(f"index set {name!r}: `@{where}` is relative, and this tensor is in no stage")
                stage += self.stage
            stage = stage + len(stages) if stage < 0 else stage
        elif self.stage is None:
            raise ValueError(
                f"index set {base!r} is chosen per stage and this tensor is in none: name its stage, {base}@S "
                "(-1: the last)"
            )
        else:
            stage = self.stage
        if f"{base}@{stage}" not in self.sets:
            raise ValueError(f"index set {base!r} has stages {stages[0]}-{stages[-1]}, not {where or stage}")
        return f"{base}@{stage}"

    def _set(self, name: str) -> tuple[str, IndexSetSpec]:
        key = self._key(name)
        return key, self.sets[key]

    def index(self, set_name: str) -> torch.Tensor:
        key, spec = self._set(set_name)
        if spec.per == "block" and self.block is None:
            raise ValueError(f"index set {set_name!r} is chosen per teacher block, but this rule has no block")
        return self.selection(key, self.block if spec.per == "block" else None)

    def set_full(self, set_name: str) -> int:
        return self._set(set_name)[1].full

    def set_ratio(self, set_name: str) -> float:
        spec = self._set(set_name)[1]
        return spec.full / spec.keep


def _no_fits(name: str) -> torch.Tensor:
    raise ValueError(f"{name} is fitted on calibration images, and none were fitted here")


@dataclass
class EvalContext:
    """How leaves become tensors: `load(name)` a source tensor (fp32), `default(name)` a whole default-initialised
    target tensor, `fitted(name)` a whole fitted one."""

    load: Callable[[str], torch.Tensor]
    default: Callable[[str], torch.Tensor]
    ops: OpContext
    meta: bool
    fitted: Callable[[str], torch.Tensor] = _no_fits


@dataclass(frozen=True)
class Region:
    """The part of a target tensor an expression fills: its name and the (dim, start, length) narrowings."""

    target: str
    shape: tuple[int, ...]
    narrowing: tuple[tuple[int, int, int], ...] = ()
    full_shape: tuple[int, ...] | None = None  # the whole target tensor's shape (None: `shape` is the whole)

    def narrow(self, dim: int, start: int, length: int) -> Region:
        shape = list(self.shape)
        shape[dim] = length
        return Region(self.target, tuple(shape), (*self.narrowing, (dim, start, length)), self.full_shape or self.shape)


def initial_tensor(init: str, shape: tuple[int, ...], *, meta: bool) -> torch.Tensor:
    """A whole target tensor from a constant initialiser (`default` comes from the target model instead)."""
    make = INITS[init].fn
    assert make is not None, "`init: default` is the target model's, not a constant"
    return make(shape, "meta" if meta else "cpu")


def _resolve_size(node: Node, ctx: EvalContext) -> int | None:
    if node.size is None:
        return None
    try:
        value = ctx.ops.ref(node.size)
    except ValueError as exc:
        raise RuleError(f"{node.path}.size", str(exc)) from None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise RuleError(f"{node.path}.size", f"size must be a non-negative integer, got {value!r}")
    return value


Observer = Callable[[OpSpec, dict[str, Any], torch.Tensor, torch.Tensor], None]


def apply_chain(
    node: SourceNode | EyeNode,
    tensor: torch.Tensor,
    ops: OpContext,
    *,
    trace: bool = False,
    observe: Observer | None = None,
) -> torch.Tensor:
    """Run a source node's op chain on `tensor` (the source tensor as loaded), left to right.

    With `trace`, `tensor` holds element ids of the source and each op moves them as it declares (`OpSpec.reads`),
    so the result says which source entries the output is made of. `observe(spec, kwargs, before, after)` sees
    every call (the plan classifies with it). A failing op raises `RuleError` at its YAML path.
    """
    source_ids = tensor
    for i, op in enumerate(node.ops):
        try:
            kwargs = op.args.resolve(ops)
            if trace and op.spec.reads == "all":
                return source_ids
            out = tensor if trace and op.spec.reads == "same" else op.spec.fn(tensor, **kwargs)
        except (ValueError, RuntimeError, IndexError) as exc:
            raise RuleError(f"{node.path}.ops[{i}]", f"{op.name} on {node.name} {tuple(tensor.shape)}: {exc}") from None
        if observe is not None:
            observe(op.spec, kwargs, tensor, out)
        tensor = out
    return tensor


def evaluate(node: Node, ctx: EvalContext, region: Region) -> torch.Tensor:
    """The tensor an expression produces for `region` (float32; on meta when `ctx.meta`)."""
    if isinstance(node, SourceNode):
        return apply_chain(node, ctx.load(node.name), ctx.ops)
    if isinstance(node, EyeNode):
        try:
            n = ctx.ops.ref(node.n)
        except ValueError as exc:
            raise RuleError(f"{node.path}.eye", str(exc)) from None
        if not isinstance(n, int) or isinstance(n, bool) or n <= 0:
            raise RuleError(f"{node.path}.eye", f"eye needs a positive integer, got {n!r}")
        return apply_chain(node, torch.eye(n, device="meta" if ctx.meta else "cpu"), ctx.ops)
    if isinstance(node, (InitNode, FitNode)):  # whole target tensors, cut to the region
        tensor = _whole_tensor(node, ctx, region.full_shape or region.shape, region.target)
        for dim, start, length in region.narrowing:
            tensor = tensor.narrow(dim, start, length)
        return tensor
    return _evaluate_concat(node, ctx, region)


def _whole_tensor(node: InitNode | FitNode, ctx: EvalContext, whole: tuple[int, ...], target: str) -> torch.Tensor:
    """The whole target tensor a fit or an initialiser gives (a meta tensor of its shape when planning)."""
    if isinstance(node, FitNode) or node.init == "default":
        if ctx.meta:
            return torch.empty(whole, device="meta")
        return (ctx.fitted if isinstance(node, FitNode) else ctx.default)(target).float()
    try:
        return initial_tensor(node.init, whole, meta=ctx.meta)
    except ValueError as exc:
        raise RuleError(f"{node.path}.init", str(exc)) from None


def _extent(node: Node, ctx: EvalContext, region: Region, dim: int) -> int | None:
    """How long an undeclared part is along `dim` when its source parts say: a concat along another dim is as long
    as its source parts (so `[source rows ; init]` along dim 1, then `init` rows below it, needs no `size:`)."""
    if isinstance(node, (SourceNode, EyeNode)):
        tensor = evaluate(node, ctx, region)
        return tensor.shape[dim] if tensor.dim() > dim else None
    if isinstance(node, ConcatNode) and node.size is None and node.dim % len(region.shape) != dim:
        return next((n for p in node.parts if (n := _extent(p, ctx, region, dim)) is not None), None)
    return None


def filling_inits(node: Node, ctx: EvalContext, region: Region) -> list[str]:
    """The initialisers that make at least one entry of `region` (a fill part that comes out empty makes none)."""
    if isinstance(node, InitNode):
        return [node.init] if all(region.shape) else []
    if not isinstance(node, ConcatNode):
        return []
    dim, sizes, _ = _layout(node, ctx, region)
    out, offset = [], 0
    for part, size in zip(node.parts, sizes, strict=True):
        out += filling_inits(part, ctx, region.narrow(dim, offset, size))
        offset += size
    return out


def _evaluate_concat(node: ConcatNode, ctx: EvalContext, region: Region) -> torch.Tensor:
    dim, sizes, evaluated = _layout(node, ctx, region)
    pieces, offset = [], 0
    for i, part in enumerate(node.parts):
        size = sizes[i]
        pieces.append(evaluated[i] if i in evaluated else evaluate(part, ctx, region.narrow(dim, offset, size)))
        offset += size
    try:
        return concat(pieces, dim=dim)
    except RuntimeError:
        shapes = ", ".join(str(tuple(p.shape)) for p in pieces)
        raise RuleError(f"{node.path}.concat", f"parts {shapes} do not fit together along dim {dim}") from None


def _layout(node: ConcatNode, ctx: EvalContext, region: Region) -> tuple[int, list[int], dict[int, torch.Tensor]]:
    """(dim, each part's size along it, the source parts already evaluated) of a concat filling `region`."""
    ndim = len(region.shape)
    if not -ndim <= node.dim < ndim:
        raise RuleError(f"{node.path}.concat.dim", f"dim {node.dim} out of range for a {ndim}-d target")
    dim = node.dim % ndim
    sizes: list[int | None] = []
    evaluated: dict[int, torch.Tensor] = {}
    for i, part in enumerate(node.parts):
        declared = _resolve_size(part, ctx)
        if declared is None and isinstance(part, ConcatNode):
            declared = _extent(part, ctx, region, dim)
        if isinstance(part, (SourceNode, EyeNode)):
            tensor = evaluate(part, ctx, region)
            if tensor.dim() != ndim:
                raise RuleError(part.path, f"{part.name} gives a {tensor.dim()}-d tensor, the concat is {ndim}-d")
            if declared is not None and tensor.shape[dim] != declared:
                raise RuleError(f"{part.path}.size", f"declared size {declared}, produced {tensor.shape[dim]}")
            evaluated[i] = tensor
            sizes.append(tensor.shape[dim])
        else:
            sizes.append(declared)
    unknown = [i for i, s in enumerate(sizes) if s is None]
    known = sum(s for s in sizes if s is not None)
    if len(unknown) > 1:
        raise RuleError(f"{node.path}.concat", "at most one part may omit `size` (it fills the remainder)")
    if unknown:
        fill = region.shape[dim] - known
        if fill < 0:
            raise RuleError(
                f"{node.path}.concat",
                f"parts already give {known} along dim {dim}, more than the {region.shape[dim]} of {region.target}",
            )
        sizes[unknown[0]] = fill
    return dim, sizes, evaluated
