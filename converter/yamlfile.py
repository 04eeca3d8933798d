"""Reading the project's YAML files (mappings, recipes) safely, keeping the line of every key for error messages.

`yaml.safe_load` only builds plain data: tags that would construct Python objects or run code are refused.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tmconvert.converter.errors import TmconvertError

YamlPath = tuple[Any, ...]


@dataclass
class YamlDocument:
    """A parsed file: its data, its raw bytes (for hashing), the line of each YAML path, and duplicated keys."""

    path: Path
    data: Any
    raw: bytes
    lines: dict[YamlPath, int] = field(default_factory=dict)
    duplicates: list[tuple[YamlPath, int]] = field(default_factory=list)


def read_yaml(path: str | Path, error: type[TmconvertError], what: str) -> YamlDocument:
    """Read and parse `path`; a missing, unreadable or malformed file raises `error` naming the file (and line)."""
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror})") from None
    text = raw.decode("utf-8", errors="replace")
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise error(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    doc = YamlDocument(path=path, data=data, raw=raw)
    if node is not None:
        _index(node, (), doc)
    return doc


def _index(node: yaml.Node, path: YamlPath, doc: YamlDocument) -> None:
    doc.lines[path] = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode):
        seen: set[Any] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                doc.duplicates.append(((*path, key), key_node.start_mark.line + 1))
            seen.add(key)
            doc.lines[(*path, key)] = key_node.start_mark.line + 1
            _index(value_node, (*path, key), doc)
    elif isinstance(node, yaml.SequenceNode):
        for i, item in enumerate(node.value):
            _index(item, (*path, i), doc)
