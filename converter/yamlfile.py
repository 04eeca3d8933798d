"""Reading the project's YAML files (mappings, recipes) safely, keeping the line of every key for error messages.

`yaml.SafeLoader` only builds plain data: tags that would construct Python objects or run code are refused. On top of
it, aliases and deep nesting are refused while composing, before any Python object is built: one alias can stand for
a whole subtree, so a few hundred bytes of nested aliases ("billion laughs") would expand to billions of nodes, and
deep nesting exhausts the recursion of the composer. tmconvert's files need neither.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from tmconvert.converter.errors import TmconvertError

YamlPath = tuple[Any, ...]
MAX_DEPTH = 64  # nesting levels; the shipped files use fewer than 10


@dataclass
class YamlDocument:
    """A parsed file: its data, its raw bytes (for hashing), the line of each YAML path, and duplicated keys."""

    path: Path
    data: Any
    raw: bytes
    lines: dict[YamlPath, int] = field(default_factory=dict)
    duplicates: list[tuple[YamlPath, int]] = field(default_factory=list)


class _Refused(yaml.MarkedYAMLError):
    """Valid YAML that tmconvert will not read (an alias, too deep a nesting)."""


class _Loader(yaml.SafeLoader):
    """The safe loader, refusing aliases and nesting deeper than MAX_DEPTH as the nodes are composed."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node:
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent):
            raise _Refused(
                problem=f"alias *{event.anchor}: YAML aliases are not allowed", problem_mark=event.start_mark
            )
        if self._depth >= MAX_DEPTH:
            raise _Refused(problem=f"nested deeper than {MAX_DEPTH} levels", problem_mark=event.start_mark)
        self._depth += 1
        try:
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def read_yaml(path: str | Path, error: type[TmconvertError], what: str) -> YamlDocument:
    """Read and parse `path`; a missing, unreadable or malformed file raises `error` naming the file (and line)."""
    path = Path(path)
    raw = _read_regular_file(path, error, what)
    text = raw.decode("utf-8", errors="replace")
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except _Refused as exc:
        raise error(f"{path}:{exc.problem_mark.line + 1}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise error(f"{where}: not valid YAML ({getattr(exc, 'problem', None) or exc})") from None
    finally:
        loader.dispose()
    doc = YamlDocument(path=path, data=data, raw=raw)
    if node is not None:
        _index(node, (), doc)
    return doc


def _read_regular_file(path: Path, error: type[TmconvertError], what: str) -> bytes:
    """The file's bytes; anything but a regular file is refused, since reading a FIFO or a device may never end.

    The file is opened without blocking and checked on the open descriptor, so it cannot be swapped in between.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except FileNotFoundError:
        raise error(f"{path}: no such {what} file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as file:
        if not stat.S_ISREG(os.fstat(file.fileno()).st_mode):
            raise error(f"{path} is not a regular file")
        try:
            return file.read()
        except OSError as exc:
            raise error(f"{path}: cannot read ({exc.strerror})") from None


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
