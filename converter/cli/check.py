"""`tmconvert check [FILES...]`: validate mapping and recipe files (default: every shipped one); CI runs it.

Each file is checked as what it declares (`mapping: 1` or `recipe: 1`, see `converter.lint`). All problems are
reported, each as `file:line: yaml.path: message`, and the exit code is 1 if there is any.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from tmconvert.converter.cli._console import console
from tmconvert.converter.distill.recipe import shipped_recipe_paths
from tmconvert.converter.lint import check_files
from tmconvert.converter.mapping.files import shipped_mapping_paths


def check(
    files: Annotated[
        list[Path] | None, typer.Argument(help="Mapping or recipe files (default: the shipped ones).")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the reports as JSON.")] = False,
) -> None:
    """Validate mapping files against the source and target architectures, and recipe files; exit 1 on a problem."""
    reports = check_files(files or [*shipped_mapping_paths(), *shipped_recipe_paths().values()])
    if as_json:
        payload = [
            {
                "path": str(r.path),
                "kind": r.kind,
                "ok": r.ok,
                "pairs": [list(p) for p in r.pairs],
                "problems": r.problems,
            }
            for r in reports
        ]
        console.out(json.dumps({"files": payload}, indent=2), highlight=False)
    else:
        for report in reports:
            if report.ok:
                checked = ", ".join(f"{s}->{t}" for s, t in report.pairs) if report.pairs else report.kind
                console.print(f"[green]ok[/]  {report.path} ({checked})", highlight=False)
            else:
                console.print(f"[red]FAIL[/] {report.path}: {len(report.problems)} problem(s)", highlight=False)
                for problem in report.problems:
                    console.print(f"  {problem}", highlight=False, soft_wrap=True)
    if not all(r.ok for r in reports):
        raise typer.Exit(1)
