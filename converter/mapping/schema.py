"""Mapping files: the declarative language that says where every target tensor comes from.

A mapping is YAML read with `yaml.safe_load` (no tags that construct objects) and validated by the pydantic models
below; `docs/mappings.md` is the language reference and the shipped files in `mappings/` are worked examples. This
module only knows the language: schema, loading with YAML paths and line numbers for messages, and the name patterns.
Resolving a mapping against real architectures is `plan.py`'s job.
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
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

from tmconvert.converter.errors import MappingError
from tmconvert.converter.mapping import ops as ops_mod
from tmconvert.converter.yamlfile import read_yaml

FORMAT_VERSION = 1
INITIALISERS = ("default", "zeros", "ones", "conv_identity")
SCORE_SIGNALS = ("residual", "mlp_hidden", "attn_value")
DTYPES = ("float32", "float16", "bfloat16")

_TARGET_PLACEHOLDERS = {"layer"}
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
    per: Literal["model", "block"] = Field("model", description="one set for the whole model, or one per block")
    score: Literal[SCORE_SIGNALS] = Field(description="which teacher signal ranks the entries")


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
        return {"name": spec.name, "args": args}

    @property
    def spec(self) -> ops_mod.OpSpec:
        return ops_mod.OPS[self.name]

    def referenced_sets(self) -> list[str]:
        for field in ("set", "sqrt_ratio"):
            value = getattr(self.args, field, None)
            if value is not None:
                return [value]
        return []

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


class InitExpr(_ExprBase):
    """A named initialiser: `default` = the target model's upstream init (seeded), `zeros`, `ones`, `conv_identity`
    (a causal conv kernel that passes its input through: last tap 1, the others 0)."""

    init: Literal[INITIALISERS]


class Concat(_Model):
    dim: int
    parts: list[Expr] = Field(min_length=1)


class ConcatExpr(_ExprBase):
    """Parts joined along `dim`; one part without a known size (an init or a nested concat) fills the remainder."""

    concat: Concat


def _expr_kind(raw: Any) -> str | None:
    if isinstance(raw, dict):
        for key in ("from", "init", "concat"):
            if key in raw:
                return key
    if isinstance(raw, BaseModel):
        return {FromExpr: "from", InitExpr: "init", ConcatExpr: "concat"}.get(type(raw))
    return None


Expr = Annotated[
    Annotated[FromExpr, Tag("from")] | Annotated[InitExpr, Tag("init")] | Annotated[ConcatExpr, Tag("concat")],
    Discriminator(
        _expr_kind,
        custom_error_type="expr_kind",
        custom_error_message="a rule needs one of `from:` (a source tensor), `init:` or `concat:`",
    ),
]
Concat.model_rebuild()


class Guard(_Model):
    """`if_equal: [a, b]`: the rule's expression applies only when both config values are equal."""

    if_equal: tuple[IntRef, IntRef]


class Rule(_Model):
    """The production of the target tensors matching one pattern."""

    expr: Expr
    dtype: Literal[DTYPES] | None = Field(None, description="stored dtype; overrides --dtype (e.g. SSM A_log)")
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


class Supports(_Model):
    source: str
    target: str


class Options(_Model):
    identity_rest: bool = Field(False, description="default of --identity-rest for this mapping")


class Mapping(_Model):
    """A whole mapping file."""

    mapping: Literal[FORMAT_VERSION] = Field(description="format version of the file")
    name: str | None = None
    description: str = ""
    source: Literal["vit"]
    target: Literal["vim"]
    default_for: list[str] = Field(default_factory=list, description="registry targets this mapping is default for")
    supports: list[tuple[str, str]] | None = Field(None, description="(source, target) pairs `check` verifies")
    requires: dict[str, Any] = Field(default_factory=dict, description="source config fields that must match")
    options: Options = Field(default_factory=Options)
    index_sets: dict[str, IndexSet] = Field(default_factory=dict)
    tensors: dict[str, Rule]
    rest: dict[str, Rule] = Field(default_factory=dict, description="layers no teacher block feeds")
    identity_rest: dict[str, Rule] = Field(default_factory=dict, description="overrides of `rest` (--identity-rest)")

    @field_validator("tensors", "rest", "identity_rest")
    @classmethod
    def _patterns(cls, rules: dict[str, Rule]) -> dict[str, Rule]:
        for pattern in rules:
            _check_placeholders(pattern, _TARGET_PLACEHOLDERS)
        return rules


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
    """A target-name pattern: `{layer}` matches a layer index, `*` any non-empty run of characters."""

    text: str

    @property
    def regex(self) -> re.Pattern[str]:
        out, pos = [], 0
        for m in re.finditer(r"\{layer\}|\*", self.text):
            out.append(re.escape(self.text[pos : m.start()]))
            out.append(r"(?P<layer>\d+)" if m.group() == "{layer}" else r".+")
            pos = m.end()
        out.append(re.escape(self.text[pos:]))
        return re.compile("".join(out) + r"\Z")

    @property
    def per_layer(self) -> bool:
        return "{layer}" in self.text

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


# ---------------------------------------------------------------------------------------------------------------
# Loading


