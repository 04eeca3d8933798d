"""`tmconvert check [FILES...]`: validate mapping files (default: every shipped mapping); CI runs it on `mappings/`.

Schema first (types, op vocabulary, placeholders, duplicate keys), then semantics against real architectures: for
each (source, target) pair the file supports (default: DeiT-T/S/B x ViM-T/S/B) the plan is built on meta tensors —
the code path a conversion runs — once with a plain source and default init for non-inherited layers, once with a
distilled source and `--identity-rest`. Every target tensor must be produced exactly once, every source tensor must
exist, every shape must work out, every index set must fit the axis it selects from. All problems are reported,
each as `file:line: yaml.path: message`, and the exit code is 1 if there is any.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated

import typer

from tmconvert.converter.cli._console import console
from tmconvert.converter.errors import TmconvertError
from tmconvert.converter.mapping.schema import LoadedMapping, load_mapping, shipped_mapping_paths
from tmconvert.converter.plan.plan import plan_for_names, referenced_sets, registry_pairs
from tmconvert.models.registry import family_of, get_config, list_models


@dataclass
class FileReport:
    path: Path
    problems: list[str] = field(default_factory=list)
    pairs: list[tuple[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check(
    files: Annotated[list[Path] | None, typer.Argument(help="Mapping files (default: the shipped mappings).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the reports as JSON.")] = False,
) -> None:
    """Validate mapping files against the source and target architectures; exit 1 on any problem."""
    reports = check_files(files or shipped_mapping_paths())
    if as_json:
        payload = [
            {"path": str(r.path), "ok": r.ok, "pairs": [list(p) for p in r.pairs], "problems": r.problems}
            for r in reports
        ]
        console.out(json.dumps({"files": payload}, indent=2), highlight=False)
    else:
        for report in reports:
            if report.ok:
                pairs = ", ".join(f"{s}->{t}" for s, t in report.pairs)
                console.print(f"[green]ok[/]  {report.path} ({pairs})", highlight=False)
            else:
                console.print(f"[red]FAIL[/] {report.path}: {len(report.problems)} problem(s)", highlight=False)
                for problem in report.problems:
                    console.print(f"  {problem}", highlight=False, soft_wrap=True)
    if not all(r.ok for r in reports):
        raise typer.Exit(1)


def check_files(paths: list[Path]) -> list[FileReport]:
    """Check each file, and that no two of them claim the default for the same target."""
    reports: list[FileReport] = []
    claims: dict[str, Path] = {}
    for path in paths:
        report = FileReport(Path(path))
        reports.append(report)
        try:
            loaded = load_mapping(path)
        except TmconvertError as exc:
            report.problems.extend(str(exc).splitlines())
            continue
        report.pairs, report.problems = check_mapping(loaded)
        for i, name in enumerate(loaded.mapping.default_for):
            if name in claims:
                where = loaded.where(f"default_for[{i}]")
                report.problems.append(f"{where}: {name!r} is also the default of {claims[name]}")
            else:
                claims[name] = loaded.path
    return reports


def check_mapping(loaded: LoadedMapping) -> tuple[list[tuple[str, str]], list[str]]:
    """(pairs checked, problems) for one schema-valid mapping."""
    spec = loaded.mapping
    problems: list[str] = []
    targets = set(list_models("vim"))
    for i, name in enumerate(spec.default_for):
        if name != "*" and name not in targets:
            problems.append(f"{loaded.where(f'default_for[{i}]')}: unknown target {name!r}; targets: {sorted(targets)}")

    pairs: list[tuple[str, str]] = []
    for i, (source, target) in enumerate(spec.supports or registry_pairs()):
        try:
            families = (family_of(get_config(source)), family_of(get_config(target)))
        except TmconvertError as exc:
            problems.append(f"{loaded.where(f'supports[{i}]')}: {exc}")
            continue
        if families != (spec.source, spec.target):
            problems.append(
                f"{loaded.where(f'supports[{i}]')}: {source} -> {target} is {families[0]} -> {families[1]}, "
                f"the mapping converts {spec.source} -> {spec.target}"
            )
            continue
        pairs.append((source, target))

    by_path: dict[str, tuple[str, list[str]]] = {}
    used_rules: set[str] = set()
    all_rules: set[str] = set()
    runs = 0
    for source, target in pairs:
        for distilled, identity_rest in ((False, False), (True, True)):
            runs += 1
            label = f"{source}{'-distilled --identity-rest' if distilled else ''}->{target}"
            try:
                plan = plan_for_names(loaded, source, target, identity_rest=identity_rest, distilled=distilled)
            except TmconvertError as exc:
                by_path.setdefault("", (str(exc), []))[1].append(label)
                continue
            for problem in plan.problems:
                message = problem.message + (f" (and {problem.repeats} more tensors)" if problem.repeats else "")
                _, labels = by_path.setdefault(problem.path, (message, []))
                if label not in labels:
                    labels.append(label)
            rules = {f"{s}.{p}" for s in ("tensors", "rest", "identity_rest") for p in getattr(spec, s)}
            all_rules |= rules
            used_rules |= rules - set(plan.unused_rules)
    for path, (message, labels) in by_path.items():
        scope = "" if len(labels) == runs else f" [{', '.join(labels)}]"
        where = loaded.where(path) if path else str(loaded.path)
        problems.append(f"{where}: {message}{scope}")
    for rule in sorted(all_rules - used_rules, key=lambda r: loaded.line_of(r) or 0):
        problems.append(f"{loaded.where(rule)}: matches no target tensor in any checked pair")
    used_sets = referenced_sets(loaded)
    for name in spec.index_sets:
        if name not in used_sets:
            problems.append(f"{loaded.where(f'index_sets.{name}')}: index set {name!r} is declared but no op uses it")
    return pairs, problems
