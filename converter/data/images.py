"""Images for distillation and evaluation: where they come from, what the teacher expects, resumable loaders.

Sources (`open_source`):
- a folder in ImageFolder layout (one subfolder per class, images anywhere below it, classes sorted by folder name)
  gives labelled images; a flat folder of images gives unlabelled ones (pure distillation: no task loss);
- `fashion-mnist` or `fashion-mnist:ROOT`: the built-in IDX reader (`datasets.load_fashion_mnist`), train or test;
- `synthetic:N`: N seeded random images with random labels; it exercises every code path and teaches nothing.

Every source hands out PIL images, and one `Preprocess` turns them into what the teacher was trained on: its input
size, its channels (grey copied to 3 channels for an RGB teacher) and its normalisation (ImageNet unless the
teacher's checkpoint metadata records its own, as the embedded Fashion-MNIST teacher's does). Training adds
augmentation that suits the image size: pad-and-crop plus flip for small images (what the embedded teacher was
trained with), random-resized-crop plus flip for large ones.

Unreadable images stop the run with the file's name (`DatasetError`) instead of being skipped: a data set that
silently shrinks changes what a run measures, and a broken file only has to be fixed once.

Determinism: the training order is a function of (seed, epoch) (DistributedSampler's permutation, rank-strided) and
each sample's augmentation is drawn from a generator seeded by (seed, epoch, index). Nothing depends on worker
count or global RNG state, so a resumed run sees exactly the batches an uninterrupted one would, and k processes
see together the same global batches as one process.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from tmconvert.converter.data.fashion_mnist import DatasetError, load_fashion_mnist

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SMALL_IMAGE = 64  # sides below this count as small: pad-and-crop augmentation, no centre crop at evaluation
AUGMENT_MODES = ("auto", "pad_crop", "resized_crop", "none")
SPLITS = ("train", "test")


# ---------------------------------------------------------------------------------------------------------------
# What the model expects


@dataclass(frozen=True)
class InputSpec:
    """A model's input: size (H, W), channels, and the per-channel normalisation applied after scaling to [0, 1]."""

    img_size: tuple[int, int]
    channels: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def for_model(cls, img_size: tuple[int, int], channels: int, metadata: dict[str, Any] | None = None) -> InputSpec:
        """The model's size and channels; mean/std from metadata `input` ({'mean': [...], 'std': [...]}) or ImageNet.

        Three-value statistics for a one-channel model are averaged (luminance input).
        """
        recorded = (metadata or {}).get("input")
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if isinstance(recorded, dict) and "mean" in recorded and "std" in recorded:
            mean, std = tuple(float(v) for v in recorded["mean"]), tuple(float(v) for v in recorded["std"])
        if channels == 1 and len(mean) == 3:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
        if len(mean) != channels or len(std) != channels:
            raise DatasetError(f"normalisation has {len(mean)} means / {len(std)} stds for a {channels}-channel model")
        return cls(tuple(img_size), channels, mean, std)

    def to_json(self) -> dict[str, Any]:
        return {"img_size": list(self.img_size), "channels": self.channels, "mean": list(self.mean),
                "std": list(self.std)}  # fmt: skip


