"""The conversion plan: a mapping resolved against one source and one target, as data.

`build_plan` binds every target tensor (from the target model's meta state dict, the one source of truth for target
names and shapes) to exactly one mapping rule, fills the `{layer}` / `{block}` placeholders from the layer plan, and
propagates shapes by evaluating each expression on `meta` tensors with `evaluate` — the very function the engine runs
on real tensors. The result prints as a table (`--dry-run`), serialises to JSON (`--json`), and is what the engine
executes. Problems are collected, not raised one by one, so `tmconvert check` can report all of them.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from tmconvert.converter.convert.subclone import SetRequest
from tmconvert.converter.errors import ConfigError, MappingError
from tmconvert.converter.mapping.ops import concat
from tmconvert.converter.mapping.schema import (
    ConcatExpr,
    FromExpr,
    InitExpr,
    LoadedMapping,
    OpCall,
    Pattern,
    Rule,
    fill_template,
    is_ref,
    iter_exprs,
)
from tmconvert.models.registry import family_of, get_config
from tmconvert.models.vim import VimConfig, VisionMamba
from tmconvert.models.vit import VisionTransformer, ViTConfig

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}
KINDS = ("inherited", "subcloned", "partial", "initialised")


class PlanError(Exception):
    """A problem at one YAML path of the mapping (internal; collected into `PlanProblem`s)."""

    def __init__(self, path: str, message: str):
        super().__init__(message)
        self.path = path
        self.message = message


@dataclass(frozen=True)
class PlanProblem:
    path: str  # YAML path inside the mapping file
    message: str
    repeats: int = 0  # how many more target tensors hit the same problem at the same path

    def render(self, mapping: LoadedMapping) -> str:
        more = f" (and {self.repeats} more tensors)" if self.repeats else ""
        return f"{mapping.where(self.path)}: {self.message}{more}"


# ---------------------------------------------------------------------------------------------------------------
# The two sides


@dataclass(frozen=True)
class SourceSide:
    """What planning needs of a source: its config and canonical tensor names, shapes and dtypes (no data)."""

    config: ViTConfig
    shapes: dict[str, tuple[int, ...]]
    dtypes: dict[str, torch.dtype]

    @classmethod
    def from_checkpoint(cls, ckpt: Any) -> SourceSide:
        infos = [ckpt.info(name) for name in ckpt.names()]
        return cls(ckpt.config, {i.name: tuple(i.shape) for i in infos}, {i.name: i.dtype for i in infos})

    @classmethod
    def from_config(cls, cfg: ViTConfig) -> SourceSide:
        """The tensors a checkpoint of this config has (timm names), from a meta-device teacher."""
        state = VisionTransformer(cfg, device="meta").state_dict()
        return cls(cfg, {k: tuple(v.shape) for k, v in state.items()}, {k: torch.float32 for k in state})


@dataclass(frozen=True)
class TargetSide:
    name: str  # registry name the config came from (vim-s), for messages and metadata
    config: VimConfig
    shapes: dict[str, tuple[int, ...]]  # in the target's state_dict order

    @classmethod
    def from_config(cls, name: str, cfg: VimConfig) -> TargetSide:
        state = VisionMamba(cfg, device="meta").state_dict()
        return cls(name, cfg, {k: tuple(v.shape) for k, v in state.items()})


def derive_target_config(
    name: str,
    source: ViTConfig,
    *,
    img_size: int | None = None,
    patch_size: int | None = None,
    num_classes: int | None = None,
) -> VimConfig:
    """The registry config of `name` with the input geometry and classes of the teacher, unless overridden.

    Widths, depth and SSM sizes come from the registry (that is what "vim-t" means); image size, patch size, input
    channels and class count follow the teacher, so a 28-px Fashion-MNIST teacher gives a ViM that reads the same
    images and predicts the same classes. A registry stride (overlapping patches) keeps its ratio to the patch.
    """
    base = get_config(name)
    if family_of(base) != "vim":
        raise ConfigError(f"{name!r} is a {family_of(base)} model, not a conversion target; targets: vim-t, vim-s, ...")
    patch = patch_size if patch_size is not None else source.patch_size
    stride = None if base.stride is None else max(1, base.stride * patch // base.patch_size)
    classes = num_classes if num_classes is not None else source.num_classes
    size = (img_size, img_size) if img_size is not None else source.img_size
    try:
        return dataclasses.replace(
            base, img_size=size, patch_size=patch, stride=stride, in_chans=source.in_chans, num_classes=classes
        )
    except ConfigError as exc:
        raise ConfigError(f"target {name}: {exc}") from None


# ---------------------------------------------------------------------------------------------------------------
# Layer plan


@dataclass(frozen=True)
class LayerPlan:
    """Which teacher block feeds each student layer (None: not inherited, initialised by the `rest` rules)."""

    blocks: tuple[int | None, ...]
    requested: int
    warnings: tuple[str, ...] = ()

    @property
    def inherited(self) -> int:
        return sum(b is not None for b in self.blocks)

    def used_blocks(self) -> tuple[int, ...]:
        return tuple(sorted({b for b in self.blocks if b is not None}))


def plan_layers(requested: int | None, teacher_depth: int, student_depth: int) -> LayerPlan:
    """`--layers n`: student layers 0..n-1 from teacher blocks, the rest default-initialised.

    n <= teacher depth: student j <- teacher j. n > teacher depth: spread evenly, student j <- teacher
    floor(j * T / n) (each block feeds n/T consecutive layers). n > student depth is clamped with a warning.
    Default n = min(teacher depth, student depth).
    """
    if requested is None:
        requested = min(teacher_depth, student_depth)
    if requested <= 0:
        raise ConfigError(f"--layers must be at least 1, got {requested}")
    warnings: list[str] = []
    n = requested
    if n > student_depth:
        warnings.append(f"--layers {n} exceeds the student's {student_depth} layers; using {student_depth}")
        n = student_depth
    feeds = list(range(n)) if n <= teacher_depth else [j * teacher_depth // n for j in range(n)]
    return LayerPlan(tuple(feeds) + (None,) * (student_depth - n), requested, tuple(warnings))


# ---------------------------------------------------------------------------------------------------------------
# Bound expressions (placeholders filled; what the engine evaluates)


@dataclass(frozen=True)
class SourceNode:
    name: str
    ops: tuple[OpCall, ...]
    path: str
    size: Any = None


@dataclass(frozen=True)
class InitNode:
    init: str
    path: str
    size: Any = None


@dataclass(frozen=True)
class ConcatNode:
    dim: int
    parts: tuple[Node, ...]
    path: str
    size: Any = None


Node = SourceNode | InitNode | ConcatNode


def describe(node: Node, resolve: Callable[[Any], Any] | None = None) -> str:
    """One-line human form: `blocks.0.mlp.fc1.weight | select(dim=0, set=hidden) | ...`, `init:default`, `cat0[...]`.

    With `resolve`, config references in op arguments show their values.
    """
    if isinstance(node, SourceNode):
        return " | ".join([node.name, *(op.describe(resolve) for op in node.ops)])
    if isinstance(node, InitNode):
        return f"init:{node.init}"
    return f"cat{node.dim}[" + " ; ".join(describe(p, resolve) for p in node.parts) + "]"


def node_sources(node: Node) -> list[str]:
    if isinstance(node, SourceNode):
        return [node.name]
    if isinstance(node, ConcatNode):
        return [s for p in node.parts for s in node_sources(p)]
    return []


def node_inits(node: Node) -> list[str]:
    if isinstance(node, InitNode):
        return [node.init]
    if isinstance(node, ConcatNode):
        return [s for p in node.parts for s in node_inits(p)]
    return []


# ---------------------------------------------------------------------------------------------------------------
# Evaluation: one function for meta shape propagation (plan, check) and real conversion (engine)


@dataclass(frozen=True)
class IndexSetPlan:
    name: str
    full: int
    keep: int
    per: str
    score: str
    blocks: tuple[int | None, ...]  # blocks a selection is needed for; (None,) for model-wide sets

    def request(self) -> SetRequest:
        return SetRequest(self.name, self.score, self.full, self.keep, self.blocks)


class FailedIndexSetError(Exception):
    """A rule uses an index set whose own declaration is already reported as a problem: nothing new to report.

    Not a ValueError, so it passes the op-level handlers that turn ValueErrors into problems at the op's path."""


