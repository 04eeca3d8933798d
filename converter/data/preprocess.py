"""What a model expects of an image (`InputSpec`: size, channels, normalisation) and the `Preprocess` that turns a
PIL image into it: the teacher's input size, grey copied to 3 channels for an RGB model, and the normalisation the
model's metadata records (ImageNet's otherwise). Training adds augmentation that suits the image size: pad-and-crop
plus flip for small images, random-resized-crop plus flip for large ones. A clip's frames share one augmentation
draw (`Preprocess.clip`), so augmentation never adds motion of its own.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from tmconvert.converter.data.errors import DatasetError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SMALL_IMAGE = 64  # sides below this count as small: pad-and-crop augmentation, no centre crop at evaluation
AUGMENT_MODES = ("auto", "pad_crop", "resized_crop", "none")


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
        return {
            "img_size": list(self.img_size),
            "channels": self.channels,
            "mean": list(self.mean),
            "std": list(self.std),
        }


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

    def clip(self, frames: Sequence[Image.Image], rng: np.random.Generator | None = None) -> torch.Tensor:
        """PIL frames → (C, T, H, W), every frame with the same crop and flip: each frame's draws come from a
        generator seeded by one draw of `rng`, so they repeat frame after frame."""
        if rng is None:
            return torch.stack([self(frame) for frame in frames], dim=1)
        seed = int(rng.integers(2**63))
        return torch.stack([self(frame, np.random.default_rng(seed)) for frame in frames], dim=1)

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
