"""`tmconvert SOURCE --to TARGET`: convert a ViT checkpoint into a Mamba model of any target family (the default
command).

`--dry-run` prints the plan the conversion would execute (the same `Plan` object, not a second code path) and writes
nothing; `--json` prints plans and reports as JSON on stdout. Progress goes to stderr.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from tmconvert.converter.cli._console import console, err_console
from tmconvert.converter.cli._options import CALIB_HELP, check_seed
from tmconvert.converter.cli._reports import report_table
from tmconvert.converter.convert.engine import ConversionResult, ConvertRequest, Prepared, execute, prepare
from tmconvert.converter.plan.plan import Plan, PlanEntry
from tmconvert.models import family_of


def convert(
    source: Annotated[Path, typer.Argument(help="ViT checkpoint (.safetensors, .pth, .bin, index, HF folder).")],
    to: Annotated[
        str, typer.Option("--to", help="Target model name (see `tmconvert list`), e.g. vim-s, plainmamba-l1.")
    ],
    layers: Annotated[
        int | None,
        typer.Option(
            "--layers",
            help="The first N teacher blocks feed the student: student layers 0..N-1 (one per block), or 0..2N-1 "
            "with an interleaved mapping (2i <- block i attention, 2i+1 <- its MLP). Default: as many as fit.",
        ),
    ] = None,
    mapping: Annotated[
        str | None, typer.Option("--mapping", help="Mapping file or shipped name (default: the target's default).")
    ] = None,
    calib: Annotated[
        str | None,
        typer.Option(
            "--calib",
            help=f"Calibration images for activation scores and fitted layers: {CALIB_HELP}",
        ),
    ] = None,
    score: Annotated[
        str | None, typer.Option("--score", help="magnitude (default without --calib), activation, uniform.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Output .safetensors (default: ./<source>-<target>.safetensors).")
    ] = None,
    dtype: Annotated[str, typer.Option("--dtype", help="Stored dtype: fp32, fp16 or bf16.")] = "fp32",
    seed: Annotated[int, typer.Option("--seed", help="Seed of the default init and of synthetic calibration.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing output files.")] = False,
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="safetensors, or upstream (also a .pth the family's upstream code loads: {'model': ...} for Vim and "
            "VideoMamba, mmcls's {'state_dict': ...} for PlainMamba); vim is the same as upstream.",
        ),
    ] = "safetensors",
    identity_rest: Annotated[
        bool | None,
        typer.Option(
            "--identity-rest/--no-identity-rest",
            help="Start non-inherited layers as identities (zero out_proj); default: the mapping's options.",
            show_default=False,
        ),
    ] = None,
    img_size: Annotated[int | None, typer.Option("--img-size", help="Student image size (default: teacher's).")] = None,
    patch_size: Annotated[int | None, typer.Option("--patch-size", help="Student patch (default: teacher's).")] = None,
    num_classes: Annotated[int | None, typer.Option("--num-classes", help="Student classes (teacher's).")] = None,
    ema: Annotated[bool, typer.Option("--ema", help="Read the checkpoint's EMA weights.")] = False,
    heads: Annotated[int | None, typer.Option("--heads", min=1, help="Teacher attention heads.")] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan; write nothing.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the plan / report as JSON.")] = False,
    no_verify: Annotated[bool, typer.Option("--no-verify", help="Skip verification of the written model.")] = False,
) -> None:
    """Convert a ViT/DeiT checkpoint into a Mamba model (ViM, PlainMamba, VideoMamba, VMamba) by selective weight
    subcloning and first-n-layer init."""
    check_seed(seed)
    request = ConvertRequest(
        source=source,
        target=to,
        mapping=mapping,
        layers=layers,
        identity_rest=identity_rest,
        calib=calib,
        score=score,
        out=out,
        dtype=dtype,
        seed=seed,
        force=force,
        format=fmt,
        img_size=img_size,
        patch_size=patch_size,
        num_classes=num_classes,
        ema=ema,
        num_heads=heads,
        verify=not no_verify,
    )
    prepared = prepare(request, check_outputs=not dry_run)
    try:
        for warning in prepared.plan.warnings:
            err_console.print(f"[yellow]warning:[/] {warning}", highlight=False)
        if dry_run:
            _print_plan(prepared, as_json=as_json)
            return
        result = _execute_with_progress(prepared, quiet=as_json)
    finally:
        prepared.close()
    if as_json:
        console.out(json.dumps(report_json(result), indent=2), highlight=False)
    else:
        _print_report(result)


def _execute_with_progress(prepared: Prepared, *, quiet: bool) -> ConversionResult:
    progress = Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeElapsedColumn(),
        console=err_console,
        transient=True,
        disable=quiet or not err_console.is_terminal,
    )
    total = prepared.plan.output_bytes
    with progress:
        task = progress.add_task("preparing", total=total)
        return execute(
            prepared,
            on_stage=lambda name: progress.update(task, description=name),
            on_tensor=lambda _name, nbytes: progress.advance(task, nbytes),
        )


# ---------------------------------------------------------------------------------------------------------------
# The plan, printed


_LAYER_IN_NAME = re.compile(r"^((?:.*\.)?(?:layers|blocks))\.(\d+)\.")  # `layers.3.`, `backbone.layers.3.`


def _generic(name: str) -> tuple[str, int | None]:
    m = _LAYER_IN_NAME.match(name)
    if m is None:
        return name, None
    return f"{m.group(1)}.{{n}}.{name[m.end() :]}", int(m.group(2))


def _ranges(numbers: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    out, start = [], None
    for i, n in enumerate(numbers):
        if start is None:
            start = n
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            out.append(str(start) if start == n else f"{start}-{n}")
            start = None
    return ",".join(out)


def _grouped_entries(plan: Plan) -> list[tuple[PlanEntry, str, str, str]]:
    """One row per (generic name, rule, kind, expression): per-layer repeats folded into a layer range.

    Rows read `layers.{n}.x <- blocks.{b}.y`; the layer plan table says which block b feeds layer n.
    """
    groups: dict[tuple[str, str, str, str], tuple[PlanEntry, list[int]]] = {}
    for entry in plan.entries:
        generic, layer = _generic(entry.name)
        expr = re.sub(r"\bblocks\.\d+\.", "blocks.{b}.", entry.expr)
        key = (generic, entry.rule, entry.kind, expr)
        if key not in groups:
            groups[key] = (entry, [])
        if layer is not None:
            groups[key][1].append(layer)
    return [(entry, key[0], _ranges(layers), key[3]) for key, (entry, layers) in groups.items()]


def _print_plan(prepared: Prepared, *, as_json: bool) -> None:
    plan = prepared.plan
    if as_json:
        payload = plan.to_json()
        payload["source"]["path"] = str(prepared.checkpoint.path)
        payload["outputs"] = [str(p) for p in prepared.paths.all()]
        console.out(json.dumps(payload, indent=2), highlight=False)
        return
    _print_header(prepared)
    layer_table = Table(title="layer plan (student layer <- teacher block)", title_justify="left")
    layer_table.add_column("student layers")
    layer_table.add_column("teacher blocks")
    for student, teacher in _layer_rows(plan):
        layer_table.add_row(student, teacher)
    console.print(layer_table)
    if plan.index_sets:
        sets = Table(title=f"index sets (chosen by --score {plan.options.get('score')})", title_justify="left")
        for column in ("set", "keeps", "of", "per", "ranked by"):
            sets.add_column(column)
        for s in plan.index_sets.values():
            sets.add_row(s.name, str(s.keep), str(s.full), s.per, s.score)
        console.print(sets)
    table = Table(title="target tensors", title_justify="left")
    for column in ("target", "layers", "shape", "dtype", "kind", "from"):
        table.add_column(column, overflow="fold")
    for entry, generic, layers, expr in _grouped_entries(plan):
        from_text = expr + (f"  ({entry.note})" if entry.note else "")
        table.add_row(escape(generic), layers, str(tuple(entry.shape)), entry.dtype, entry.kind, escape(from_text))
    console.print(table)
    for line in _dropped_lines(plan):
        console.print(escape(line), highlight=False)
    _print_totals(prepared)


def _layer_rows(plan: Plan) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    layers = plan.layers
    blocks = layers.blocks
    inherited = [(j, b) for j, b in enumerate(blocks) if b is not None]
    if layers.stages and not layers.interleaved:
        return _stage_rows(plan)
    if layers.interleaved:
        used = _ranges(list(layers.used_blocks()))
        rows.append((f"2i (i = {used})", "block i: attention sub-layer"))
        rows.append((f"2i+1 (i = {used})", "block i: MLP sub-layer"))
    elif inherited and all(j == b for j, b in inherited):
        rows.append((_ranges([j for j, _ in inherited]), _ranges([b for _, b in inherited])))
    else:
        rows.extend((str(j), str(b)) for j, b in inherited)
    rest = [j for j, b in enumerate(blocks) if b is None]
    if rest:
        how = "identity start (zero out_proj)" if plan.options.get("identity_rest") else "default init"
        rows.append((_ranges(rest), f"none: {how}"))
    return rows


def _stage_rows(plan: Plan) -> list[tuple[str, str]]:
    """A hierarchical student's layer plan, named as the student names its blocks (`LayerPlan.label`): per stage, runs
    of blocks fed by consecutive teacher blocks folded (`stage 2 blocks 0-6` <- `4-10`), then the blocks no teacher
    block feeds."""
    layers = plan.layers
    rows: list[tuple[str, str]] = []
    for stage, depth in enumerate(layers.stages):
        runs: list[list[tuple[int, int]]] = []  # [(layer, teacher block)], consecutive in both
        for index in range(depth):
            j = layers.layer_at(stage, index)
            block = layers.blocks[j]
            if block is None:
                continue
            if runs and runs[-1][-1][0] == j - 1 and runs[-1][-1][1] == block - 1:
                runs[-1].append((j, block))
            else:
                runs.append([(j, block)])
        for run in runs:
            (first, b0), (last, b1) = run[0], run[-1]
            if first == last:
                rows.append((layers.label(first), str(b0)))
            else:
                start, end = layers.position(first)[1], layers.position(last)[1]
                rows.append((f"stage {stage} blocks {start}-{end}", f"{b0}-{b1}"))
    rest: dict[int, list[int]] = {}
    for j, block in enumerate(layers.blocks):
        if block is None:
            stage, index = layers.position(j)
            rest.setdefault(stage, []).append(index)
    if rest:
        how = "identity start (zero out_proj)" if plan.options.get("identity_rest") else "default init"
        names = [f"stage {s} block{'s' if len(i) > 1 else ''} {_ranges(i)}" for s, i in rest.items()]
        rows.append((", ".join(names), f"none: {how}"))
    return rows


def _folded(names: list[str], suffix: dict[str, str] | None = None) -> str:
    """`blocks.{n}.norm1.bias [0-11], norm.bias`: per-block names folded into one with a block range."""
    generic: dict[str, list[int]] = {}
    for name in names:
        g, layer = _generic(name)
        g += (suffix or {}).get(name, "")
        generic.setdefault(g, [])
        if layer is not None:
            generic[g].append(layer)
    return ", ".join(f"{g} [{_ranges(n)}]" if n else g for g, n in generic.items()) or "none"


def _dropped_lines(plan: Plan) -> list[str]:
    usage = plan.source_usage()
    why = [f"  {_folded(names)}: {reason}" for reason, names in plan.drop_reasons().values()]
    return [
        f"dropped source tensors ({len(plan.dropped)}): {_folded(plan.dropped)}",
        *why,
        f"partly used source tensors ({len(usage)}): "
        + _folded(list(usage), {name: f" ({fraction:.0%} used)" for name, fraction in usage.items()}),
    ]


def _print_header(prepared: Prepared) -> None:
    plan, ckpt = prepared.plan, prepared.checkpoint
    s, t = plan.source.config, plan.target.config
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column(overflow="fold")
    grid.add_row("source", f"{ckpt.path} ({ckpt.format})")
    grid.add_row(
        "",
        f"vit D={s.embed_dim} depth={s.depth} mlp={s.mlp_hidden} {s.img_size[0]}x{s.img_size[1]}px "
        f"patch {s.patch_size} classes {s.num_classes}{' distilled' if s.distilled else ''}",
    )
    grid.add_row(
        "target",
        f"{plan.target.name}: {family_of(t)} D={t.embed_dim} depth={t.depth} E={t.d_inner} "
        f"N={t.d_state} {t.img_size[0]}x{t.img_size[1]}px patch {t.patch_size} "
        f"classes {t.num_classes}",
    )
    grid.add_row("mapping", f"{prepared.mapping.name} ({prepared.mapping.path})")
    options = {k: v for k, v in plan.options.items() if v is not None}
    grid.add_row("options", ", ".join(f"{k}={v}" for k, v in options.items()))
    console.print(grid)


def _print_totals(prepared: Prepared) -> None:
    plan = prepared.plan
    counts = plan.counts()
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold", no_wrap=True)
    grid.add_column()
    grid.add_row("tensors", ", ".join(f"{v} {k}" for k, v in counts.items()))
    grid.add_row("output", f"{', '.join(str(p) for p in prepared.paths.all())} ({_size(plan.output_bytes)} of weights)")
    activation = plan.options.get("score") == "activation"
    grid.add_row("peak memory", f"about {_size(plan.peak_memory_bytes(activation_scoring=activation))}")
    for rule in plan.unused_rules:
        grid.add_row("unused rule", rule)
    console.print(grid)


def _size(nbytes: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if nbytes < 1024 or unit == "GiB":
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"


# ---------------------------------------------------------------------------------------------------------------
# The report


def report_json(result: ConversionResult) -> dict[str, Any]:
    plan = result.plan
    return {
        "outputs": [str(p) for p in result.paths.all()],
        "bytes_written": result.bytes_written,
        "seconds": round(result.seconds, 3),
        "stage_seconds": result.stage_seconds,
        "source_sha256": result.source_sha256,
        "mapping": {"name": plan.mapping.name, "sha256": plan.mapping.sha256},
        "target": plan.target.name,
        "counts": plan.counts(),
        "layers": plan.layers.to_json(),
        "index_sets": {name: {"keep": s.keep, "full": s.full, "per": s.per} for name, s in plan.index_sets.items()},
        "options": plan.options,
        "verification": result.verification,
        "warnings": plan.warnings,
    }


def _print_report(result: ConversionResult) -> None:
    plan = result.plan
    table = Table(
        title=f"converted to {plan.target.name} with {plan.mapping.name}", title_justify="left", show_header=False
    )
    table.add_column("")
    table.add_column("", overflow="fold")
    for path in result.paths.all():
        table.add_row("wrote", f"{path} ({_size(path.stat().st_size)})")
    table.add_row("tensors", ", ".join(f"{v} {k}" for k, v in plan.counts().items()))
    layers = plan.layers
    table.add_row(
        "layers",
        f"{layers.inherited} of {len(layers.blocks)} from teacher blocks"
        + (f" (attention and MLP of blocks {_ranges(list(layers.used_blocks()))})" if layers.interleaved else ""),
    )
    table.add_row(
        "time", f"{result.seconds:.2f} s (" + ", ".join(f"{k} {v:.2f}" for k, v in result.stage_seconds.items()) + ")"
    )
    table.add_row("source sha256", result.source_sha256)
    if result.verification is None:
        table.add_row("verification", "skipped (--no-verify)")
    else:
        structural = {k: v for k, v in result.verification.items() if k != "numeric"}
        table.add_row("verification", ", ".join(f"{k}={v}" for k, v in structural.items()))
    console.print(table)
    if result.verify_report is not None:
        console.print(report_table(result.verify_report))
