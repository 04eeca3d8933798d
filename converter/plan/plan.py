"""The conversion plan: a mapping resolved against one source and one target, as data.

`build_plan` binds every target tensor (from the target model's meta state dict, the one source of truth for target
names and shapes) to exactly one mapping rule, fills the `{layer}` / `{block}` placeholders from the layer plan (a
hierarchical target, whose config has per-stage `depths`, names its layers `{stage}` and `{layer}`), and
propagates shapes by evaluating each expression on `meta` tensors with `evaluate` — the very function the engine runs
on real tensors. The result prints as a table (`--dry-run`), serialises to JSON (`--json`), and is what the engine
executes. Problems are collected, not raised one by one, so `tmconvert check` can report all of them.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from tmconvert.converter import dtypes
from tmconvert.converter.configs import config_json
from tmconvert.converter.mapping.errors import MappingError
from tmconvert.converter.mapping.files import LoadedMapping
from tmconvert.converter.mapping.fits import FITS
from tmconvert.converter.mapping.interpret import (
    ConcatNode,
    EvalContext,
    FailedIndexSetError,
    FitNode,
    Node,
    OpContext,
    Region,
    RuleError,
    SourceNode,
    apply_chain,
    bind,
    describe,
    evaluate,
    filling_inits,
    node_inits,
    node_sources,
    source_paths,
    walk,
)
from tmconvert.converter.mapping.ops import OpSpec
from tmconvert.converter.mapping.schema import Pattern, Rule
from tmconvert.converter.plan.layers import LayerPlan, plan_layers
from tmconvert.models import ViTConfig, family_of, state_dict_shapes

KINDS = ("inherited", "subcloned", "fitted", "partial", "initialised")


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
        shapes = state_dict_shapes(cfg)
        return cls(cfg, shapes, {k: torch.float32 for k in shapes})


@dataclass(frozen=True)
class TargetSide:
    name: str  # registry name the config came from (vim-s), for messages and metadata
    config: Any  # the target family's config
    shapes: dict[str, tuple[int, ...]]  # in the target's state_dict order

    @classmethod
    def from_config(cls, name: str, cfg: Any) -> TargetSide:
        return cls(name, cfg, state_dict_shapes(cfg))


@dataclass(frozen=True)
class IndexSetPlan:
    """An index set resolved for this pair: `keep` of `full` entries, ranked by the teacher signal `score`, chosen
    once for the model (`blocks` = (None,)) or once per teacher block the layer plan uses. A set declared with one
    width per stage resolves to one plan per stage, named `<set>@<stage>` (its blocks: those its stage inherits)."""

    name: str
    full: int
    keep: int
    per: str
    score: str  # residual | mlp_hidden | attn_value
    blocks: tuple[int | None, ...]


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
    stage: int | None = None  # the stage of a hierarchical target the tensor belongs to (its per-stage index sets)

    @property
    def sources(self) -> list[str]:
        return node_sources(self.node)

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.storable(self.dtype).itemsize


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

    def drop_reasons(self) -> dict[str, tuple[str, list[str]]]:
        """The `drops` patterns that match dropped tensors: pattern -> (why, the tensors); the first match wins."""
        out: dict[str, tuple[str, list[str]]] = {}
        for name in self.dropped:
            for pattern, why in self.mapping.mapping.drops.items():
                if fnmatch.fnmatchcase(name, pattern):
                    out.setdefault(pattern, (why, []))[1].append(name)
                    break
        return out

    def counts(self) -> dict[str, int]:
        out = {kind: 0 for kind in KINDS}
        for entry in self.entries:
            out[entry.kind] += 1
        out["dropped"] = len(self.dropped)
        return out

    def write_order(self) -> list[PlanEntry]:
        """Tensors in the order their bytes are written: wider dtypes first (keeps every offset aligned)."""
        return sorted(self.entries, key=lambda e: -dtypes.storable(e.dtype).itemsize)

    @property
    def output_bytes(self) -> int:
        return sum(e.nbytes for e in self.entries)

    @property
    def needs_default_init(self) -> bool:
        return any("default" in node_inits(e.node) for e in self.entries)

    @property
    def needs_fit(self) -> bool:
        """Whether some tensor is fitted on calibration images (the engine then runs the teacher on them)."""
        return any(isinstance(node, FitNode) for e in self.entries for node, _ in walk(e.node))

    def peak_memory_bytes(self, *, activation_scoring: bool = False) -> int:
        """Estimate: the default-initialised target (fp32), a few fp32 copies of the largest source tensor, the
        output tensor being written, and the fp32 teacher while activation scores are computed."""
        target_fp32 = sum(math.prod(s) for s in self.target.shapes.values()) * 4 if self.needs_default_init else 0
        largest = max((math.prod(s) for s in self.source.shapes.values()), default=0) * 4
        teacher = sum(math.prod(s) for s in self.source.shapes.values()) * 4 if activation_scoring else 0
        largest_out = max((e.nbytes for e in self.entries), default=0)
        return target_fp32 + max(3 * largest + largest_out, teacher)

    def _meta_load(self, name: str) -> torch.Tensor:
        return torch.empty(self.source.shapes[name], device="meta")

    def source_usage(self) -> dict[str, float]:
        """Source tensors only partly read (Q/K rows of qkv, unselected channels): name -> fraction of entries used.

        Traces each op chain on a tensor of element ids (`apply_chain(trace=True)`; the plan's placeholder index
        sets keep as many entries as the real ones).
        """
        configs = {"source": self.source.config, "target": self.target.config}
        masks: dict[str, torch.Tensor] = {}
        for entry in self.entries:
            ops_ctx = OpContext(
                configs,
                self.index_sets,
                _placeholder_selection(self.index_sets),
                entry.block,
                load=self._meta_load,
                stage=entry.stage,
            )
            for node, _ in walk(entry.node):
                if not isinstance(node, SourceNode):
                    continue
                shape = self.source.shapes[node.name]
                ids = torch.arange(math.prod(shape)).reshape(shape)
                used = apply_chain(node, ids, ops_ctx, trace=True)
                mask = masks.setdefault(node.name, torch.zeros(ids.numel(), dtype=torch.bool))
                mask[used.reshape(-1)] = True
        return {name: mask.float().mean().item() for name, mask in masks.items() if not bool(mask.all())}

    def to_json(self) -> dict[str, Any]:
        return {
            "mapping": {"name": self.mapping.name, "path": str(self.mapping.path), "sha256": self.mapping.sha256},
            "source": {"family": family_of(self.source.config), "config": config_json(self.source.config)},
            "target": {
                "name": self.target.name,
                "family": family_of(self.target.config),
                "config": config_json(self.target.config),
            },
            "options": self.options,
            "layers": self.layers.to_json(),
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
            "dropped_why": {p: {"why": why, "tensors": names} for p, (why, names) in self.drop_reasons().items()},
            "partly_used": {name: round(f, 4) for name, f in self.source_usage().items()},
            "counts": self.counts(),
            "output_bytes": self.output_bytes,
            "peak_memory_bytes": self.peak_memory_bytes(activation_scoring=self.options.get("score") == "activation"),
            "warnings": self.warnings,
            "unused_rules": self.unused_rules,
        }


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
    mapping: LoadedMapping, configs: dict[str, Any], layers: LayerPlan, problems: _Problems, warnings: list[str]
) -> tuple[dict[str, IndexSetPlan], frozenset[str]]:
    """The declared index sets that resolve, and the names of those that do not (each reported once here). A stage
    wider than the teacher that an `upto` set fills is worth a warning: part of that stage is not the teacher's."""
    sets: dict[str, IndexSetPlan] = {}
    wider_stages: dict[str, list[str]] = {}  # stage -> "set places of entries", for one warning per stage
    ctx = OpContext(configs, {}, None, None)
    for name, spec in mapping.mapping.index_sets.items():
        path = f"index_sets.{name}"
        try:
            full, keep = ctx.ref(spec.full), ctx.ref(spec.keep)
        except ValueError as exc:
            problems.add(path, str(exc))
            continue
        staged = isinstance(full, (tuple, list)) or isinstance(keep, (tuple, list))
        if staged:  # one width per stage of a hierarchical student
            if len(layers.stages) < 2:
                problems.add(path, f"gives one width per stage ({spec.full}, {spec.keep}), and this target has none")
                continue
            fulls, keeps = (list(v) if isinstance(v, (tuple, list)) else [v] * len(layers.stages) for v in (full, keep))
            if len(fulls) != len(layers.stages) or len(keeps) != len(layers.stages):
                problems.add(path, f"needs one width per stage ({len(layers.stages)}), got {full!r} and {keep!r}")
                continue
            widths = {f"{name}@{s}": (f, k) for s, (f, k) in enumerate(zip(fulls, keeps, strict=True))}
        else:
            widths = {name: (full, keep)}
        if not all(isinstance(v, int) and not isinstance(v, bool) for pair in widths.values() for v in pair):
            problems.add(path, f"full and keep must resolve to integers, got {full!r} and {keep!r}")
            continue
        planned, refused = {}, []
        for key, (full_s, keep_s) in widths.items():
            keep_s -= spec.reserve  # the student's room, less the channels the rules set aside
            if spec.upto and keep_s > full_s:
                if staged:
                    wider_stages.setdefault(key.rpartition("@")[2], []).append(
                        f"{key} {keep_s} of {full_s} ({spec.full})"
                    )
                keep_s = full_s
            if keep_s <= 0 or keep_s > full_s:
                where = f"stage {key.rpartition('@')[2]} " if staged else ""
                refused.append(f"{where}keeps {keep_s} ({spec.keep}) of {full_s} ({spec.full}) entries")
                continue
            stage = int(key.rpartition("@")[2]) if staged else None
            blocks = layers.used_blocks(stage) if spec.per == "block" else (None,)
            planned[key] = IndexSetPlan(key, full_s, keep_s, spec.per, spec.score, tuple(blocks))
        if refused:
            wider = "a stage wider than the teacher" if staged else "a student wider than the teacher"
            problems.add(
                path,
                f"{'; '.join(refused)}: {wider} cannot be subcloned (use a teacher at least as wide, or "
                "`upto: true` with a fill part)",
            )
            continue
        sets.update(planned)
    for stage, items in wider_stages.items():
        warnings.append(
            f"stage {stage} is wider than the teacher ({', '.join(items)}): it keeps every teacher entry, and the "
            "mapping's fill parts make the rest"
        )
    resolved = {key.partition("@")[0] for key in sets}
    return sets, frozenset(mapping.mapping.index_sets) - frozenset(resolved)


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


