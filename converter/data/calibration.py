"""Calibration images: what conversion scores channels on and verification runs, given as `--calib`."""

from __future__ import annotations

import re
from collections.abc import Iterator

import torch

from tmconvert.converter.data.errors import DatasetError
from tmconvert.converter.data.loaders import ImageDataset, eval_batches
from tmconvert.converter.data.preprocess import InputSpec, Preprocess
from tmconvert.converter.data.sources import default_workers, open_source, parse_count
from tmconvert.models import ViTConfig

CALIB_BATCH = 16
CALIB_LIMIT = 512  # images read from a calibration source at most


def parse_calib(value: str | None) -> str | int | None:
    """`--calib` → None (not given), N (1 to `CALIB_LIMIT` seeded N(0, 1) noise images) or a data spec as `--data`
    takes it: a folder of images (class subfolders or flat), `fashion-mnist[:ROOT]` (its training split) or
    `synthetic:N`, each of them with `[START:STOP]` or not.

    A data spec is opened once here, so a missing or empty source fails before any work starts.
    """
    if value is None:
        return None
    if re.fullmatch(r"[0-9]+", value):
        count = parse_count(value, CALIB_LIMIT)
        if count is None:
            raise DatasetError(f"--calib {value}: give 1 to {CALIB_LIMIT} synthetic images")
        return count
    open_source(value, option="--calib")
    return value


def calibration_batches(
    calib: str | int, cfg: ViTConfig, *, seed: int, limit: int = CALIB_LIMIT
) -> Iterator[torch.Tensor]:
    """Batches of images as the teacher sees them (resized, ImageNet-normalised: the evaluation preprocessing): the
    first `limit` images of the source in its order, or seeded N(0, 1) noise images.

    Images are decoded in worker processes when there are several batches to read (`default_workers`)."""
    if isinstance(calib, int):
        gen = torch.Generator().manual_seed(seed)
        for start in range(0, calib, CALIB_BATCH):
            n = min(CALIB_BATCH, calib - start)
            yield torch.randn(n, cfg.in_chans, *cfg.img_size, generator=gen)
        return
    source = open_source(calib, img_size=cfg.img_size, option="--calib")
    dataset = ImageDataset(source, Preprocess(InputSpec.for_model(cfg.img_size, cfg.in_chans), train=False))
    workers = default_workers(-(-min(limit, len(source)) // CALIB_BATCH))
    for images, _ in eval_batches(dataset, batch_size=CALIB_BATCH, limit=limit, workers=workers):
        yield images
