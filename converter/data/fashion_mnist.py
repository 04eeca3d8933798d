"""Fashion-MNIST without a download: its IDX files as Debian's `dataset-fashion-mnist` installs them.

The IDX format: a big-endian header (two zero bytes, a type code, the number of dimensions, then one uint32 per
dimension) followed by the raw values. Fashion-MNIST uses type 0x08 (uint8) with 3 dims for images and 1 for labels.
"""

from __future__ import annotations

import functools
import gzip
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from tmconvert.converter.data.errors import DatasetError

FASHION_MNIST_DIRS = (Path("/usr/share/datasets/fashion-mnist"),)
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
_IDX_DTYPES = {
    0x08: np.uint8,
    0x09: np.int8,
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}


def read_idx(path: str | Path) -> np.ndarray:
    """Read one IDX file (optionally gzip-compressed) into a numpy array of its declared shape."""
    path = Path(path)
    try:
        raw = gzip.decompress(path.read_bytes()) if path.suffix == ".gz" else path.read_bytes()
    except FileNotFoundError:
        raise DatasetError(f"{path}: no such file (expected an IDX file)") from None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DatasetError(f"{path}: cannot read ({exc})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise DatasetError(f"{path}: not an IDX file (bad magic {raw[:4].hex()})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DatasetError(f"{path}: truncated IDX header")
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[raw[2]])
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) != expected:
        raise DatasetError(f"{path}: {len(raw)} bytes, expected {expected} for shape {shape}")
    return np.frombuffer(raw, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


@dataclass(frozen=True)
class ImageArrays:
    """A whole split in memory: uint8 images (N, H, W) and int64 labels (N,)."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.labels)


def fashion_mnist_root(root: str | Path | None = None) -> Path:
    """The folder holding the four Fashion-MNIST files: `root` when given (and only it), else
    $TMCONVERT_FASHION_MNIST, else Debian's location."""
    if root:
        candidates = [Path(root)]
    else:
        env = os.environ.get("TMCONVERT_FASHION_MNIST")
        candidates = [Path(env)] if env else list(FASHION_MNIST_DIRS)
    for c in candidates:
        if (c / "train-images-idx3-ubyte.gz").exists() or (c / "train-images-idx3-ubyte").exists():
            return c
    where = ", ".join(str(c) for c in candidates)
    raise DatasetError(
        f"Fashion-MNIST not found in {where} (install Debian's dataset-fashion-mnist, or pass its folder)"
    )


def load_fashion_mnist(split: str, root: str | Path | None = None) -> ImageArrays:
    """Load the 'train' (60,000) or 'test' (10,000) split.

    Cached per folder and split: a conversion validates `--calib`, scores channels and verifies on the same images
    without decompressing them three times. The arrays are shared, so callers must not modify them.
    """
    if split not in ("train", "test"):
        raise DatasetError(f"Fashion-MNIST split must be 'train' or 'test', got {split!r}")
    return _load_split(fashion_mnist_root(root).resolve(), "train" if split == "train" else "t10k")


@functools.lru_cache(maxsize=2)
def _load_split(base: Path, stem: str) -> ImageArrays:

    def find(name: str) -> Path:
        gz = base / f"{name}.gz"
        return gz if gz.exists() else base / name

    images = read_idx(find(f"{stem}-images-idx3-ubyte"))
    labels = read_idx(find(f"{stem}-labels-idx1-ubyte")).astype(np.int64)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise DatasetError(f"{base}: {stem} images {images.shape} and labels {labels.shape} do not match")
    return ImageArrays(images=images, labels=labels, classes=FASHION_MNIST_CLASSES)