def accepts_source(mapping: LoadedMapping, source: Any) -> bool:
    """Whether a mapping converts sources of this config (its family, and what its `requires.source` asks)."""
    if mapping.mapping.source != family_of(source):
        return False
    return not any(p.path.startswith("requires.source") for p in _check_requires(mapping, {"source": source}))


def _norm(value: Any) -> Any:
    return list(value) if isinstance(value, tuple) else value


def _classify(node: Node, ctx: EvalContext, region: Region) -> str:
    """inherited: every value copied from the source (possibly re-laid out); subcloned: some op picked a subset or
    changed values (each op says when it does); fitted: solved on calibration images from the teacher's sub-layer;
    initialised: no source at all; partial: both source and init (an init part that comes out empty, a fill for
    entries this pair does not have, does not count)."""
    if any(isinstance(leaf, FitNode) for leaf, _ in walk(node)):
        return "fitted"
    has_source = bool(node_sources(node))
    has_init = bool(filling_inits(node, ctx, region))
    if has_source and has_init:
        return "partial"
    if not has_source:
        return "initialised"
    verdicts: list[bool] = []

    def judge(spec: OpSpec, kwargs: dict[str, Any], before: torch.Tensor, after: torch.Tensor) -> None:
        verdicts.append(spec.subclones(kwargs, before, after))

    for leaf, _ in walk(node):
        if isinstance(leaf, SourceNode):
            apply_chain(leaf, ctx.load(leaf.name), ctx.ops, observe=judge)
    return "subcloned" if any(verdicts) else "inherited"


