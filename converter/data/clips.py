"""Clips made from images, for video students: `clips:T:<image spec>` (e.g. `clips:4:fashion-mnist[:5000]`).

Clip i shows image i of the inner source (`open_source` reads the spec after the second colon, slice included)
moving along a straight path: a start and an end offset, each drawn uniformly within ±`MAX_SHIFT` of the side per
axis, the T frames at evenly spaced points from one to the other, rounded to whole pixels; what leaves the frame is
cut off and what enters is zero (black), as pad-and-crop augmentation fills it. The path is drawn from a generator
seeded by the index alone, so clip i is the same on every call, epoch and machine (it is the data, not an
augmentation); its label is image i's. One frame (`clips:1:...`) is the image at a random offset.

A `ClipSource` hands out lists of PIL frames (`clip`), not images: `ImageDataset` turns them into (C, T, H, W)
tensors with one augmentation draw for the whole clip (`Preprocess.clip`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

if TYPE_CHECKING:
    from tmconvert.converter.data.sources import ImageSource

MAX_SHIFT = 0.15  # largest offset of a frame from the image's place, as a fraction of the side, per axis
MAX_FRAMES = 64  # frames per clip at most: more would be one sample larger than any batch a student trains on


class ClipSource:
    """Clips of `frames` frames, each an image of `inner` translated along a seeded straight path."""

    def __init__(self, inner: ImageSource, frames: int, max_shift: float = MAX_SHIFT):
        self.inner, self.frames, self.max_shift = inner, frames, max_shift
        self.classes = inner.classes

    def __len__(self) -> int:
        return len(self.inner)

    def offsets(self, index: int, size: tuple[int, int]) -> list[tuple[int, int]]:
        """(dx, dy) in pixels of each frame for an image of `size` (width, height): content moves right / down."""
        rng = np.random.default_rng([0, index])
        start, end = rng.uniform(-self.max_shift, self.max_shift, size=(2, 2))
        steps = np.linspace(0.0, 1.0, self.frames) if self.frames > 1 else np.zeros(1)
        points = start[None] + (end - start)[None] * steps[:, None]  # (T, 2) as fractions of (width, height)
        return [(round(float(fx) * size[0]), round(float(fy) * size[1])) for fx, fy in points]

    def clip(self, index: int) -> list[Image.Image]:
        image = self.inner.image(index)
        width, height = image.size
        # crop outside the image fills zeros: the frame is the image moved by (dx, dy) on a black background
        return [image.crop((-dx, -dy, width - dx, height - dy)) for dx, dy in self.offsets(index, image.size)]

    def label(self, index: int) -> int:
        return self.inner.label(index)

    def identity(self) -> dict[str, Any]:
        return {"kind": "clips", "frames": self.frames, "max_shift": self.max_shift, "images": self.inner.identity()}
