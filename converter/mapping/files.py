"""Mapping files on disk: reading and validating one (with the line of every YAML path for messages), the shipped
files, and which one is a target's default.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from tmconvert.converter.mapping.errors import MappingError
from tmconvert.converter.mapping.schema import FORMAT_VERSION, Mapping
from tmconvert.converter.yamlfile import read_yaml
from tmconvert.models import family_of, get_config


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


_SECTIONS_WITH_PATTERN_KEYS = ("tensors", "rest", "identity_rest", "layer_defaults", "index_sets", "drops")


def _parse_yaml_path(text: str) -> tuple[Any, ...]:
    """Inverse of `format_yaml_path` for our files: the key after a section name may itself contain dots."""
    head, _, rest = text.partition(".")
    if head == "sublayers" and rest:  # sublayers.<kind>.<pattern>...: a section of patterns one level down
        kind, _, inner = rest.partition(".")
        return ("sublayers", kind, *_parse_yaml_path(f"tensors.{inner}")[1:]) if inner else ("sublayers", kind)
    if head in _SECTIONS_WITH_PATTERN_KEYS and rest:
        # the pattern key ends where a known rule field starts
        fields = "from|eye|ops|init|fit|concat|dtype|when|otherwise|size|full|keep|upto|reserve|per|score"
        m = re.search(rf"\.({fields})(\.|\[|$)", rest)
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
        is_tag = part in ("from", "eye", "init", "fit", "concat") and (
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
    loaded_partial = LoadedMapping(mapping=None, path=path, sha256="", lines=lines)  # type: ignore[arg-type]
    problems = [f"{path}:{line}: {format_yaml_path(loc)}: duplicate key" for loc, line in doc.duplicates]
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


def shipped_mapping_paths() -> list[Path]:
    """The mapping files installed with tmconvert (`tmconvert/mappings/*.yaml`), sorted by name."""
    folder = resources.files("tmconvert.mappings")
    return sorted(Path(str(p)) for p in folder.iterdir() if p.name.endswith(".yaml"))


def find_mapping(name_or_path: str) -> Path:
    """A mapping given as a file path, or by the name of a shipped mapping (file stem, e.g. `vit-vim-mlp`)."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or candidate.exists():
        return candidate  # reading it says what is wrong with it: missing, not a regular file, ...
    shipped = {p.stem: p for p in shipped_mapping_paths()}
    if name_or_path in shipped:
        return shipped[name_or_path]
    raise MappingError(f"unknown mapping {name_or_path!r}; shipped mappings: {', '.join(sorted(shipped))}")


def default_mapping_for(target: str) -> Path:
    """The shipped mapping whose `default_for` lists `target`; else the one listing `"*"` for the target's family
    (read from the registry: `vim-*` take a `target: vim` file, `plainmamba-*` a `target: plainmamba` one, ...).

    Exactly one file may claim a name (and one the wildcard of each family); `tmconvert check` reports clashes.
    """
    family = family_of(get_config(target))  # an unknown name: the registry's error, listing the known ones
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
