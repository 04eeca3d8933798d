"""`tmconvert inspect CKPT`: what a checkpoint is, as the reader sees it (format, container, naming, config, tensors).

Everything shown comes from `open_checkpoint`, the same reader `convert`, `verify` and `distill` use, so what
`inspect` prints is what those commands will read. No tensor data is read: shapes and dtypes come from metadata.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.markup import escape
from rich.table import Table

from tmconvert.converter.checkpoint import Checkpoint, TensorInfo, open_checkpoint
from tmconvert.converter.cli._console import console
from tmconvert.converter.mapping.files import load_mapping, shipped_mapping_paths
from tmconvert.converter.plan.plan import accepts_source
from tmconvert.models import ViTConfig

_SOURCE_COLUMN_MIN_WIDTH = 110


def inspect(
    path: Annotated[
        Path,
        typer.Argument(
            help="Checkpoint: .safetensors, .pt/.pth/.bin (zip or legacy), *.index.json or a Hugging Face folder.",
            show_default=False,
        ),
    ],
    ema: Annotated[bool, typer.Option("--ema", help="Read the EMA weights ('model_ema' / 'state_dict_ema').")] = False,
    heads: Annotated[
        int | None,
        typer.Option(
            "--heads", min=1, help="Attention heads (shapes cannot tell; default: config.json, else head_dim 64)."
        ),
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object (every tensor included).")] = False,
    show_all: Annotated[
        bool, typer.Option("--all", help="List every tensor (default: blocks.0 stands for all blocks).")
    ] = False,
) -> None:
    """Describe a ViT checkpoint: format, container, naming, detected config, parameters and tensors."""
    with open_checkpoint(path, ema=ema, num_heads=heads) as ckpt:
        if as_json:
            console.out(json.dumps(describe(ckpt), indent=2), highlight=False)
        else:
            _print_summary(ckpt)
            console.print(_tensor_table(ckpt, show_all=show_all))


def describe(ckpt: Checkpoint) -> dict[str, Any]:
    """The facts `inspect --json` prints, as plain JSON-able values."""
    return {
        "path": str(ckpt.path),
        "format": ckpt.format,
        "weights_format": ckpt.weights_format,
        "files": [str(file) for file in ckpt.files],
        "config_file": str(ckpt.config_file) if ckpt.config_file else None,
        "container": ckpt.container,
        "container_entries": list(ckpt.container_entries),
        "naming": ckpt.naming,
        "family": ckpt.family,
        "layout": ckpt.layout,
        "mappings": converting_mappings(ckpt),
        "config": _config_dict(ckpt.config),
        "num_params": ckpt.num_params,
        "num_tensors": len(ckpt),
        "dtypes": _dtype_counts(ckpt),
        "size_on_disk": ckpt.size_on_disk,
        "notes": list(ckpt.notes),
        "ignored": [_tensor_dict(info) for info in ckpt.ignored],
        "tensors": [
            {**_tensor_dict(ckpt.info(name)), "source": list(ckpt.source_names(name))} for name in ckpt.names()
        ],
    }


def converting_mappings(ckpt: Checkpoint) -> list[dict[str, Any]]:
    """The shipped mappings that accept this checkpoint, with their target family; each family's default (its
    `default_for: "*"`) first."""
    found = []
    for path in shipped_mapping_paths():
        loaded = load_mapping(path)
        if accepts_source(loaded, ckpt.config):
            spec = loaded.mapping
            found.append({"name": loaded.name, "target": spec.target, "default": "*" in spec.default_for})
    return sorted(found, key=lambda m: not m["default"])


def _print_summary(ckpt: Checkpoint) -> None:
    cfg = ckpt.config
    summary = Table.grid(padding=(0, 2))
    summary.add_column(style="bold", no_wrap=True)
    summary.add_column(overflow="fold")
    summary.add_row("checkpoint", escape(str(ckpt.path)))
    fmt = ckpt.format if ckpt.format == ckpt.weights_format else f"{ckpt.format} ({ckpt.weights_format})"
    summary.add_row("format", fmt + (f", config {escape(ckpt.config_file.name)}" if ckpt.config_file else ""))
    entries = f" (entries: {escape(', '.join(ckpt.container_entries))})" if ckpt.container_entries else ""
    summary.add_row("container", f"{ckpt.container}{entries}")
    summary.add_row("naming", ckpt.naming)
    summary.add_row("family", f"{ckpt.family} ({_variant(cfg)})")
    mappings = converting_mappings(ckpt)
    shown = (
        ", ".join(m["name"] + (f" (default for {m['target']})" if m["default"] else "") for m in mappings)
        or "none of the shipped"
    )
    summary.add_row("layout", f"{ckpt.layout}; converts with {shown}")
    summary.add_row("config", _config_line(cfg))
    summary.add_row("parameters", f"{ckpt.num_params:,} in {len(ckpt)} tensors")
    summary.add_row("dtypes", ", ".join(f"{dtype} ×{count}" for dtype, count in _dtype_counts(ckpt).items()))
    summary.add_row("size on disk", f"{_bytes(ckpt.size_on_disk)} in {len(ckpt.files)} file(s)")
    if ckpt.ignored:
        summary.add_row("not read", escape(", ".join(f"{info.name} {_shape(info.shape)}" for info in ckpt.ignored)))
    for i, note in enumerate(ckpt.notes):
        summary.add_row("assumed" if i == 0 else "", escape(note))
    console.print(summary)


def _tensor_table(ckpt: Checkpoint, *, show_all: bool) -> Table:
    """All tensors, or (deep models, without --all) everything but blocks 1..N-1, which repeat blocks.0's layout."""
    depth = ckpt.config.depth
    collapse = not show_all and depth > 2
    # Stored names differ from canonical ones only for HF namings; they need a wide terminal (--json always has them).
    show_source = ckpt.naming != "timm" and console.width >= _SOURCE_COLUMN_MIN_WIDTH
    table = Table(title=None if not collapse else f"blocks.1 … blocks.{depth - 1} repeat blocks.0 (--all lists them)")
    table.add_column("name", no_wrap=True)
    table.add_column("shape", no_wrap=True)
    table.add_column("dtype", no_wrap=True)
    table.add_column("params", justify="right", no_wrap=True)
    if show_source:
        table.add_column(f"stored as ({ckpt.naming})", overflow="fold")
    summarised = False
    for name in ckpt.names():
        if collapse and name.startswith("blocks.") and not name.startswith("blocks.0."):
            if not summarised:
                per_block = sum(ckpt.info(n).numel for n in ckpt.names() if n.startswith("blocks.0."))
                row = [f"blocks.1 … blocks.{depth - 1}", f"{depth - 1} × blocks.0", "", f"{per_block * (depth - 1):,}"]
                table.add_row(*row, *([""] if show_source else []), style="dim")
                summarised = True
            continue
        info = ckpt.info(name)
        row = [name, _shape(info.shape), _dtype(info), f"{info.numel:,}"]
        table.add_row(*row, *([escape(_compact(ckpt.source_names(name)))] if show_source else []))
    return table


