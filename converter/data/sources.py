"""Where images come from (`open_source`): a folder in ImageFolder layout (one subfolder per class, images anywhere
below it, classes sorted by folder name) gives labelled images, a flat folder unlabelled ones (pure distillation: no
task loss); `fashion-mnist` or `fashion-mnist:ROOT` reads the IDX files (train or test); `synthetic:N` gives N seeded
random images with random labels, which exercises every code path and teaches nothing. Any of them followed by
`[START:STOP]` takes those images only. `clips:T:<any of these>` makes T-frame clips of them for video students
(`clips.py`).

Every source hands out PIL images. Unreadable images stop the run with the file's name (`DatasetError`) instead of
being skipped: a data set that silently shrinks changes what a run measures, and a broken file only has to be fixed
once.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image, UnidentifiedImageError

from tmconvert.converter.data.clips import MAX_FRAMES, ClipSource
from tmconvert.converter.data.errors import DatasetError
from tmconvert.converter.data.fashion_mnist import load_fashion_mnist

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
SPLITS = ("train", "test")
MAX_DEFAULT_WORKERS = 8  # image-loading processes started when not told: more rarely feed a GPU any faster
SYNTHETIC_LIMIT = 10_000_000  # synthetic images at most: a shuffled epoch of them is a permutation held in memory


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
        return {
            "kind": "folder",
            "root": str(self.root.resolve()),
            "images": len(self.files),
            "classes": list(self.classes) if self.classes else None,
        }


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
        return {"kind": "synthetic", "images": self.count, "img_size": list(self.img_size), "classes": self.num_classes}


class SliceSource:
    """Images `start:stop` of another source (Python slice semantics), e.g. a validation hold-out of a training set."""

    def __init__(self, inner: ImageSource, start: int | None, stop: int | None, spec: str, option: str = "--data"):
        self.inner, self.indices = inner, range(len(inner))[slice(start, stop)]
        if not self.indices:
            raise DatasetError(f"{option} {spec}: the slice selects no images (the source has {len(inner)})")
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


def default_workers(batches: int) -> int:
    """Image-loading processes to read `batches` batches with when not told. Decoding in the main process starves a
    GPU (ViM-S eval: 436 img/s, 2,042 with 8 workers), so one per CPU this process may use, less the main process's,
    at most 8; no more than there are batches (each worker prefetches whole ones), and none for a single batch."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return 0 if batches <= 1 else max(0, min(MAX_DEFAULT_WORKERS, cpus - 1, batches))


def parse_count(text: str, limit: int) -> int | None:
    """`text` as a count from 1 to `limit`, else None. ASCII digits only (`str.isdigit` passes '²', which `int`
    refuses), and no more of them than `limit` has (`int` refuses more than 4300)."""
    digits = text.lstrip("0")
    if not re.fullmatch(r"[0-9]+", text) or not digits or len(digits) > len(str(limit)) or int(digits) > limit:
        return None
    return int(digits)


def open_source(
    spec: str,
    *,
    split: str = "train",
    img_size: tuple[int, int] = (224, 224),
    num_classes: int = 0,
    option: str = "--data",
    clips: bool = False,
) -> ImageSource | ClipSource:
    """`--data` → a source: `synthetic:N`, `fashion-mnist[:ROOT]` (`split`), or a folder path; any of them followed
    by `[START:STOP]` takes those images only (Python slice: `fashion-mnist[:-5000]`, `fashion-mnist[-5000:]`).
    With `clips`, also `clips:T:<image spec>`: T-frame clips of those images (`ClipSource`).

    `img_size` and `num_classes` shape synthetic data only (images at the model's size, labels in its classes);
    `option` is what error messages call the spec (`--calib` reads the same specs).
    """
    if (spec or "").startswith("clips:"):
        return _open_clips(spec, split=split, img_size=img_size, num_classes=num_classes, option=option, clips=clips)
    sliced = _SLICE.match(spec or "")
    if sliced:
        inner = open_source(sliced["inner"], split=split, img_size=img_size, num_classes=num_classes, option=option)
        try:
            start, stop = (int(v) if v else None for v in (sliced["start"], sliced["stop"]))
        except ValueError:  # more digits than Python converts (4300)
            raise DatasetError(f"{option} {spec}: slice bounds too long") from None
        return SliceSource(inner, start, stop, spec, option)
    if split not in SPLITS:
        raise DatasetError(f"--split {split}: choose one of {', '.join(SPLITS)}")
    if not spec:
        raise DatasetError(f"{option} is empty: give a folder, fashion-mnist[:ROOT] or synthetic:N")
    kind, _, rest = spec.partition(":")
    if kind == "synthetic":
        count = parse_count(rest, SYNTHETIC_LIMIT)
        if count is None:
            raise DatasetError(
                f"{option} {spec}: synthetic data needs an image count from 1 to {SYNTHETIC_LIMIT}, e.g. synthetic:256"
            )
        return SyntheticSource(count, img_size, num_classes)
    if kind == "fashion-mnist":
        return FashionMnistSource(split, rest or None)
    return FolderSource(Path(spec))


def _open_clips(
    spec: str, *, split: str, img_size: tuple[int, int], num_classes: int, option: str, clips: bool
) -> ClipSource:
    """`clips:T:<image spec>`; only where the caller reads clips (distillation and evaluation of video students)."""
    if not clips:
        raise DatasetError(f"{option} {spec}: clips are read by video students only (distill, eval); give images here")
    _, frames_text, inner = spec.split(":", 2) if spec.count(":") >= 2 else (spec, "", "")
    frames = parse_count(frames_text, MAX_FRAMES)
    if frames is None or not inner:
        raise DatasetError(
            f"{option} {spec}: clips need a frame count from 1 to {MAX_FRAMES} and an image spec, "
            "e.g. clips:4:fashion-mnist[:5000]"
        )
    if inner.startswith("clips:"):
        raise DatasetError(f"{option} {spec}: clips are made of images, not of clips")
    images = open_source(inner, split=split, img_size=img_size, num_classes=num_classes, option=option)
    return ClipSource(images, frames)