class OpContext:
    """`ops.ResolveContext` for one target tensor: config references, and index sets at the tensor's block."""

    def __init__(self, configs: dict[str, Any], sets: dict[str, IndexSetPlan], selection: Any, block: int | None,
                 failed: frozenset[str] = frozenset()):  # fmt: skip
        self.configs = configs
        self.sets = sets
        self.selection = selection
        self.block = block
        self.failed = failed

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

    def _set(self, name: str) -> IndexSetPlan:
        if name in self.failed:
            raise FailedIndexSetError(name)
        if name not in self.sets:
            known = ", ".join(self.sets) or "none declared"
            raise ValueError(f"unknown index set {name!r} (index_sets: {known})")
        return self.sets[name]

    def index(self, set_name: str) -> torch.Tensor:
        spec = self._set(set_name)
        if spec.per == "block" and self.block is None:
            raise ValueError(f"index set {set_name!r} is chosen per teacher block, but this rule has no block")
        return self.selection(set_name, self.block if spec.per == "block" else None)

    def set_full(self, set_name: str) -> int:
        return self._set(set_name).full

    def set_ratio(self, set_name: str) -> float:
        spec = self._set(set_name)
        return spec.full / spec.keep


@dataclass
class EvalContext:
    """How leaves become tensors: `load(name)` a source tensor (fp32), `init(kind, name)` a whole default tensor."""

    load: Callable[[str], torch.Tensor]
    default: Callable[[str], torch.Tensor]
    ops: OpContext
    meta: bool


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
    device = "meta" if meta else "cpu"
    if init == "conv_identity":
        if len(shape) < 2:
            raise ValueError(f"conv_identity needs a conv kernel (out, in, taps...), got shape {shape}")
        tensor = torch.zeros(shape, device=device)
        tensor[..., -1] = 1.0
        return tensor
    return torch.full(shape, {"zeros": 0.0, "ones": 1.0}[init], device=device)


