"""`tmconvert list`: conversion targets (every target family's registered sizes), known teacher configs, shipped
mappings, and the mapping language's ops and initialisers.

(The module is not called `list.py`: a submodule named `list` would shadow the builtin inside this package.)
"""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import typer
from rich.table import Table

from tmconvert.converter.cli._console import console
from tmconvert.converter.configs import target_families
from tmconvert.converter.errors import TmconvertError
from tmconvert.converter.mapping.files import load_mapping, shipped_mapping_paths
from tmconvert.converter.mapping.ops import INITS, OPS
from tmconvert.models import build_model, get_config, list_models


def _params(name: str) -> int:
    model = build_model(name, device="meta")
    return sum(math.prod(p.shape) for p in model.state_dict().values())


def catalogue() -> dict[str, Any]:
    """Everything `list` shows, as JSON-able data."""
    targets = []
    for family in target_families():
        for name in list_models(family):
            c = get_config(name)
            targets.append(
                {
                    "name": name,
                    "family": family,
                    "embed_dim": c.embed_dim,
                    "depth": c.depth,
                    "d_inner": c.d_inner,
                    "d_state": c.d_state,
                    "patch_size": c.patch_size,
                    "stride": getattr(c, "resolved_stride", c.patch_size),  # ViM's overlapping patches
                    "img_size": list(c.img_size),
                    "num_classes": c.num_classes,
                    "params": _params(name),
                }
            )
    sources = []
    for name in list_models("vit"):
        c = get_config(name)
        sources.append(
            {
                "name": name,
                "embed_dim": c.embed_dim,
                "depth": c.depth,
                "num_heads": c.num_heads,
                "mlp_hidden": c.mlp_hidden,
                "patch_size": c.patch_size,
                "img_size": list(c.img_size),
                "distilled": c.distilled,
                "params": _params(name),
            }
        )
    mappings = []
    for path in shipped_mapping_paths():
        try:
            loaded = load_mapping(path)
        except TmconvertError as exc:
            mappings.append({"name": path.stem, "path": str(path), "error": str(exc).splitlines()[0]})
            continue
        spec = loaded.mapping
        mappings.append(
            {
                "name": loaded.name,
                "path": str(path),
                "source": spec.source,
                "target": spec.target,
                "default_for": spec.default_for,
                "description": spec.description,
                "sha256": loaded.sha256,
            }
        )
    ops = [{"name": spec.name, "summary": spec.summary} for spec in OPS.values()]
    inits = [{"name": spec.name, "summary": spec.summary} for spec in INITS.values()]
    return {"targets": targets, "sources": sources, "mappings": mappings, "ops": ops, "inits": inits}


def list_(as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False) -> None:
    """List conversion targets, teacher configs, shipped mappings, mapping ops and initialisers."""
    data = catalogue()
    if as_json:
        console.out(json.dumps(data, indent=2), highlight=False)
        return
    targets = Table(title="targets (--to)", title_justify="left")
    for column in ("name", "family", "D", "depth", "E", "N", "patch/stride", "image", "classes", "params"):
        targets.add_column(column)
    for t in data["targets"]:
        targets.add_row(
            t["name"],
            t["family"],
            str(t["embed_dim"]),
            str(t["depth"]),
            str(t["d_inner"]),
            str(t["d_state"]),
            f"{t['patch_size']}/{t['stride']}",
            "x".join(map(str, t["img_size"])),
            str(t["num_classes"]),
            f"{t['params'] / 1e6:.2f}M",
        )
    console.print(targets)
    sources = Table(
        title="teacher configs (detected from checkpoints; these are the reference sizes)", title_justify="left"
    )
    for column in ("name", "D", "depth", "heads", "mlp", "patch", "image", "distilled", "params"):
        sources.add_column(column)
    for s in data["sources"]:
        sources.add_row(
            s["name"],
            str(s["embed_dim"]),
            str(s["depth"]),
            str(s["num_heads"]),
            str(s["mlp_hidden"]),
            str(s["patch_size"]),
            "x".join(map(str, s["img_size"])),
            "yes" if s["distilled"] else "",
            f"{s['params'] / 1e6:.2f}M",
        )
    console.print(sources)
    mappings = Table(title="mappings (--mapping)", title_justify="left")
    for column in ("name", "converts", "default for", "description"):
        mappings.add_column(column, overflow="fold")
    for m in data["mappings"]:
        if "error" in m:
            mappings.add_row(m["name"], "", "", f"[red]invalid:[/] {m['error']}")
        else:
            mappings.add_row(
                m["name"], f"{m['source']} -> {m['target']}", ", ".join(m["default_for"]), m["description"]
            )
    console.print(mappings)
    ops = Table(title="mapping ops (see docs/mappings.md)", title_justify="left")
    ops.add_column("op")
    ops.add_column("does")
    for op in data["ops"]:
        ops.add_row(op["name"], op["summary"])
    console.print(ops)
    inits = Table(title="initialisers (`init:`, see docs/mappings.md)", title_justify="left")
    inits.add_column("init")
    inits.add_column("makes")
    for init in data["inits"]:
        inits.add_row(init["name"], init["summary"])
    console.print(inits)
