"""The mapping language's schema: what a mapping file may say, as pydantic models.

A mapping says where every target tensor comes from: a source tensor and an op chain, an initialiser, a fit on
calibration images, or a concat of parts, per target-name pattern (`layers.{layer}.mixer.in_proj.weight`), in
sections for inherited layers (`tensors`; or `sublayers.attn` / `sublayers.mlp` when each student layer inherits one
sub-layer of a teacher block), the layers no teacher block feeds (`rest`, `identity_rest`) and every layer
(`layer_defaults`).
`docs/mappings.md` is the language reference and the shipped files in `mappings/` are worked examples. Reading files
is `files.py`'s job, evaluating rules `interpret.py`'s, resolving them against real architectures the planner's.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
    field_validator,
    model_validator,
)

from tmconvert.converter.configs import target_families
from tmconvert.converter.dtypes import STORABLE
from tmconvert.converter.mapping import ops as ops_mod
from tmconvert.converter.mapping.fits import FITS

FORMAT_VERSION = 1
INITIALISERS = tuple(ops_mod.INITS)
SCORE_SIGNALS = ("residual", "mlp_hidden", "attn_value")
SUBLAYERS = ("attn", "mlp")  # the two residual sub-layers of a teacher block, in order

_TARGET_PLACEHOLDERS = {"layer", "stage"}
_SOURCE_PLACEHOLDERS = {"layer", "block"}
_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")
_REF = re.compile(ops_mod.REF_PATTERN)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True, frozen=True)


IntRef = int | Annotated[str, Field(pattern=ops_mod.REF_PATTERN)]


class IndexSet(_Model):
    """A named choice of channels: `keep` of the teacher's `full` entries along one axis, chosen by scores."""

    full: IntRef = Field(description="width of the teacher axis the set indexes, e.g. source.embed_dim")
    keep: IntRef = Field(description="how many entries the student keeps, e.g. target.embed_dim")
    upto: bool = Field(False, description="keep min(keep, full): a narrower teacher gives all its entries")
    reserve: int = Field(
        0, ge=0, description="the student has this many fewer places (channels a fit sets aside, e.g. a constant)"
    )
    per: Literal["model", "block"] = Field("model", description="one set for the whole model, or one per block")
    score: Literal[SCORE_SIGNALS] = Field(description="which teacher signal ranks the entries")

    # A `keep` (or `full`) that resolves to one width per stage (`target.dims`) makes one set per stage of a
    # hierarchical student, `<name>@<stage>`; a rule in stage s reads its own, `<name>@S` names one (-1: the last).


class OpCall(_Model):
    """One op in a chain, written `{name: args}` in YAML (see `ops.OPS` for the vocabulary)."""

    name: str
    args: Any

    @model_validator(mode="before")
    @classmethod
    def _from_yaml(cls, raw: Any) -> Any:
        if isinstance(raw, dict) and set(raw) == {"name", "args"} and isinstance(raw["args"], BaseModel):
            return raw
        try:
            spec, args = ops_mod.parse_op(raw)
        except ValidationError as exc:
            name = next(iter(raw)) if isinstance(raw, dict) and raw else "op"
            problems = "; ".join(
                f"{'.'.join(map(str, e['loc']))}: {e['msg']}".lstrip(": ").replace("Value error, ", "")
                for e in exc.errors()
            )
            raise ValueError(f"{name}: {problems}") from None
        for field in spec.source_fields:
            _check_placeholders(getattr(args, field), _SOURCE_PLACEHOLDERS)
        return {"name": spec.name, "args": args}

    @property
    def spec(self) -> ops_mod.OpSpec:
        return ops_mod.OPS[self.name]

    def referenced_sets(self) -> list[str]:
        """The index sets this call names (the op declares which of its arguments name one)."""
        values = (getattr(self.args, field) for field in self.spec.set_fields)
        return [value for value in values if value is not None]

    def referenced_sources(self) -> list[str]:
        """The other source tensors this call reads (name templates until bound)."""
        return [getattr(self.args, field) for field in self.spec.source_fields]

    def bound(self, binding: dict[str, int]) -> OpCall:
        """This call with `{layer}` / `{block}` filled in the source tensors it names (KeyError: a missing value)."""
        if not self.spec.source_fields:
            return self
        filled = {field: fill_template(getattr(self.args, field), binding) for field in self.spec.source_fields}
        return self.model_copy(update={"args": self.args.model_copy(update=filled)})

    def describe(self, resolve: Callable[[Any], Any] | None = None) -> str:
        """`select(dim=0, set=hidden)`; with `resolve`, config references show their values (`to=98`)."""
        items = self.args.model_dump(by_alias=True, exclude_defaults=True)
        shown = []
        for key, value in items.items():
            if resolve is not None and is_ref(value):
                with contextlib.suppress(ValueError):
                    value = resolve(value)
            shown.append(f"{key}={value}")
        return f"{self.name}({', '.join(shown)})"


