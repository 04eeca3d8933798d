"""Tables more than one command prints (the verification report: `verify`, and `convert` after writing)."""

from __future__ import annotations

from rich.markup import escape
from rich.table import Table

from tmconvert.converter.verify.numeric import VerifyReport

_MEASURE_NAMES = {"layers": "layer cosine", "final": "final features cosine", "top1": "top-1 agreement"}


def report_table(report: VerifyReport) -> Table:
    """The verification report as one rich table."""
    table = Table(title=f"verification of {escape(report.path)} on {report.images} images", title_justify="left")
    table.add_column("check")
    table.add_column("result")
    table.add_row("finite outputs", "yes" if report.finite else "[red]NO[/]")
    for name, err in report.backends.items():
        result = "not compared" if err is None else "reference" if err == 0.0 else f"rel. error {err:.2e} vs reference"
        table.add_row(f"backend {name}", result)
    status = report.teacher_comparison
    if status != "not requested":
        table.add_row("teacher comparison", status if status == "done" else f"[yellow]{status}[/]")
    if report.layers:
        part = {"attn": "a", "mlp": "m", None: ""}
        cells = [
            f"{s.label}←{s.block if s.block is not None else '·'}{part[s.sublayer]} {s.cosine:.3f}"
            for s in report.layers
        ]
        if any(s.stage is not None for s in report.layers):  # a hierarchical student: one line per stage
            by_stage: dict[int | None, list[str]] = {}
            for s, cell in zip(report.layers, cells, strict=True):
                by_stage.setdefault(s.stage, []).append(cell)
            rows = [", ".join(c[i : i + 4]) for c in by_stage.values() for i in range(0, len(c), 4)]
            legend = "\n(stage grids: teacher patches\narea-pooled, kept channels)"
        else:
            rows = [", ".join(cells[i : i + 6]) for i in range(0, len(cells), 6)]
            legend = ""
        if any(s.sublayer for s in report.layers):
            legend += "\n(a / m: after its attention / MLP)"
        table.add_row("layer cosine\n(student←teacher block)" + legend, "\n".join(rows))
    if report.layers_not_compared:
        table.add_row(
            "[yellow]layers not compared[/]",
            f"{', '.join(report.layers_not_compared)}: no teacher block fed them",
        )
    if report.final_cosine is not None:
        table.add_row("final features cosine", f"{report.final_cosine:.3f}")
    if report.top1_agreement is not None:
        informational = " (informational: not distilled yet, see the note)" if report.stage == "converted" else ""
        table.add_row("top-1 agreement", f"{100 * report.top1_agreement:.1f} %{informational}")
    for measure, reason in report.not_compared.items():
        table.add_row(f"[yellow]{_MEASURE_NAMES[measure]}[/]", f"[yellow]not measured:[/] {escape(reason)}")
    for note in report.notes:
        table.add_row("note", escape(note))
    for problem in report.problems:
        table.add_row("[red]problem[/]", escape(problem))
    return table
