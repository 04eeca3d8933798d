"""`tmconvert eval MODEL --data D`: top-1 / top-5 accuracy and mean loss of any teacher or student checkpoint.

A model written by tmconvert (converted or distilled: ViM, PlainMamba, VideoMamba, VMamba) loads through
`load_converted`, anything else through the ViT readers; a registry name (`plainmamba-l1`) is that model freshly
initialised (seed 0), the chance-level baseline. Images are preprocessed as the model expects: its input size, and
the normalisation recorded in its metadata (ImageNet otherwise); no augmentation. A video model also reads clips
(`clips:T:...`), each frame preprocessed as an image.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.markup import escape
from rich.table import Table

from tmconvert.converter.cli._console import console
from tmconvert.converter.data.clips import ClipSource
from tmconvert.converter.data.loaders import ImageDataset, eval_batches
from tmconvert.converter.data.preprocess import InputSpec, Preprocess
from tmconvert.converter.data.sources import default_workers, open_source
from tmconvert.converter.distill.families import clip_families, reads_clips
from tmconvert.converter.errors import ConfigError
from tmconvert.converter.modelfile.classifier import LoadedModel, load_classifier
from tmconvert.converter.verify.accuracy import EvalResult, measure_accuracy
from tmconvert.models import ModelConfigError, build_model, family_of, get_config


def eval_(
    model: Annotated[
        Path,
        typer.Argument(help="Teacher ViT checkpoint, a model written by tmconvert, or a model name (untrained)."),
    ],
    data: Annotated[
        str,
        typer.Option(
            "--data",
            help="Labelled images: class subfolders, fashion-mnist[:ROOT] or synthetic:N; clips:T:<images> for video.",
        ),
    ],
    split: Annotated[str, typer.Option("--split", help="fashion-mnist split: test or train.")] = "test",
    batch_size: Annotated[int, typer.Option("--batch-size", min=1, help="Images per forward pass.")] = 256,
    limit: Annotated[int | None, typer.Option("--limit", min=1, help="Evaluate the first N images only.")] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            "--workers", min=0, max=256, help="Image loading processes (default: one per CPU but one, at most 8)."
        ),
    ] = None,
    device: Annotated[str | None, typer.Option("--device", help="cpu or cuda (default: cuda if available).")] = None,
    heads: Annotated[int | None, typer.Option("--heads", min=1, help="ViT heads, when shapes cannot tell.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the result as JSON.")] = False,
) -> None:
    """Accuracy (top-1, top-5 when there are more than 5 classes) and mean cross-entropy of a checkpoint."""
    if device not in (None, "cpu", "cuda"):
        raise ConfigError(f"--device {device}: choose cpu or cuda")
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    run_on = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    loaded = _load(model, heads)
    classes = loaded.config.num_classes
    if classes == 0:
        raise ConfigError(f"{model}: has no classifier head; nothing to evaluate")
    spec = InputSpec.for_model(loaded.config.img_size, loaded.config.in_chans, loaded.metadata)
    source = open_source(data, split=split, img_size=spec.img_size, num_classes=classes, clips=True)
    if isinstance(source, ClipSource) and not reads_clips(loaded.config):
        raise ConfigError(
            f"--data {data}: clips need a video model ({', '.join(clip_families())}), not a {loaded.family}"
        )
    if source.classes is None:
        raise ConfigError(f"--data {data}: unlabelled images; evaluation needs class subfolders")
    if len(source.classes) > classes:
        raise ConfigError(f"--data {data}: {len(source.classes)} classes, the model predicts {classes}")
    dataset = ImageDataset(source, Preprocess(spec, train=False))
    if workers is None:
        workers = default_workers(-(-min(limit or len(dataset), len(dataset)) // batch_size))
    batches = eval_batches(dataset, batch_size=batch_size, limit=limit, workers=workers)
    result = measure_accuracy(loaded.model.to(run_on), batches, num_classes=classes, device=run_on)
    if as_json:
        console.out(json.dumps(_report(loaded, data, result), indent=2), highlight=False)
    else:
        _print(loaded, data, result)


def _load(model: Path, heads: int | None) -> LoadedModel:
    """A checkpoint or model file; else, when `model` is a registry name, that model freshly initialised (seed 0)."""
    if not model.exists():
        try:
            cfg = get_config(str(model))
        except ModelConfigError:
            pass
        else:
            return LoadedModel(build_model(cfg, seed=0).eval(), family_of(cfg), cfg, {}, model, ())
    return load_classifier(model, num_heads=heads)


def _report(loaded: LoadedModel, data: str, result: EvalResult) -> dict:
    return {"model": str(loaded.path), "family": loaded.family, "data": data, **result.to_json()}


def _print(loaded: LoadedModel, data: str, result: EvalResult) -> None:
    table = Table(show_header=False)
    table.add_row("model", f"{escape(str(loaded.path))} ({loaded.family})")
    table.add_row("data", escape(data))
    table.add_row("images", str(result.images))
    table.add_row("top-1", f"{100 * result.top1:.2f} %")
    if result.top5 is not None:
        table.add_row("top-5", f"{100 * result.top5:.2f} %")
    table.add_row("mean loss", f"{result.loss:.4f}")
    table.add_row("img/s", f"{result.images_per_second:.0f}")
    console.print(table)