class _ExprBase(_Model):
    size: IntRef | None = Field(None, description="length along the enclosing concat's dim")


class FromExpr(_ExprBase):
    """A source tensor (name template) and an op chain applied to it, left to right."""

    source: str = Field(alias="from")
    ops: list[OpCall] = Field(default_factory=list)

    @field_validator("source")
    @classmethod
    def _placeholders(cls, value: str) -> str:
        _check_placeholders(value, _SOURCE_PLACEHOLDERS)
        return value


class EyeExpr(_ExprBase):
    """The N x N identity, then an op chain: a map that passes channels through, e.g. from one index set to another
    (`select` its rows by one set and its columns by another: 1 where both chose the same teacher channel)."""

    eye: IntRef = Field(description="N, e.g. source.embed_dim")
    ops: list[OpCall] = Field(default_factory=list)


class InitExpr(_ExprBase):
    """A named initialiser (`ops.INITS`): `default` = the target model's upstream init (seeded), constants, and
    kernels that pass their input through."""

    init: Literal[INITIALISERS]


class FitExpr(_ExprBase):
    """A tensor of a student layer fitted to its teacher sub-layer on calibration images (`fits.FITS`)."""

    fit: Literal[tuple(FITS)]


class Concat(_Model):
    dim: int
    parts: list[Expr] = Field(min_length=1)


class ConcatExpr(_ExprBase):
    """Parts joined along `dim`; one part without a known size (an init or a nested concat) fills the remainder."""

    concat: Concat


def _expr_kind(raw: Any) -> str | None:
    if isinstance(raw, dict):
        for key in ("from", "eye", "init", "fit", "concat"):
            if key in raw:
                return key
    if isinstance(raw, BaseModel):
        kinds = {FromExpr: "from", EyeExpr: "eye", InitExpr: "init", FitExpr: "fit", ConcatExpr: "concat"}
        return kinds.get(type(raw))
    return None


Expr = Annotated[
    Annotated[FromExpr, Tag("from")]
    | Annotated[EyeExpr, Tag("eye")]
    | Annotated[InitExpr, Tag("init")]
    | Annotated[FitExpr, Tag("fit")]
    | Annotated[ConcatExpr, Tag("concat")],
    Discriminator(
        _expr_kind,
        custom_error_type="expr_kind",
        custom_error_message="a rule needs one of `from:` (a source tensor), `eye:`, `init:`, `fit:` or `concat:`",
    ),
]
Concat.model_rebuild()


class Guard(_Model):
    """`if_equal: [a, b]`: the rule's expression applies only when both config values are equal."""

    if_equal: tuple[IntRef, IntRef]


class Rule(_Model):
    """The production of the target tensors matching one pattern."""

    expr: Expr
    dtype: Literal[STORABLE] | None = Field(None, description="stored dtype; overrides --dtype (e.g. SSM A_log)")
    when: Guard | None = None
    otherwise: Expr | None = Field(None, description="used when `when` does not hold")

    @model_validator(mode="before")
    @classmethod
    def _split(cls, raw: Any) -> Any:
        if not isinstance(raw, dict) or "expr" in raw:
            return raw
        rule_keys = {"dtype", "when", "otherwise"}
        return {"expr": {k: v for k, v in raw.items() if k not in rule_keys}} | {
            k: v for k, v in raw.items() if k in rule_keys
        }

    @model_validator(mode="after")
    def _guarded(self) -> Rule:
        if (self.when is None) != (self.otherwise is None):
            raise ValueError("`when` and `otherwise` go together")
        return self


class Options(_Model):
    identity_rest: bool = Field(False, description="default of --identity-rest for this mapping")


