"""`tmconvert distill TEACHER STUDENT --data D --out DIR`: stage 2, distil a converted (or from-scratch) Mamba
(ViM, PlainMamba, VMamba on images; VideoMamba on images or clips).

Progress goes to stderr: a live bar per phase (`align` when the recipe aligns layers first, then `distill`) with the
loss parts, per-layer cosines or adaptive weights, img/s and ETA on a terminal, one line per log step otherwise
(logs of batch jobs). The result goes to stdout (`--json` for machines). Under `torchrun` every
process runs this command; only rank 0 prints and writes.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch.distributed as torch_dist
import typer
from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn
from rich.text import Text

from tmconvert.converter.cli._console import console, err_console
from tmconvert.converter.distill.processes import init_distributed
from tmconvert.converter.distill.recipe import load_recipe, parse_pairs
from tmconvert.converter.distill.run import (
    AlignReport,
    DistillRequest,
    DistillResult,
    StepReport,
    prepare_run,
    run_distillation,
)


def distill(
    teacher: Annotated[Path, typer.Argument(help="Teacher ViT checkpoint (any format `tmconvert inspect` reads).")],
    student: Annotated[
        str,
        typer.Argument(help="Student: a file from `tmconvert convert`, or a model name (vim-t) for from-scratch."),
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="Training images: a folder (class subfolders; flat = unlabelled), fashion-mnist[:ROOT], synthetic:N; "
            "clips:T:<images> for a video student.",
        ),
    ],
    out: Annotated[Path, typer.Option("--out", "-o", help="Run folder: checkpoints, metrics, the distilled student.")],
    recipe: Annotated[
        str | None, typer.Option("--recipe", help="Recipe YAML file or shipped recipe name (default: default).")
    ] = None,
    overrides: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a recipe field (repeatable): --set optim.lr=1e-3 --set loss.kd=0."),
    ] = None,
    steps: Annotated[int | None, typer.Option("--steps", help="Recipe `steps`: optimisation steps.")] = None,
    batch_size: Annotated[
        int | None, typer.Option("--batch-size", help="Recipe `batch_size` (global, over all processes).")
    ] = None,
    lr: Annotated[float | None, typer.Option("--lr", help="Recipe `optim.lr`: peak learning rate.")] = None,
    seed: Annotated[
        int | None, typer.Option("--seed", help="Recipe `seed`: data order, augmentation, new weights.")
    ] = None,
    pairs: Annotated[
        str | None,
        typer.Option("--pairs", help="Recipe `loss.pairs`: plan, even, or STUDENT:TEACHER pairs like 1:0,3:1,5:2."),
    ] = None,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Start over in a folder that holds another run.")] = False,
    stop_after: Annotated[
        int | None, typer.Option("--stop-after", min=1, help="Stop after this step, with a checkpoint (then --resume).")
    ] = None,
    time_limit: Annotated[
        float | None,
        typer.Option("--time-limit", min=0, help="Stop with a checkpoint at the first log step after this many s."),
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu or cuda (default: cuda if available).")] = None,
    heads: Annotated[
        int | None, typer.Option("--heads", min=1, help="Teacher attention heads, when shapes cannot tell.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Distil a teacher ViT into a ViM student: task CE + logit KD + adaptive multi-directional feature alignment."""
    flags = {
        "steps": steps,
        "batch_size": batch_size,
        "optim.lr": lr,
        "seed": seed,
        "loss.pairs": parse_pairs(pairs) if pairs is not None else None,
    }
    loaded = load_recipe(recipe, overrides or [], flags)
    request = DistillRequest(
        teacher=teacher,
        student=student,
        data=data,
        out=out,
        recipe=loaded,
        resume=resume,
        force=force,
        stop_after=stop_after,
        time_limit=time_limit,
        num_heads=heads,
    )
    dist = init_distributed(device)
    try:
        prepared = prepare_run(request, dist)
        show = dist.is_main and not as_json
        with _ProgressDisplay(enabled=show) as display:
            result = run_distillation(prepared, on_report=display.report, on_note=display.note)
    finally:
        if torch_dist.is_initialized():
            torch_dist.destroy_process_group()
    if not dist.is_main:
        return
    if as_json:
        console.out(json.dumps(result.to_json(), indent=2), highlight=False)
    else:
        _print_result(result)