def _compact(names: tuple[str, ...]) -> str:
    """Several stored names as one: `a.b.{query,key,value}.weight` for Hugging Face's split q/k/v."""
    if len(names) == 1:
        return names[0]
    split = [name.split(".") for name in names]
    head = 0
    while all(len(parts) > head and parts[head] == split[0][head] for parts in split):
        head += 1
    tail = 0
    while all(len(parts) - tail > head and parts[-1 - tail] == split[0][-1 - tail] for parts in split):
        tail += 1
    middles = [".".join(parts[head : len(parts) - tail]) for parts in split]
    return ".".join([*split[0][:head], "{" + ",".join(middles) + "}", *split[0][len(split[0]) - tail :]])


def _variant(cfg: ViTConfig) -> str:
    kind = "DeiT distilled" if cfg.distilled else "ViT with LayerScale" if cfg.layer_scale else "ViT/DeiT"
    return kind + ("" if cfg.num_classes else ", no classifier head")


def _config_line(cfg: ViTConfig) -> str:
    height, width = cfg.img_size
    tokens = [name for name, on in (("cls", cfg.class_token), ("dist", cfg.distilled)) if on]
    tokens += [f"{cfg.reg_tokens} registers"] if cfg.reg_tokens else []
    parts = [
        f"embed_dim {cfg.embed_dim}",
        f"depth {cfg.depth}",
        f"heads {cfg.num_heads} (head_dim {cfg.head_dim})",
        f"mlp_hidden {cfg.mlp_hidden}",
        f"patch {cfg.patch_size}",
        f"image {height}×{width} (grid {cfg.grid[0]}×{cfg.grid[1]})",
        f"in_chans {cfg.in_chans}",
        f"classes {cfg.num_classes}",
        f"tokens {'+'.join(tokens) or 'none'}",
        f"qkv_bias {'yes' if cfg.qkv_bias else 'no'}",
        f"layer_scale {'yes' if cfg.layer_scale else 'no'}",
        f"norm_eps {cfg.norm_eps:g}",
        f"pos_embed {'patches only' if cfg.no_embed_class else 'covers cls/dist'}",
        f"pooling {cfg.global_pool}{' + fc_norm' if cfg.fc_norm else ''}",
        f"mlp act {cfg.act}",
    ]
    parts += ["pre-norm (ln_pre)"] if cfg.pre_norm else []
    parts += ["patch embedding without bias"] if not cfg.patch_bias else []
    return ", ".join(parts)


def _config_dict(cfg: ViTConfig) -> dict[str, Any]:
    return {
        **asdict(cfg),
        "img_size": list(cfg.img_size),
        "grid": list(cfg.grid),
        "num_patches": cfg.num_patches,
        "num_prefix_tokens": cfg.num_prefix_tokens,
        "pos_prefix_tokens": cfg.pos_prefix_tokens,
        "head_dim": cfg.head_dim,
    }


def _tensor_dict(info: TensorInfo) -> dict[str, Any]:
    return {"name": info.name, "shape": list(info.shape), "dtype": _dtype(info), "nbytes": info.nbytes}


def _dtype_counts(ckpt: Checkpoint) -> dict[str, int]:
    return dict(Counter(_dtype(ckpt.info(name)) for name in ckpt.names()))


def _dtype(info: TensorInfo) -> str:
    return str(info.dtype).removeprefix("torch.")


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(dim) for dim in shape) + ")"


def _bytes(size: int) -> str:
    value, unit = float(size), "B"
    for larger in ("KiB", "MiB", "GiB", "TiB"):
        if value < 1024:
            break
        value, unit = value / 1024, larger
    return f"{size:,} B" if unit == "B" else f"{value:.1f} {unit} ({size:,} B)"