def normalise(images01: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """(…, C, H, W) in [0, 1] → (x - mean) / std per channel."""
    shape = (-1, 1, 1)
    mean_t = torch.tensor(mean, dtype=images01.dtype, device=images01.device).view(shape)
    std_t = torch.tensor(std, dtype=images01.dtype, device=images01.device).view(shape)
    return (images01 - mean_t) / std_t


def grey_batch_to_input(
    images_u8: torch.Tensor, mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD
) -> torch.Tensor:
    """uint8 grey (N, H, W) → float (N, 3, H, W), normalised: the embedded teacher's input, batched on any device."""
    return normalise(images_u8.float().div(255).unsqueeze(1).expand(-1, 3, -1, -1), mean, std)


# ---------------------------------------------------------------------------------------------------------------
# Sources


class ImageSource(Protocol):
    """Indexable images with optional labels; `classes` is None for unlabelled data."""

    classes: tuple[str, ...] | None

    def __len__(self) -> int: ...

    def image(self, index: int) -> Image.Image: ...

    def label(self, index: int) -> int: ...  # -1 when unlabelled

    def identity(self) -> dict[str, Any]: ...  # what the run record and resume fingerprint say about the data


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in IMAGE_SUFFIXES and not path.name.startswith(".")


def _images_below(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if _is_image(p) and not any(s.startswith(".") for s in p.parts[-2:]))


class FolderSource:
    """ImageFolder layout (class subfolders) or a flat folder of unlabelled images."""

    def __init__(self, root: Path):
        if not root.exists():
            raise DatasetError(f"{root}: no such data folder")
        if not root.is_dir():
            raise DatasetError(f"{root}: not a folder (expected class subfolders or a folder of images)")
        entries = sorted(root.iterdir())
        loose = [p for p in entries if _is_image(p)]
        per_class = {d.name: _images_below(d) for d in entries if d.is_dir() and not d.name.startswith(".")}
        per_class = {name: files for name, files in per_class.items() if files}
        if per_class and loose:
            raise DatasetError(
                f"{root}: mixes class subfolders ({', '.join(list(per_class)[:3])}) with loose images "
                f"({loose[0].name}); use one layout"
            )
        if not per_class and not loose:
            raise DatasetError(f"{root}: no images ({', '.join(IMAGE_SUFFIXES)}) in the folder or its subfolders")
        self.root = root
        if per_class:
            self.classes: tuple[str, ...] | None = tuple(per_class)
            self.files = [f for files in per_class.values() for f in files]
            self.labels = [c for c, files in enumerate(per_class.values()) for _ in files]
        else:
            self.classes = None
            self.files = loose
            self.labels = [-1] * len(loose)

    def __len__(self) -> int:
        return len(self.files)

    def image(self, index: int) -> Image.Image:
        path = self.files[index]
        try:
            with Image.open(path) as img:
                img.load()
                return img.copy()
        except (OSError, UnidentifiedImageError, ValueError, Image.DecompressionBombError) as exc:
            raise DatasetError(f"{path}: cannot read image ({exc})") from None

    def label(self, index: int) -> int:
        return self.labels[index]

    def identity(self) -> dict[str, Any]:
        return {"kind": "folder", "root": str(self.root.resolve()), "images": len(self.files),
                "classes": list(self.classes) if self.classes else None}  # fmt: skip


class FashionMnistSource:
    """One split of Fashion-MNIST, held in memory (47 MB for the train split)."""

    def __init__(self, split: str, root: str | None):
        arrays = load_fashion_mnist(split, root)
        self.split, self.root = split, root
        self.images, self.labels = arrays.images, arrays.labels
        self.classes: tuple[str, ...] | None = arrays.classes

    def __len__(self) -> int:
        return len(self.labels)

    def image(self, index: int) -> Image.Image:
        return Image.fromarray(self.images[index])

    def label(self, index: int) -> int:
        return int(self.labels[index])

    def identity(self) -> dict[str, Any]:
        return {"kind": "fashion-mnist", "split": self.split, "images": len(self)}


class SyntheticSource:
    """Seeded uniform-noise RGB images with seeded random labels; image i is the same on every call and machine."""

    def __init__(self, count: int, img_size: tuple[int, int], num_classes: int, seed: int = 0):
        self.count, self.img_size, self.seed = count, tuple(img_size), seed
        self.num_classes = num_classes
        self.classes: tuple[str, ...] | None = tuple(str(c) for c in range(num_classes)) if num_classes else None

    def __len__(self) -> int:
        return self.count

    def _rng(self, index: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, index])

    def image(self, index: int) -> Image.Image:
        rng = self._rng(index)
        rng.integers(0, 2)  # the label's draw (see `label`): images and labels come from one stream per index
        pixels = rng.integers(0, 256, size=(*self.img_size, 3), dtype=np.uint8)
        return Image.fromarray(pixels)

    def label(self, index: int) -> int:
        return int(self._rng(index).integers(0, self.num_classes)) if self.num_classes else -1

    def identity(self) -> dict[str, Any]:
        return {"kind": "synthetic", "images": self.count, "img_size": list(self.img_size),
                "classes": self.num_classes}  # fmt: skip