_LAYER_NUMBER = re.compile(r"(?<=\blayers\.)\d+(?=\.)")  # every family keeps its layers under `layers.`
_DIGITS = re.compile(r"\d+")


class _RuleIndex:
    """One section's rules, found for a target name in time independent of how many there are: literal names and
    `{layer}` templates by dictionary (a name's digit runs are tried as the layer), `*` and `{stage}` patterns by
    regex."""

    def __init__(self, section: str, rules: dict[str, Rule]):
        self.paths = [f"{section}.{p}" for p in rules]  # declaration order
        self._by_text: dict[str, tuple[int, str, Rule]] = {}
        self._scanned: list[tuple[int, Pattern, str, Rule]] = []
        for order, (text, rule) in enumerate(rules.items()):
            path = f"{section}.{text}"
            if "*" in text or "{stage}" in text or re.search(r"\d\{layer\}|\{layer\}\d", text):  # ask the regex
                self._scanned.append((order, Pattern(text), path, rule))
            else:
                self._by_text[text] = (order, path, rule)

    def matching(self, name: str) -> list[tuple[str, Rule, dict[str, int]]]:
        """(YAML path, rule, binding) of every rule matching `name`, in declaration order."""
        found: list[tuple[int, str, Rule, dict[str, int]]] = []
        if name in self._by_text:
            order, path, rule = self._by_text[name]
            found.append((order, path, rule, {}))
        for digits in _DIGITS.finditer(name):
            template = f"{name[: digits.start()]}{{layer}}{name[digits.end() :]}"
            if template in self._by_text:
                order, path, rule = self._by_text[template]
                found.append((order, path, rule, {"layer": int(digits.group())}))
        for order, pattern, path, rule in self._scanned:
            if (binding := pattern.match(name)) is not None:
                found.append((order, path, rule, binding))
        return [(path, rule, binding) for _, path, rule, binding in sorted(found, key=lambda f: f[0])]


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
    dtype = dtypes.storable(dtype).name
    if identity_rest is None:
        identity_rest = spec.options.identity_rest
    source_family, target_family = family_of(source.config), family_of(target.config)
    if spec.source != source_family or spec.target != target_family:
        raise MappingError(
            f"{mapping.path}: mapping {mapping.name} converts {spec.source} -> {spec.target}, "
            f"not {source_family} -> {target_family}"
        )
    configs = {"source": source.config, "target": target.config}
    stages = tuple(getattr(target.config, "depths", ()))  # a hierarchical target's blocks per stage
    if spec.sublayers and stages:
        raise MappingError(
            f"{mapping.where('sublayers')}: sub-layer interleaving feeds one stack of layers; "
            f"{target.name} has {len(stages)} stages"
        )
    layer_plan = plan_layers(
        layers, source.config.depth, target.config.depth, interleaved=bool(spec.sublayers), stages=stages
    )
    problems = _Problems()
    for problem in _check_requires(mapping, configs):
        problems.add(problem.path, problem.message)
    set_warnings: list[str] = []
    index_sets, failed_sets = _resolve_index_sets(mapping, configs, layer_plan, problems, set_warnings)
    planner = _Planner(configs, index_sets, failed_sets, source, dtype, problems, layer_plan)

    sections = {section: _RuleIndex(section, rules) for section, rules in spec.rule_sections().items()}
    matched_rules: set[str] = set()
    entries: list[PlanEntry] = []
    unproduced: dict[str, list[str]] = {}
    used_sources: set[str] = set()

    for name, shape in target.shapes.items():
        found = {s: rules.matching(name) for s, rules in sections.items()}
        binding = next((m for s in found.values() for _, _, m in s if m), {})
        layer, stage = _place(binding, layer_plan)
        if layer is None and not any(found.values()) and (number := _LAYER_NUMBER.search(name)) and not stages:
            layer = int(number.group())  # no rule at all: still say which section lacks one
        is_rest = layer is not None and layer_plan.blocks[layer] is None
        globals_ = [c for c in found["tensors"] if "layer" not in c[2]]
        if is_rest:
            candidates = globals_ + (
                found["identity_rest"] if identity_rest and found["identity_rest"] else found["rest"]
            )
        elif layer is not None and layer_plan.interleaved:
            candidates = globals_ + found[f"sublayers.{layer_plan.sublayers[layer]}"]
        else:
            candidates = found["tensors"]
        matched_rules.update(path for path, _, _ in found["layer_defaults"])  # a default may go unneeded
        if not candidates and layer is not None:
            candidates = found["layer_defaults"]  # what every layer gets unless its section says otherwise
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
        entry = planner.entry(name, shape, rule, rule_path, layer, block, stage)
        if entry is not None:
            entries.append(entry)
            used_sources.update(entry.sources)

    for section, names in unproduced.items():
        shown = sorted(set(names), key=names.index)
        problems.add(section, f"no rule produces {', '.join(shown)} (target {target.name})")
    unused = [path for rules in sections.values() for path in rules.paths if path not in matched_rules]
    if not identity_rest:
        unused = [p for p in unused if not p.startswith("identity_rest.")]
    return Plan(
        mapping=mapping,
        source=source,
        target=target,
        layers=layer_plan,
        index_sets=index_sets,
        entries=entries,
        dropped=[n for n in source.shapes if n not in used_sources],
        options={"layers": layer_plan.effective, "identity_rest": identity_rest, "dtype": dtype, **(options or {})},
        problems=problems.list(),
        warnings=[*layer_plan.warnings, *set_warnings],
        unused_rules=unused,
    )


