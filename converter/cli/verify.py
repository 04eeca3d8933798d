"""`tmconvert verify OUT [--teacher SRC]`: check a converted model numerically (see `converter.verify.numeric`)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape

from tmconvert.converter.checkpoint import open_checkpoint
from tmconvert.converter.cli._console import console, err_console
from tmconvert.converter.cli._options import CALIB_HELP, check_seed
from tmconvert.converter.cli._reports import report_table
from tmconvert.converter.data.calibration import parse_calib
from tmconvert.converter.verify.numeric import VerificationError, verify_converted


def verify(
    path: Annotated[Path, typer.Argument(help="A .safetensors file written by tmconvert.")],
    teacher: Annotated[
        Path | None, typer.Option("--teacher", help="The source ViT checkpoint, for similarity and agreement.")
    ] = None,
    calib: Annotated[str, typer.Option("--calib", help=f"Images to run: {CALIB_HELP}")] = "8",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic images.")] = 0,
    device: Annotated[str, typer.Option("--device", help="cpu, cuda, or auto.")] = "auto",
    heads: Annotated[int | None, typer.Option("--heads", min=1, help="Teacher attention heads.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Run a converted model on images: finite outputs, backends agree, similarity to the teacher."""
    import torch

    check_seed(seed)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    calib_value = parse_calib(calib)
    err_console.print(f"verifying {escape(str(path))} on {device} …")
    if teacher is not None:
        with open_checkpoint(teacher, num_heads=heads) as ckpt:
            report = verify_converted(
                path, teacher=ckpt, calib=calib_value, seed=seed, device=device, require_teacher=True
            )
    else:
        report = verify_converted(path, calib=calib_value, seed=seed, device=device)
    if as_json:
        console.print_json(json.dumps(report.to_json()))
    else:
        console.print(report_table(report))
    if not report.ok:
        raise VerificationError(f"{path}: verification failed: {'; '.join(report.problems)}")