class Mapping(_Model):
    """A whole mapping file."""

    mapping: Literal[FORMAT_VERSION] = Field(description="format version of the file")
    name: str | None = None
    description: str = ""
    source: Literal["vit"]
    target: str = Field(description="target family: any registered family a conversion can produce (vim, ...)")
    default_for: list[str] = Field(default_factory=list, description="registry targets this mapping is default for")
    supports: list[tuple[str, str]] | None = Field(None, description="(source, target) pairs `check` verifies")
    requires: dict[str, Any] = Field(default_factory=dict, description="source config fields that must match")
    options: Options = Field(default_factory=Options)
    index_sets: dict[str, IndexSet] = Field(default_factory=dict)
    tensors: dict[str, Rule]
    sublayers: dict[Literal[SUBLAYERS], dict[str, Rule]] = Field(
        default_factory=dict,
        description="per-layer rules when each student layer inherits one teacher sub-layer: student layers 2i and "
        "2i+1 take block i's attention and MLP (the layer plan interleaves); `tensors` then holds the other tensors",
    )
    rest: dict[str, Rule] = Field(default_factory=dict, description="layers no teacher block feeds")
    identity_rest: dict[str, Rule] = Field(default_factory=dict, description="overrides of `rest` (--identity-rest)")
    layer_defaults: dict[str, Rule] = Field(
        default_factory=dict, description="per-layer rules for every layer that `tensors` / `rest` leave unproduced"
    )
    drops: dict[str, str] = Field(
        default_factory=dict, description="source tensors left out on purpose: glob pattern -> why (shown in plans)"
    )

    @field_validator("target")
    @classmethod
    def _target_family(cls, family: str) -> str:
        known = target_families()
        if family not in known:
            raise ValueError(f"unknown target family {family!r}; mappings convert into: {', '.join(known)}")
        return family

    @field_validator("index_sets")
    @classmethod
    def _set_names(cls, sets: dict[str, IndexSet]) -> dict[str, IndexSet]:
        for name in sets:
            if "@" in name:
                raise ValueError(f"index set {name!r}: `@` is kept for naming a stage's set (`residual@2`)")
        return sets

    @field_validator("tensors", "rest", "identity_rest", "layer_defaults")
    @classmethod
    def _patterns(cls, rules: dict[str, Rule]) -> dict[str, Rule]:
        for pattern in rules:
            _check_placeholders(pattern, _TARGET_PLACEHOLDERS)
        return rules

    @field_validator("sublayers")
    @classmethod
    def _sublayer_patterns(cls, sections: dict[str, dict[str, Rule]]) -> dict[str, dict[str, Rule]]:
        for rules in sections.values():
            cls._patterns(rules)
        return sections

    @model_validator(mode="after")
    def _interleaved(self) -> Mapping:
        if self.sublayers:
            missing = [kind for kind in SUBLAYERS if kind not in self.sublayers]
            if missing:
                raise ValueError(f"sublayers needs a section for each sub-layer; missing: {', '.join(missing)}")
            per_layer = [p for p in self.tensors if "{layer}" in p]
            if per_layer:
                where = "sublayers.attn / sublayers.mlp"
                raise ValueError(f"with sublayers, per-layer rules go under {where}, not tensors: {per_layer[0]}")
        return self

    def rule_sections(self) -> dict[str, dict[str, Rule]]:
        """Every rule section by its YAML path prefix (`tensors`, `sublayers.attn`, ...)."""
        sections = {"tensors": self.tensors}
        sections.update({f"sublayers.{kind}": rules for kind, rules in self.sublayers.items()})
        sections.update({"rest": self.rest, "identity_rest": self.identity_rest, "layer_defaults": self.layer_defaults})
        return sections


# ---------------------------------------------------------------------------------------------------------------
# Name patterns


def _check_placeholders(template: str, allowed: set[str]) -> None:
    for name in _PLACEHOLDER.findall(template):
        if name not in allowed:
            raise ValueError(f"unknown placeholder {{{name}}} in {template!r}; allowed: {sorted(allowed)}")
    stripped = _PLACEHOLDER.sub("", template)
    if "{" in stripped or "}" in stripped:
        raise ValueError(f"unbalanced braces in {template!r}")


@dataclass(frozen=True)
class Pattern:
    """A target-name pattern: `{layer}` matches a layer index, `{stage}` a stage index (a hierarchical student's
    `layers.{stage}.blocks.{layer}`: `{layer}` is then the block within the stage), `*` any non-empty run."""

    text: str

    @functools.cached_property
    def regex(self) -> re.Pattern[str]:
        out, pos = [], 0
        for m in re.finditer(r"\{layer\}|\{stage\}|\*", self.text):
            out.append(re.escape(self.text[pos : m.start()]))
            out.append(rf"(?P<{m.group()[1:-1]}>\d+)" if m.group() != "*" else r".+")
            pos = m.end()
        out.append(re.escape(self.text[pos:]))
        return re.compile("".join(out) + r"\Z")

    def match(self, name: str) -> dict[str, int] | None:
        m = self.regex.match(name)
        if m is None:
            return None
        return {k: int(v) for k, v in m.groupdict().items()}


def fill_template(template: str, binding: dict[str, int]) -> str:
    """Substitute `{layer}` / `{block}`; a placeholder without a value raises KeyError naming it."""
    return _PLACEHOLDER.sub(lambda m: str(binding[m.group(1)]), template)


def is_ref(value: Any) -> bool:
    return isinstance(value, str) and _REF.match(value) is not None


def iter_exprs(expr: Any, path: str) -> Iterator[tuple[Any, str]]:
    """Every expression node of a rule with its YAML path (depth first, parts in order)."""
    yield expr, path
    if isinstance(expr, ConcatExpr):
        for i, part in enumerate(expr.concat.parts):
            yield from iter_exprs(part, f"{path}.concat.parts[{i}]")