def _resolve_size(node: Node, ctx: EvalContext) -> int | None:
    if node.size is None:
        return None
    try:
        value = ctx.ops.ref(node.size)
    except ValueError as exc:
        raise PlanError(f"{node.path}.size", str(exc)) from None
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise PlanError(f"{node.path}.size", f"size must be a non-negative integer, got {value!r}")
    return value


def evaluate(node: Node, ctx: EvalContext, region: Region) -> torch.Tensor:
    """The tensor an expression produces for `region` (float32; on meta when `ctx.meta`)."""
    if isinstance(node, SourceNode):
        tensor = ctx.load(node.name)
        for i, op in enumerate(node.ops):
            path = f"{node.path}.ops[{i}]"
            try:
                tensor = op.spec.fn(tensor, **op.args.resolve(ctx.ops))
            except (ValueError, RuntimeError, IndexError, ConfigError) as exc:
                shape = tuple(tensor.shape)
                raise PlanError(path, f"{op.name} on {node.name} {shape}: {exc}") from None
        return tensor
    if isinstance(node, InitNode):
        whole = region.full_shape or region.shape
        if node.init == "default":
            tensor = torch.empty(whole, device="meta") if ctx.meta else ctx.default(region.target).float()
        else:
            try:
                tensor = initial_tensor(node.init, whole, meta=ctx.meta)
            except ValueError as exc:
                raise PlanError(f"{node.path}.init", str(exc)) from None
        for dim, start, length in region.narrowing:
            tensor = tensor.narrow(dim, start, length)
        return tensor
    return _evaluate_concat(node, ctx, region)