def _place(binding: dict[str, int], layers: LayerPlan) -> tuple[int | None, int | None]:
    """(student layer, stage) of a tensor matched with `binding`: `{stage}` and `{layer}` name block `layer` of a
    stage (a layer numbered over all stages), `{stage}` alone a stage's own tensors (e.g. its downsampling)."""
    stage = binding.get("stage")
    if "layer" not in binding:
        return None, stage
    if stage is None:
        where = layers.position(binding["layer"])
        return binding["layer"], None if where is None else where[0]
    return layers.layer_at(stage, binding["layer"]), stage


class _Planner:
    """Binds one rule to one target tensor and checks it on meta tensors; what every entry of a plan shares."""

    def __init__(
        self,
        configs: dict[str, Any],
        index_sets: dict[str, IndexSetPlan],
        failed_sets: frozenset[str],
        source: SourceSide,
        dtype: str,
        problems: _Problems,
        layers: LayerPlan,
    ):
        self.configs, self.index_sets, self.failed_sets = configs, index_sets, failed_sets
        self.source, self.dtype, self.problems, self.layers = source, dtype, problems, layers
        self.placeholder = _placeholder_selection(index_sets)

    def _meta_load(self, name: str) -> torch.Tensor:
        if name not in self.source.shapes:
            raise KeyError(name)
        return torch.empty(self.source.shapes[name], device="meta")

    def entry(
        self,
        name: str,
        shape: tuple[int, ...],
        rule: Rule,
        rule_path: str,
        layer: int | None,
        block: int | None,
        stage: int | None = None,
    ) -> PlanEntry | None:
        """The plan entry for target `name` made by `rule` (None, with the problem recorded, when it fails)."""
        ops = OpContext(
            self.configs, self.index_sets, self.placeholder, block, self.failed_sets, self._meta_load, stage
        )
        ctx = EvalContext(self._meta_load, lambda _n: torch.empty(0), ops, True)
        expr, expr_path, note = rule.expr, rule_path, ""
        if rule.when is not None:
            try:
                a, b = (ctx.ops.ref(v) for v in rule.when.if_equal)
            except ValueError as exc:
                self.problems.add(f"{rule_path}.when", str(exc))
                return None
            if _norm(a) != _norm(b):
                expr, expr_path = rule.otherwise, f"{rule_path}.otherwise"
                note = f"otherwise: {rule.when.if_equal[0]}={a!r} != {rule.when.if_equal[1]}={b!r}"
        binding = {k: v for k, v in (("layer", layer), ("block", block)) if v is not None}
        try:
            node = self._fit_sources(bind(expr, expr_path, binding), layer)
            for leaf, leaf_path in source_paths(node):
                if leaf not in self.source.shapes:
                    raise RuleError(leaf_path, f"source tensor {leaf} does not exist in this checkpoint")
            produced = evaluate(node, ctx, Region(name, shape))
            if tuple(produced.shape) != tuple(shape):
                raise RuleError(expr_path, f"produces {tuple(produced.shape)} but target {name} is {tuple(shape)}")
            kind = _classify(node, ctx, Region(name, shape))
        except RuleError as exc:
            self.problems.add(exc.path, exc.message)
            return None
        except FailedIndexSetError:
            return None
        expr_text = describe(node, ctx.ops.ref)
        return PlanEntry(
            name, tuple(shape), rule.dtype or self.dtype, kind, rule_path, node, layer, block, expr_text, note, stage
        )

    def _fit_sources(self, node: Node, layer: int | None) -> Node:
        """A fit reads what the teacher has of its declared sources (LayerScale, biases); it needs its index sets,
        and it must sit in a layer that inherits the sub-layer it reproduces."""
        if isinstance(node, ConcatNode):
            return dataclasses.replace(node, parts=tuple(self._fit_sources(p, layer) for p in node.parts))
        if not isinstance(node, FitNode):
            return node
        spec = FITS[node.fit]
        family = family_of(self.configs["target"])
        if family not in spec.families:
            raise RuleError(
                f"{node.path}.fit",
                f"fit {node.fit} builds a layer of {' / '.join(spec.families)}; a {family} target has no such layer "
                "(fits are ViM-only: use `from:` / `init:` rules)",
            )
        missing = [s for s in spec.sets if s not in self.index_sets and s not in self.failed_sets]
        if missing:
            raise RuleError(f"{node.path}.fit", f"fit {node.fit} needs index sets {', '.join(missing)} (index_sets)")
        part = self.layers.sublayers[layer] if layer is not None else None
        if part != spec.sublayer:
            raise RuleError(
                f"{node.path}.fit",
                f"fit {node.fit} reproduces a teacher {spec.sublayer} sub-layer; this layer takes {part} "
                f"(use it under sublayers.{spec.sublayer})",
            )
        return dataclasses.replace(node, sources=tuple(s for s in node.sources if s in self.source.shapes))


def _placeholder_selection(index_sets: dict[str, IndexSetPlan]) -> Callable[[str, int | None], torch.Tensor]:
    """Index sets before scoring: the first `keep` entries (right counts, for shapes and usage)."""
    return lambda set_name, _block: torch.arange(index_sets[set_name].keep, dtype=torch.long)