class SliceSource:
    """Images `start:stop` of another source (Python slice semantics), e.g. a validation hold-out of a training set."""

    def __init__(self, inner: ImageSource, start: int | None, stop: int | None, spec: str):
        self.inner, self.indices = inner, range(len(inner))[slice(start, stop)]
        if not self.indices:
            raise DatasetError(f"--data {spec}: the slice selects no images (the source has {len(inner)})")
        self.classes = inner.classes

    def __len__(self) -> int:
        return len(self.indices)

    def image(self, index: int) -> Image.Image:
        return self.inner.image(self.indices[index])

    def label(self, index: int) -> int:
        return self.inner.label(self.indices[index])

    def identity(self) -> dict[str, Any]:
        return {**self.inner.identity(), "slice": [self.indices.start, self.indices.stop], "images": len(self)}


_SLICE = re.compile(r"^(?P<inner>.+)\[(?P<start>-?\d*):(?P<stop>-?\d*)\]$")


def open_source(
    spec: str, *, split: str = "train", img_size: tuple[int, int] = (224, 224), num_classes: int = 0
) -> ImageSource:
    """`--data` → a source: `synthetic:N`, `fashion-mnist[:ROOT]` (`split`), or a folder path; any of them followed
    by `[START:STOP]` takes those images only (Python slice: `fashion-mnist[:-5000]`, `fashion-mnist[-5000:]`).

    `img_size` and `num_classes` shape synthetic data only (images at the model's size, labels in its classes).
    """
    sliced = _SLICE.match(spec or "")
    if sliced:
        inner = open_source(sliced["inner"], split=split, img_size=img_size, num_classes=num_classes)
        start, stop = (int(v) if v else None for v in (sliced["start"], sliced["stop"]))
        return SliceSource(inner, start, stop, spec)
    if split not in SPLITS:
        raise DatasetError(f"--split {split}: choose one of {', '.join(SPLITS)}")
    if not spec:
        raise DatasetError("--data is empty: give a folder, fashion-mnist[:ROOT] or synthetic:N")
    kind, _, rest = spec.partition(":")
    if kind == "synthetic":
        if not rest.isdigit() or int(rest) <= 0:
            raise DatasetError(f"--data {spec}: synthetic data needs a positive image count, e.g. synthetic:256")
        return SyntheticSource(int(rest), img_size, num_classes)
    if kind == "fashion-mnist":
        return FashionMnistSource(split, rest or None)
    return FolderSource(Path(spec))


# ---------------------------------------------------------------------------------------------------------------
# Preprocessing


def random_resized_box(
    size: tuple[int, int], scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """A crop box (x0, y0, x1, y1) covering a random area fraction and aspect ratio (Inception-style cropping).

    Ten tries, then the largest centred box within the ratio range, as torchvision's RandomResizedCrop does.
    """
    width, height = size
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(*log_ratio))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
            return x0, y0, x0 + w, y0 + h
    aspect = width / height
    if aspect < ratio[0]:
        w, h = width, round(width / ratio[0])
    elif aspect > ratio[1]:
        w, h = round(height * ratio[1]), height
    else:
        w, h = width, height
    x0, y0 = (width - w) // 2, (height - h) // 2
    return x0, y0, x0 + w, y0 + h


