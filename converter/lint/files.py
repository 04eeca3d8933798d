"""`check_files`: each YAML file checked as the kind of file it declares, plus clashes between files."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tmconvert.converter.distill.recipe import recipe_problems
from tmconvert.converter.errors import TmconvertError
from tmconvert.converter.lint.mappings import check_mapping
from tmconvert.converter.mapping.errors import MappingError
from tmconvert.converter.mapping.files import load_mapping
from tmconvert.converter.yamlfile import read_yaml

KINDS = ("mapping", "recipe")  # the version key each kind of file starts with


@dataclass
class FileReport:
    path: Path
    kind: str | None = None  # mapping | recipe | None (the file does not say, or cannot be read)
    problems: list[str] = field(default_factory=list)
    pairs: list[tuple[str, str]] = field(default_factory=list)  # mappings: the (source, target) pairs checked

    @property
    def ok(self) -> bool:
        return not self.problems


def declared_kind(path: Path) -> str:
    """`mapping` or `recipe`, by the version key the file's top level declares; MappingError otherwise."""
    doc = read_yaml(path, MappingError, "YAML")
    found = [kind for kind in KINDS if isinstance(doc.data, dict) and kind in doc.data]
    if len(found) != 1:
        raise MappingError(
            f"{path}: not a tmconvert file: expected a YAML mapping that declares `mapping: 1` or `recipe: 1`"
        )
    return found[0]


def check_files(paths: list[Path]) -> list[FileReport]:
    """Check each file as what it declares, and that no two mappings claim the default for the same target (or the
    `"*"` wildcard of the same family)."""
    reports: list[FileReport] = []
    claims: dict[tuple[str, str], Path] = {}  # (target family, name or "*") -> the file claiming its default
    for path in paths:
        report = FileReport(Path(path))
        reports.append(report)
        try:
            report.kind = declared_kind(report.path)
            if report.kind == "recipe":
                report.problems = recipe_problems(report.path)
                continue
            loaded = load_mapping(report.path)
        except TmconvertError as exc:
            report.problems.extend(str(exc).splitlines())
            continue
        report.pairs, report.problems = check_mapping(loaded)
        for i, name in enumerate(loaded.mapping.default_for):
            claim = (loaded.mapping.target, name)
            if claim in claims:
                where = loaded.where(f"default_for[{i}]")
                report.problems.append(f"{where}: {name!r} is also the default of {claims[claim]}")
            else:
                claims[claim] = loaded.path
    return reports