def _short(values: list[float]) -> str:
    if len(values) <= 6:
        return " ".join(f"{v:.2f}" for v in values)
    return f"{min(values):.2f}..{max(values):.2f}"


def _eta(seconds: float) -> str:
    if seconds == float("inf"):
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def describe_report(report: StepReport) -> str:
    """Loss and its parts, per direction the layer similarities and adaptive weights, lr, img/s, ETA."""
    parts = " ".join(f"{k} {v:.4f}" for k, v in report.parts.items())
    text = f"loss {report.loss:.4f} ({parts})"
    for direction, sims in report.similarities.items():
        text += f" | {direction} cos {_short(sims)} w {_short(report.weights.get(direction, []))}"
    return f"{text} | lr {report.lr:.2e} | {report.images_per_second:.0f} img/s | ETA {_eta(report.eta)}"


def describe_align_report(report: AlignReport) -> str:
    """Alignment loss, per aligned layer the cosine of its update and of its output with the teacher's, lr, img/s,
    ETA."""
    text = (
        f"loss {report.loss:.4f} | update cos {_short(report.update_cosine)} | "
        f"output cos {_short(report.output_cosine)}"
    )
    return f"{text} | lr {report.lr:.2e} | {report.images_per_second:.0f} img/s | ETA {_eta(report.eta)}"


class _ProgressDisplay:
    """On a terminal a live bar per phase (its step, img/s, ETA) over a line with the loss parts and similarities;
    plain lines otherwise; silent when disabled (rank > 0, --json)."""

    def __init__(self, *, enabled: bool):
        self.enabled = enabled
        self.is_live = enabled and err_console.is_terminal
        self.bar = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[speed]}"),
            TextColumn("ETA {task.fields[eta]}"),
            console=err_console,
        )
        self.task = self.bar.add_task("distill", total=None, speed="", eta="?")
        self.live = Live(Group(self.bar), console=err_console, auto_refresh=False) if self.is_live else None

    def __enter__(self) -> _ProgressDisplay:
        if self.live is not None:
            self.live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.live is not None:
            self.live.__exit__(*exc)

    def note(self, text: str) -> None:
        if self.enabled:
            err_console.print(f"[yellow]note:[/] {escape(text)}", highlight=False)

    def report(self, report: StepReport | AlignReport) -> None:
        if not self.enabled:
            return
        aligning = isinstance(report, AlignReport)
        line = describe_align_report(report) if aligning else describe_report(report)
        step, total = report.step - report.first, report.total - report.first  # within the phase
        if self.live is None:
            phase = "align " if aligning else ""
            err_console.print(f"{phase}step {step}/{total} {escape(line)}", highlight=False, soft_wrap=True)
            return
        self.bar.update(
            self.task,
            description="align" if aligning else "distill",
            total=total,
            completed=step,
            speed=f"{report.images_per_second:.0f} img/s",
            eta=_eta(report.eta),
        )
        self.live.update(Group(self.bar, Text(line)), refresh=True)


def _print_result(result: DistillResult) -> None:
    final = result.final
    if result.finished:
        console.print(
            f"[bold green]distilled[/] {escape(str(result.paths.student))} ({result.step} steps, "
            f"{result.seconds:.1f} s)",
            highlight=False,
        )
    else:
        console.print(
            f"[bold yellow]stopped[/] at step {result.step} of {result.total}; continue with --resume "
            f"(checkpoint {escape(str(result.paths.checkpoint))})",
            highlight=False,
        )
    if result.align is not None:
        first, last = result.align["first"], result.align["final"]
        console.print(
            f"aligned {len(result.align['pairs'])} layers in {result.align['steps']} steps: loss {first['loss']:.4f} "
            f"-> {last['loss']:.4f}, update cos {_short(first['update_cosine'])} -> {_short(last['update_cosine'])}",
            highlight=False,
        )
    if final:
        parts = " ".join(f"{k} {final[k]:.4f}" for k in ("task", "kd", "feature") if k in final)
        console.print(
            f"final loss {final['loss']:.4f} ({parts}); metrics in {escape(str(result.paths.metrics))}", highlight=False
        )
