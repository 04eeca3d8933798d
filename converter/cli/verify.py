"""`tmconvert verify OUT [--teacher SRC]`: check a converted ViM numerically (see `converter/verify.py`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from tmconvert.converter.checkpoint.reader import open_checkpoint
from tmconvert.converter.cli._console import console, err_console
from tmconvert.converter.convert.subclone import parse_calib
from tmconvert.converter.verify.numeric import VerificationError, VerifyReport, verify_converted


def report_table(report: VerifyReport) -> Table:
    """The verification report as one rich table (also used by `convert`)."""
    table = Table(title=f"verification of {escape(report.path)} on {report.images} images", title_justify="left")
    table.add_column("check")
    table.add_column("result")
    table.add_row("finite outputs", "yes" if report.finite else "[red]NO[/]")
    for name, err in report.backends.items():
        table.add_row(f"backend {name}", "reference" if err == 0.0 else f"rel. error {err:.2e} vs reference")
    if report.layers:
        cells = [f"{s.layer}←{s.block if s.block is not None else '·'} {s.cosine:.3f}" for s in report.layers]
        rows = [", ".join(cells[i:i + 6]) for i in range(0, len(cells), 6)]
        table.add_row("layer cosine\n(student←teacher block)", "\n".join(rows))
    if report.final_cosine is not None:
        table.add_row("final features cosine", f"{report.final_cosine:.3f}")
    if report.top1_agreement is not None:
        table.add_row("top-1 agreement", f"{100 * report.top1_agreement:.1f} %")
    for problem in report.problems:
        table.add_row("[red]problem[/]", escape(problem))
    return table


def verify(
    path: Annotated[Path, typer.Argument(help="A .safetensors file written by tmconvert.")],
    teacher: Annotated[
        Path | None, typer.Option("--teacher", help="The source ViT checkpoint, for similarity and agreement.")
    ] = None,
    calib: Annotated[
        str, typer.Option("--calib", help="Images to run: a folder of images, or N synthetic images.")
    ] = "8",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic images.")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, or auto.")] = "auto",
    heads: Annotated[int | None, typer.Option("--heads", min=1, help="Teacher attention heads.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Run a converted model on images: finite outputs, backends agree, similarity to the teacher."""
    import torch

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    calib_value = parse_calib(calib)
    err_console.print(f"verifying {escape(str(path))} on {device} …")
    if teacher is not None:
        with open_checkpoint(teacher, num_heads=heads) as ckpt:
            report = verify_converted(path, teacher=ckpt, calib=calib_value, seed=seed, device=device)
    else:
        report = verify_converted(path, calib=calib_value, seed=seed, device=device)
    if as_json:
        console.print_json(json.dumps(report.to_json()))
    else:
        console.print(report_table(report))
    if not report.ok:
        raise VerificationError(f"{path}: verification failed: {'; '.join(report.problems)}")
