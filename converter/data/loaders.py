"""Batches: a source behind a `Preprocess` as a dataset, and loaders that are deterministic and resumable.

The training order is a function of (seed, epoch) (DistributedSampler's permutation, rank-strided) and each sample's
augmentation is drawn from a generator seeded by (seed, epoch, index). Nothing depends on worker count or global RNG
state, so a resumed run sees exactly the batches an uninterrupted one would, and k processes see together the same
global batches as one process.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from tmconvert.converter.data.clips import ClipSource
from tmconvert.converter.data.errors import DatasetError
from tmconvert.converter.data.preprocess import Preprocess
from tmconvert.converter.data.sources import ImageSource


class ImageDataset(Dataset):
    """A source behind a `Preprocess`: (C, H, W) images, or (C, T, H, W) clips from a `ClipSource`. Keys are an
    index (evaluation) or (index, epoch) (training).

    Training keys seed the sample's augmentation by (seed, epoch, index), so it does not depend on which worker
    process loads it or on what ran before.
    """

    def __init__(self, source: ImageSource | ClipSource, preprocess: Preprocess, seed: int = 0):
        self.source, self.preprocess, self.seed = source, preprocess, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        if isinstance(key, tuple):
            index, epoch = key
            rng = np.random.default_rng([self.seed, epoch, index])
        else:
            index, rng = key, None
        if isinstance(self.source, ClipSource):
            return self.preprocess.clip(self.source.clip(index), rng), self.source.label(index)
        return self.preprocess(self.source.image(index), rng), self.source.label(index)


class EpochSampler(DistributedSampler):
    """DistributedSampler yielding (index, epoch) keys, able to start part-way into an epoch (resume)."""

    def __init__(self, dataset: Dataset, *, world: int, rank: int, seed: int):
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=False)
        self.skip = 0

    def set_position(self, epoch: int, skip: int) -> None:
        """Iterate `epoch` from its `skip`-th sample of this rank on."""
        self.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())[self.skip :]
        return iter([(int(i), self.epoch) for i in indices])

    def __len__(self) -> int:
        return self.num_samples - self.skip


def steps_per_epoch(dataset_len: int, batch_per_rank: int, world: int) -> int:
    """Full batches per rank and epoch (the last partial batch is dropped, as in every rank)."""
    return math.ceil(dataset_len / world) // batch_per_rank


def train_batches(
    dataset: ImageDataset,
    *,
    batch_per_rank: int,
    world: int = 1,
    rank: int = 0,
    seed: int = 0,
    workers: int = 0,
    start_step: int = 0,
    pin_memory: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Endless (images, labels) batches for this rank, epoch after epoch, starting at global step `start_step`."""
    per_epoch = steps_per_epoch(len(dataset), batch_per_rank, world)
    if per_epoch == 0:
        raise DatasetError(
            f"{len(dataset)} images do not make one batch of {batch_per_rank * world}; lower the batch size"
        )
    sampler = EpochSampler(dataset, world=world, rank=rank, seed=seed)
    loader = DataLoader(
        dataset,
        batch_size=batch_per_rank,
        sampler=sampler,
        drop_last=True,
        num_workers=workers,
        pin_memory=pin_memory,
        persistent_workers=workers > 0,
    )
    epoch, first_batch = divmod(start_step, per_epoch)
    while True:
        sampler.set_position(epoch, first_batch * batch_per_rank)
        yield from _one_line_errors(loader)
        epoch, first_batch = epoch + 1, 0


def eval_batches(
    dataset: ImageDataset, *, batch_size: int, limit: int | None = None, workers: int = 0
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """In-order (images, labels) batches over the first `limit` images (all when None)."""
    subset: Dataset = dataset
    if limit is not None:
        subset = Subset(dataset, range(min(limit, len(dataset))))
    return _one_line_errors(DataLoader(subset, batch_size=batch_size, shuffle=False, num_workers=workers))


def _one_line_errors(loader: DataLoader) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The loader's batches; a DatasetError from a worker process (re-raised by the DataLoader with the worker's
    whole traceback as its message) comes out as the original one-line message."""
    try:
        yield from loader
    except DatasetError as exc:
        lines = str(exc).strip().splitlines()
        if len(lines) > 1 and lines[0].startswith("Caught DatasetError"):
            raise DatasetError(lines[-1].split("DatasetError: ", 1)[-1]) from None
        raise