def _evaluate_concat(node: ConcatNode, ctx: EvalContext, region: Region) -> torch.Tensor:
    ndim = len(region.shape)
    if not -ndim <= node.dim < ndim:
        raise PlanError(f"{node.path}.concat.dim", f"dim {node.dim} out of range for a {ndim}-d target")
    dim = node.dim % ndim
    sizes: list[int | None] = []
    evaluated: dict[int, torch.Tensor] = {}
    for i, part in enumerate(node.parts):
        declared = _resolve_size(part, ctx)
        if isinstance(part, SourceNode):
            tensor = evaluate(part, ctx, region)
            if tensor.dim() != ndim:
                raise PlanError(part.path, f"{part.name} gives a {tensor.dim()}-d tensor, the concat is {ndim}-d")
            if declared is not None and tensor.shape[dim] != declared:
                raise PlanError(f"{part.path}.size", f"declared size {declared}, produced {tensor.shape[dim]}")
            evaluated[i] = tensor
            sizes.append(tensor.shape[dim])
        else:
            sizes.append(declared)
    unknown = [i for i, s in enumerate(sizes) if s is None]
    known = sum(s for s in sizes if s is not None)
    if len(unknown) > 1:
        raise PlanError(f"{node.path}.concat", "at most one part may omit `size` (it fills the remainder)")
    if unknown:
        fill = region.shape[dim] - known
        if fill < 0:
            raise PlanError(
                f"{node.path}.concat",
                f"parts already give {known} along dim {dim}, more than the {region.shape[dim]} of {region.target}",
            )
        sizes[unknown[0]] = fill
    pieces, offset = [], 0
    for i, part in enumerate(node.parts):
        size = sizes[i]
        pieces.append(evaluated[i] if i in evaluated else evaluate(part, ctx, region.narrow(dim, offset, size)))
        offset += size
    try:
        return concat(pieces, dim=dim)
    except RuntimeError:
        shapes = ", ".join(str(tuple(p.shape)) for p in pieces)
        raise PlanError(f"{node.path}.concat", f"parts {shapes} do not fit together along dim {dim}") from None


# ---------------------------------------------------------------------------------------------------------------
# The plan