class Preprocess:
    """PIL image → normalised (C, H, W) float tensor at the model's input size; augmented when `train`.

    Augmentation modes: `pad_crop` (zero-pad by `pad` × side, random crop back, as the embedded teacher was
    trained), `resized_crop` (random area in `scale`, aspect in 3/4..4/3, resized), `none` (resize only); `auto`
    picks `pad_crop` below `SMALL_IMAGE` px and `resized_crop` above. Evaluation resizes the shorter side to
    side / `eval_crop` and takes the centre crop (`eval_crop` None: 1.0 for small images, DeiT's 0.875 for large).
    """

    def __init__(
        self,
        spec: InputSpec,
        *,
        train: bool,
        augment: str = "auto",
        hflip: bool = True,
        scale: tuple[float, float] = (0.08, 1.0),
        pad: float = 0.07,
        eval_crop: float | None = None,
    ):
        if augment not in AUGMENT_MODES:
            raise DatasetError(f"augment {augment!r}: choose one of {', '.join(AUGMENT_MODES)}")
        small = min(spec.img_size) < SMALL_IMAGE
        self.spec, self.train, self.hflip = spec, train, hflip
        self.mode = ("pad_crop" if small else "resized_crop") if augment == "auto" else augment
        self.scale, self.pad = tuple(scale), pad
        self.eval_crop = eval_crop if eval_crop is not None else (1.0 if small else 0.875)

    def __call__(self, img: Image.Image, rng: np.random.Generator | None = None) -> torch.Tensor:
        img = img.convert("RGB" if self.spec.channels == 3 else "L")
        height, width = self.spec.img_size
        if self.train:
            if rng is None:
                raise ValueError("training preprocessing needs a random generator")
            img = self._augment(img, rng)
        else:
            img = self._centre(img)
        pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).view(height, width, self.spec.channels)
        return normalise(pixels.permute(2, 0, 1).float().div(255), self.spec.mean, self.spec.std)

    def _fit(self, img: Image.Image) -> Image.Image:
        height, width = self.spec.img_size
        return img if img.size == (width, height) else img.resize((width, height), Image.Resampling.BICUBIC)

    def _augment(self, img: Image.Image, rng: np.random.Generator) -> Image.Image:
        height, width = self.spec.img_size
        if self.mode == "resized_crop":
            box = random_resized_box(img.size, self.scale, (3 / 4, 4 / 3), rng)
            img = img.resize((width, height), Image.Resampling.BICUBIC, box=box)
        elif self.mode == "pad_crop":
            img = self._fit(img)
            px, py = round(self.pad * width), round(self.pad * height)
            dx, dy = int(rng.integers(-px, px + 1)), int(rng.integers(-py, py + 1))
            img = img.crop((dx, dy, dx + width, dy + height))  # outside the image PIL fills zeros: the padding
        else:
            img = self._fit(img)
        if self.hflip and rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return img

    def _centre(self, img: Image.Image) -> Image.Image:
        height, width = self.spec.img_size
        if img.size == (width, height):
            return img
        factor = max(width / img.size[0], height / img.size[1]) / self.eval_crop
        resized = (max(width, round(img.size[0] * factor)), max(height, round(img.size[1] * factor)))
        img = img.resize(resized, Image.Resampling.BICUBIC)
        x0, y0 = (resized[0] - width) // 2, (resized[1] - height) // 2
        return img.crop((x0, y0, x0 + width, y0 + height))


# ---------------------------------------------------------------------------------------------------------------
# Datasets and loaders


class ImageDataset(Dataset):
    """A source behind a `Preprocess`. Keys are an index (evaluation) or (index, epoch) (training).

    Training keys seed the sample's augmentation by (seed, epoch, index), so it does not depend on which worker
    process loads it or on what ran before.
    """

    def __init__(self, source: ImageSource, preprocess: Preprocess, seed: int = 0):
        self.source, self.preprocess, self.seed = source, preprocess, seed

    def __len__(self) -> int:
        return len(self.source)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        if isinstance(key, tuple):
            index, epoch = key
            rng = np.random.default_rng([self.seed, epoch, index])
        else:
            index, rng = key, None
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
    loader = DataLoader(dataset, batch_size=batch_per_rank, sampler=sampler, drop_last=True, num_workers=workers,
                        pin_memory=pin_memory, persistent_workers=workers > 0)  # fmt: skip
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