@dataclass(frozen=True)
class LoadedMapping:
    """A validated mapping with where it came from: file, sha256 of its bytes, and YAML path -> line."""

    mapping: Mapping
    path: Path
    sha256: str
    lines: dict[tuple[Any, ...], int]

    @property
    def name(self) -> str:
        return self.mapping.name or self.path.stem

    def where(self, yaml_path: str) -> str:
        """`file:line: yaml.path` for messages (line of the deepest existing node on the path)."""
        line = self.line_of(yaml_path)
        return f"{self.path}:{line}: {yaml_path}" if line else f"{self.path}: {yaml_path}"

    def line_of(self, yaml_path: str) -> int | None:
        key = _parse_yaml_path(yaml_path)
        while key:
            if key in self.lines:
                return self.lines[key]
            key = key[:-1]
        return None


def format_yaml_path(loc: Iterable[Any]) -> str:
    """('tensors', 'a.b', 'ops', 1) -> 'tensors.a.b.ops[1]' (pattern keys stay verbatim)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_SECTIONS_WITH_PATTERN_KEYS = ("tensors", "rest", "identity_rest", "index_sets")


def _parse_yaml_path(text: str) -> tuple[Any, ...]:
    """Inverse of `format_yaml_path` for our files: the key after a section name may itself contain dots."""
    head, _, rest = text.partition(".")
    if head in _SECTIONS_WITH_PATTERN_KEYS and rest:
        # the pattern key ends where a known rule field starts
        m = re.search(r"\.(from|ops|init|concat|dtype|when|otherwise|size|full|keep|upto|per|score)(\.|\[|$)", rest)
        key, tail = (rest[: m.start()], rest[m.start() + 1 :]) if m else (rest, "")
        return (head, key, *_split_simple(tail))
    return _split_simple(text)


def _split_simple(text: str) -> tuple[Any, ...]:
    out: list[Any] = []
    for token in re.finditer(r"([^.\[\]]+)|\[(\d+)\]", text):
        out.append(int(token.group(2)) if token.group(2) is not None else token.group(1))
    return tuple(out)


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """Drop pydantic's internal `expr` level and union tags so a loc reads like the YAML path."""
    out: list[Any] = []
    previous: Any = None
    for part in loc:
        is_tag = part in ("from", "init", "concat") and (
            previous in ("expr", "otherwise") or (isinstance(previous, int) and "parts" in out)
        )
        if part != "expr" and not is_tag:
            out.append(part)
        previous = part
    return tuple(out)


def load_mapping(path: str | Path) -> LoadedMapping:
    """Read and validate one mapping file; every schema problem is reported in one MappingError (one per line)."""
    doc = read_yaml(path, MappingError, "mapping")
    path, data, raw_bytes, lines = doc.path, doc.data, doc.raw, doc.lines
    dups = [f"{format_yaml_path(loc)} (line {line})" for loc, line in doc.duplicates]
    loaded_partial = LoadedMapping(mapping=None, path=path, sha256="", lines=lines)  # type: ignore[arg-type]
    problems = [f"{path}: duplicate key {d}" for d in dups]
    if not isinstance(data, dict):
        problems.append(f"{path}: a mapping file is a YAML mapping with `mapping: {FORMAT_VERSION}`, `tensors:`, ...")
        raise MappingError("\n".join(problems))
    try:
        mapping = Mapping.model_validate(data)
    except ValidationError as exc:
        for err in exc.errors():
            loc = _clean_loc(tuple(err["loc"]))
            message = err["msg"].removeprefix("Value error, ")
            problems.append(f"{loaded_partial.where(format_yaml_path(loc))}: {message}")
        raise MappingError("\n".join(problems)) from None
    if problems:
        raise MappingError("\n".join(problems))
    return LoadedMapping(mapping=mapping, path=path, sha256=hashlib.sha256(raw_bytes).hexdigest(), lines=lines)


def is_mapping_file(path: Path) -> bool:
    """A YAML file is a mapping file when its top level has the `mapping:` version key (the folder also holds
    other YAML, e.g. distillation recipes with `recipe:`); a file that does not parse counts, so `check` sees it."""
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8", errors="replace"))
    except yaml.YAMLError:
        return True
    return not isinstance(data, dict) or "mapping" in data or "recipe" not in data


def shipped_mapping_paths() -> list[Path]:
    """The mapping files installed with tmconvert (`tmconvert/mappings/*.yaml`), sorted by name."""
    folder = resources.files("tmconvert.mappings")
    files = (Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml"))
    return sorted(p for p in files if is_mapping_file(p))


def find_mapping(name_or_path: str) -> Path:
    """A mapping given as a file path, or by the name of a shipped mapping (file stem, e.g. `vit-vim-mlp`)."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        if not candidate.is_file():
            raise MappingError(f"{candidate}: no such mapping file")
        return candidate
    shipped = {p.stem: p for p in shipped_mapping_paths()}
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise MappingError(f"unknown mapping {name_or_path!r}; shipped mappings: {', '.join(sorted(shipped))}")


def default_mapping_for(target: str, family: str = "vim") -> Path:
    """The shipped mapping whose `default_for` lists `target`; else the one listing `"*"` for the target family.

    Exactly one file may claim a name (and one the wildcard); `tmconvert check` reports clashes.
    """
    named, wildcard = [], []
    for path in shipped_mapping_paths():
        spec = load_mapping(path).mapping
        if target in spec.default_for:
            named.append(path)
        elif "*" in spec.default_for and spec.target == family:
            wildcard.append(path)
    owners = named or wildcard
    if len(owners) != 1:
        found = ", ".join(p.name for p in owners) or "none"
        raise MappingError(f"no unique default mapping for target {target!r} (default_for in: {found}); pass --mapping")
    return owners[0]