@dataclass(frozen=True)
class PlanEntry:
    """One target tensor: where it comes from, its shape, stored dtype and how it is made."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    kind: str  # inherited | subcloned | partial | initialised
    rule: str  # YAML path of the rule that produces it
    node: Node
    layer: int | None
    block: int | None
    expr: str  # `describe` of the node with config references resolved
    note: str = ""

    @property
    def sources(self) -> list[str]:
        return node_sources(self.node)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * DTYPES[self.dtype].itemsize


@dataclass
class Plan:
    """Everything a conversion will do, before it does it."""

    mapping: LoadedMapping
    source: SourceSide
    target: TargetSide
    layers: LayerPlan
    index_sets: dict[str, IndexSetPlan]
    entries: list[PlanEntry]
    dropped: list[str]
    options: dict[str, Any]
    problems: list[PlanProblem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    unused_rules: list[str] = field(default_factory=list)

    def raise_problems(self) -> None:
        if self.problems:
            shown = [p.render(self.mapping) for p in self.problems]
            raise MappingError(
                f"mapping {self.mapping.name} does not fit {self.source_label} -> {self.target.name}:\n"
                + "\n".join(shown)
            )

    @property
    def source_label(self) -> str:
        cfg = self.source.config
        return f"vit(D={cfg.embed_dim}, depth={cfg.depth}, {cfg.img_size[0]}px/{cfg.patch_size})"

    def counts(self) -> dict[str, int]:
        out = {kind: 0 for kind in KINDS}
        for entry in self.entries:
            out[entry.kind] += 1
        out["dropped"] = len(self.dropped)
        return out

    def write_order(self) -> list[PlanEntry]:
        """Tensors in the order their bytes are written: wider dtypes first (keeps every offset aligned)."""
        return sorted(self.entries, key=lambda e: -DTYPES[e.dtype].itemsize)

    @property
    def output_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def needs_default_init(self) -> bool:
        return any("default" in node_inits(e.node) for e in self.entries)

    def peak_memory_bytes(self, *, activation_scoring: bool = False) -> int:
        """Estimate: the default-initialised target (fp32), a few fp32 copies of the largest source tensor, the
        output tensor being written, and the fp32 teacher while activation scores are computed."""
        target_fp32 = sum(math.prod(s) for s in self.target.shapes.values()) * 4 if self.needs_default_init else 0
        largest = max((math.prod(s) for s in self.source.shapes.values()), default=0) * 4
        teacher = sum(math.prod(s) for s in self.source.shapes.values()) * 4 if activation_scoring else 0
        largest_out = max((e.nbytes for e in self.entries), default=0)
        return target_fp32 + max(3 * largest + largest_out, teacher)

    def source_usage(self) -> dict[str, float]:
        """Source tensors only partly read (Q/K rows of qkv, unselected channels): name -> fraction of entries used.

        Runs each op chain on a tensor of element ids (the plan's placeholder index sets keep as many entries as
        the real ones); value-changing ops (scale) keep ids, resampling counts every entry as used.
        """
        configs = {"source": self.source.config, "target": self.target.config}
        masks: dict[str, torch.Tensor] = {}
        for entry in self.entries:
            ops_ctx = OpContext(configs, self.index_sets, _placeholder_selection(self.index_sets), entry.block)
            for node, _ in _walk(entry.node):
                if not isinstance(node, SourceNode):
                    continue
                shape = self.source.shapes[node.name]
                ids = torch.arange(math.prod(shape)).reshape(shape)
                used = ids
                for op in node.ops:
                    if op.name.startswith("resample"):
                        used = ids
                        break
                    if op.name != "scale":
                        used = op.spec.fn(used, **op.args.resolve(ops_ctx))
                mask = masks.setdefault(node.name, torch.zeros(ids.numel(), dtype=torch.bool))
                mask[used.reshape(-1)] = True
        return {name: mask.float().mean().item() for name, mask in masks.items() if not bool(mask.all())}

    def to_json(self) -> dict[str, Any]:
        return {
            "mapping": {"name": self.mapping.name, "path": str(self.mapping.path), "sha256": self.mapping.sha256},
            "source": {"family": "vit", "config": config_json(self.source.config)},
            "target": {"name": self.target.name, "family": "vim", "config": config_json(self.target.config)},
            "options": self.options,
            "layers": [{"layer": j, "block": b} for j, b in enumerate(self.layers.blocks)],
            "index_sets": {
                name: {"full": s.full, "keep": s.keep, "per": s.per, "score": s.score, "blocks": list(s.blocks)}
                for name, s in self.index_sets.items()
            },
            "tensors": [
                {
                    "name": e.name,
                    "shape": list(e.shape),
                    "dtype": e.dtype,
                    "kind": e.kind,
                    "expr": e.expr,
                    "rule": e.rule,
                    "layer": e.layer,
                    "block": e.block,
                    **({"note": e.note} if e.note else {}),
                }
                for e in self.entries
            ],
            "dropped": self.dropped,
            "partly_used": {name: round(f, 4) for name, f in self.source_usage().items()},
            "counts": self.counts(),
            "output_bytes": self.output_bytes,
            "peak_memory_bytes": self.peak_memory_bytes(activation_scoring=self.options.get("score") == "activation"),
            "warnings": self.warnings,
            "unused_rules": self.unused_rules,
        }


def config_json(cfg: Any) -> dict[str, Any]:
    """A config dataclass as plain JSON values (tuples -> lists)."""
    return json_safe(dataclasses.asdict(cfg))


def json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


class _Problems:
    """Collects problems, keeping the first message per YAML path and counting repeats."""

    def __init__(self) -> None:
        self._first: dict[str, PlanProblem] = {}

    def add(self, path: str, message: str) -> None:
        if path in self._first:
            old = self._first[path]
            self._first[path] = dataclasses.replace(old, repeats=old.repeats + 1)
        else:
            self._first[path] = PlanProblem(path, message)

    def list(self) -> list[PlanProblem]:
        return list(self._first.values())


def _resolve_index_sets(
    mapping: LoadedMapping, configs: dict[str, Any], layers: LayerPlan, problems: _Problems
) -> tuple[dict[str, IndexSetPlan], frozenset[str]]:
    """The declared index sets that resolve, and the names of those that do not (each reported once here)."""
    sets: dict[str, IndexSetPlan] = {}
    ctx = OpContext(configs, {}, None, None)
    for name, spec in mapping.mapping.index_sets.items():
        path = f"index_sets.{name}"
        try:
            full, keep = ctx.ref(spec.full), ctx.ref(spec.keep)
        except ValueError as exc:
            problems.add(path, str(exc))
            continue
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (full, keep)):
            problems.add(path, f"full and keep must resolve to integers, got {full!r} and {keep!r}")
            continue
        if spec.upto:
            keep = min(keep, full)
        if keep <= 0 or keep > full:
            problems.add(
                path,
                f"keeps {keep} ({spec.keep}) of {full} ({spec.full}) entries: a student wider than the teacher "
                "cannot be subcloned (use a teacher at least as wide, or `upto: true` with a fill part)",
            )
            continue
        blocks = layers.used_blocks() if spec.per == "block" else (None,)
        sets[name] = IndexSetPlan(name, full, keep, spec.per, spec.score, tuple(blocks))
    return sets, frozenset(mapping.mapping.index_sets) - frozenset(sets)


def _check_requires(mapping: LoadedMapping, configs: dict[str, Any]) -> list[PlanProblem]:
    problems = []
    for side, fields in mapping.mapping.requires.items():
        path = f"requires.{side}"
        if side not in configs or not isinstance(fields, dict):
            problems.append(PlanProblem(path, "requires takes `source:` and `target:` mappings of config fields"))
            continue
        config = configs[side]
        for attr, wanted in fields.items():
            if not hasattr(config, attr):
                problems.append(PlanProblem(f"{path}.{attr}", f"{type(config).__name__} has no field {attr!r}"))
            elif _norm(getattr(config, attr)) != _norm(wanted):
                have = getattr(config, attr)
                message = f"mapping {mapping.name} accepts only {side}s with {attr} = {wanted!r}; this one has {have!r}"
                problems.append(PlanProblem(f"{path}.{attr}", message))
    return problems


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _bind(expr: Any, path: str, binding: dict[str, int]) -> Node:
    if isinstance(expr, FromExpr):
        try:
            name = fill_template(expr.source, binding)
        except KeyError as exc:
            where = "a rule outside per-layer patterns" if "layer" not in binding else "a layer no teacher block feeds"
            raise PlanError(f"{path}.from", f"placeholder {{{exc.args[0]}}} has no value in {where}") from None
        return SourceNode(name, tuple(expr.ops), path, expr.size)
    if isinstance(expr, InitExpr):
        return InitNode(expr.init, path, expr.size)
    assert isinstance(expr, ConcatExpr)
    parts = tuple(_bind(p, f"{path}.concat.parts[{i}]", binding) for i, p in enumerate(expr.concat.parts))
    return ConcatNode(expr.concat.dim, parts, path, expr.size)


def _classify(node: Node, ctx: EvalContext) -> str:
    """inherited: every value copied from the source (possibly re-laid out); subcloned: some op picked a subset or
    changed values; initialised: no source at all; partial: both source and initialiser parts."""
    has_source = bool(node_sources(node))
    has_init = bool(node_inits(node))
    if has_source and has_init:
        return "partial"
    if not has_source:
        return "initialised"
    return "subcloned" if _changes_values(node, ctx) else "inherited"


def _changes_values(node: Node, ctx: EvalContext) -> bool:
    """Whether some op of the expression picks a strict subset, rescales or resamples (runs the chain on meta)."""
    if isinstance(node, ConcatNode):
        return any(_changes_values(p, ctx) for p in node.parts)
    if not isinstance(node, SourceNode):
        return False
    tensor = ctx.load(node.name)
    changed = False
    for op in node.ops:
        kwargs = op.args.resolve(ctx.ops)
        out = op.spec.fn(tensor, **kwargs)
        if op.name == "select":
            changed |= kwargs["index"].numel() != kwargs["full"]
        elif op.name == "scale":
            changed |= kwargs["factor"] != 1.0
        elif op.name in ("resample_grid", "resample_kernel"):
            changed |= tuple(out.shape) != tuple(tensor.shape)
        tensor = out
    return changed


_LAYER_NUMBER = re.compile(r"(?<=\.)\d+(?=\.)")


def build_plan(
    mapping: LoadedMapping,
    source: SourceSide,
    target: TargetSide,
    *,
    layers: int | None = None,
    identity_rest: bool | None = None,
    dtype: str = "float32",
    options: dict[str, Any] | None = None,
) -> Plan:
    """Resolve `mapping` for this source and target; shape-check every target tensor on meta tensors.

    Problems are collected into `plan.problems` (check reports them; conversion raises `MappingError`).
    """
    spec = mapping.mapping
    dtype = DTYPE_ALIASES.get(dtype, dtype)
    if dtype not in DTYPES:
        raise ConfigError(f"--dtype {dtype}: choose one of fp32, fp16, bf16")
    if identity_rest is None:
        identity_rest = spec.options.identity_rest
    source_family, target_family = family_of(source.config), family_of(target.config)
    if spec.source != source_family or spec.target != target_family:
        raise MappingError(
            f"{mapping.path}: mapping {mapping.name} converts {spec.source} -> {spec.target}, "
            f"not {source_family} -> {target_family}"
        )
    configs = {"source": source.config, "target": target.config}
    layer_plan = plan_layers(layers, source.config.depth, target.config.depth)
    problems = _Problems()
    for problem in _check_requires(mapping, configs):
        problems.add(problem.path, problem.message)
    index_sets, failed_sets = _resolve_index_sets(mapping, configs, layer_plan, problems)

    placeholder = _placeholder_selection(index_sets)

    def meta_load(name: str) -> torch.Tensor:
        if name not in source.shapes:
            raise KeyError(name)
        return torch.empty(source.shapes[name], device="meta")

    sections = {
        section: [(Pattern(p), f"{section}.{p}", rule) for p, rule in getattr(spec, section).items()]
        for section in ("tensors", "rest", "identity_rest")
    }
    matched_rules: set[str] = set()
    entries: list[PlanEntry] = []
    unproduced: dict[str, list[str]] = {}
    used_sources: set[str] = set()

    for name, shape in target.shapes.items():
        found = {s: [(path, rule, m) for pat, path, rule in rules if (m := pat.match(name)) is not None]
                 for s, rules in sections.items()}  # fmt: skip
        layer = next((m["layer"] for s in found.values() for _, _, m in s if "layer" in m), None)
        is_rest = layer is not None and layer_plan.blocks[layer] is None
        globals_ = [c for c in found["tensors"] if "layer" not in c[2]]
        if is_rest:
            candidates = globals_ + (found["identity_rest"] if identity_rest and found["identity_rest"]
                                     else found["rest"])  # fmt: skip
        else:
            candidates = found["tensors"]
        if not candidates:
            section = "rest" if is_rest else "tensors"
            generic = _LAYER_NUMBER.sub("{layer}", name) if layer is not None else name
            unproduced.setdefault(section, []).append(generic)
            continue
        matched_rules.update(path for path, _, _ in candidates)
        if len(candidates) > 1:
            rules = ", ".join(f"`{p.split('.', 1)[1]}`" for p, _, _ in candidates)
            problems.add(candidates[1][0], f"target tensor {name} is produced by {len(candidates)} rules: {rules}")
            continue
        rule_path, rule, _ = candidates[0]
        block = layer_plan.blocks[layer] if layer is not None else None
        binding = {k: v for k, v in (("layer", layer), ("block", block)) if v is not None}
        entry = _plan_entry(name, shape, rule, rule_path, binding, layer, block, configs, index_sets, failed_sets,
                            placeholder, meta_load, dtype, source, problems)  # fmt: skip
        if entry is not None:
            entries.append(entry)
            used_sources.update(entry.sources)

    for section, names in unproduced.items():
        shown = sorted(set(names), key=names.index)
        problems.add(section, f"no rule produces {', '.join(shown)} (target {target.name})")
    unused = [path for rules in sections.values() for _, path, _ in rules if path not in matched_rules]
    if not identity_rest:
        unused = [p for p in unused if not p.startswith("identity_rest.")]
    plan = Plan(
        mapping=mapping,
        source=source,
        target=target,
        layers=layer_plan,
        index_sets=index_sets,
        entries=entries,
        dropped=[n for n in source.shapes if n not in used_sources],
        options={"layers": layer_plan.inherited, "identity_rest": identity_rest, "dtype": dtype, **(options or {})},
        problems=problems.list(),
        warnings=list(layer_plan.warnings),
        unused_rules=unused,
    )
    return plan


def _plan_entry(
    name: str,
    shape: tuple[int, ...],
    rule: Rule,
    rule_path: str,
    binding: dict[str, int],
    layer: int | None,
    block: int | None,
    configs: dict[str, Any],
    index_sets: dict[str, IndexSetPlan],
    failed_sets: frozenset[str],
    placeholder: Callable[[str, int | None], torch.Tensor],
    meta_load: Callable[[str], torch.Tensor],
    dtype: str,
    source: SourceSide,
    problems: _Problems,
) -> PlanEntry | None:
    ops = OpContext(configs, index_sets, placeholder, block, failed_sets)
    ctx = EvalContext(meta_load, lambda _n: torch.empty(0), ops, True)
    expr, expr_path, note = rule.expr, rule_path, ""
    if rule.when is not None:
        try:
            a, b = (ctx.ops.ref(v) for v in rule.when.if_equal)
        except ValueError as exc:
            problems.add(f"{rule_path}.when", str(exc))
            return None
        if _norm(a) != _norm(b):
            expr, expr_path = rule.otherwise, f"{rule_path}.otherwise"
            note = f"otherwise: {rule.when.if_equal[0]}={a!r} != {rule.when.if_equal[1]}={b!r}"
    try:
        node = _bind(expr, expr_path, binding)
        for leaf in node_sources(node):
            if leaf not in source.shapes:
                leaf_path = next(n.path for n, _ in _walk(node) if isinstance(n, SourceNode) and n.name == leaf)
                raise PlanError(f"{leaf_path}.from", f"source tensor {leaf} does not exist in this checkpoint")
        produced = evaluate(node, ctx, Region(name, shape))
        if tuple(produced.shape) != tuple(shape):
            raise PlanError(expr_path, f"produces {tuple(produced.shape)} but target {name} is {tuple(shape)}")
        kind = _classify(node, ctx)
    except PlanError as exc:
        problems.add(exc.path, exc.message)
        return None
    except FailedIndexSetError:
        return None
    expr_text = describe(node, ctx.ops.ref)
    return PlanEntry(name, tuple(shape), rule.dtype or dtype, kind, rule_path, node, layer, block, expr_text, note)


def _placeholder_selection(index_sets: dict[str, IndexSetPlan]) -> Callable[[str, int | None], torch.Tensor]:
    """Index sets before scoring: the first `keep` entries (right counts, for shapes and usage)."""
    return lambda set_name, _block: torch.arange(index_sets[set_name].keep, dtype=torch.long)


def _walk(node: Node) -> list[tuple[Node, str]]:
    out = [(node, node.path)]
    if isinstance(node, ConcatNode):
        for p in node.parts:
            out.extend(_walk(p))
    return out


def referenced_sets(mapping: LoadedMapping) -> dict[str, list[str]]:
    """Index set name -> YAML paths of the ops that use it (for `check`'s unused / unknown set reports)."""
    out: dict[str, list[str]] = {}
    for section in ("tensors", "rest", "identity_rest"):
        for pattern, rule in getattr(mapping.mapping, section).items():
            roots = [(rule.expr, f"{section}.{pattern}")]
            if rule.otherwise is not None:
                roots.append((rule.otherwise, f"{section}.{pattern}.otherwise"))
            for root, root_path in roots:
                for expr, path in iter_exprs(root, root_path):
                    if isinstance(expr, FromExpr):
                        for i, op in enumerate(expr.ops):
                            for name in op.referenced_sets():
                                out.setdefault(name, []).append(f"{path}.ops[{i}]")
    return out


def plan_for_names(
    mapping: LoadedMapping,
    source_name: str,
    target_name: str,
    *,
    layers: int | None = None,
    identity_rest: bool | None = None,
    distilled: bool = False,
) -> Plan:
    """A plan between two registry configs (what `check` verifies), with no checkpoint."""
    source_cfg = get_config(source_name)
    if distilled:
        source_cfg = dataclasses.replace(source_cfg, distilled=True)
    target = TargetSide.from_config(target_name, derive_target_config(target_name, source_cfg))
    return build_plan(mapping, SourceSide.from_config(source_cfg), target, layers=layers, identity_rest=identity_rest)


def registry_pairs(sources: Sequence[str] = ("deit-t", "deit-s", "deit-b"),
                   targets: Sequence[str] = ("vim-t", "vim-s", "vim-b")) -> list[tuple[str, str]]:  # fmt: skip
    return [(s, t) for s in sources for t in targets]
