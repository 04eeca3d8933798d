"""Clips made from images (`clips:T:<image spec>`): deterministic per index, the image moved along a path with zero
fill, the image's label, and one augmentation draw per clip."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tmconvert.converter.data.clips import MAX_SHIFT, ClipSource
from tmconvert.converter.data.errors import DatasetError
from tmconvert.converter.data.loaders import ImageDataset, eval_batches, train_batches
from tmconvert.converter.data.preprocess import InputSpec, Preprocess
from tmconvert.converter.data.sources import SyntheticSource, open_source

SIZE = (20, 20)


def _clips(frames: int = 4, count: int = 8) -> ClipSource:
    source = open_source(f"clips:{frames}:synthetic:{count}", img_size=SIZE, num_classes=10, clips=True)
    assert isinstance(source, ClipSource)
    return source


def _shifted(image: np.ndarray, dx: int, dy: int) -> np.ndarray:
    """The image moved right by dx and down by dy, zeros where nothing comes in."""
    out = np.zeros_like(image)
    h, w = image.shape[:2]
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    return out


def test_frames_are_the_image_moved_along_the_clips_path():
    source = _clips()
    images = SyntheticSource(8, SIZE, 10)
    limit = round(MAX_SHIFT * SIZE[0])
    moving = 0
    for index in range(len(source)):
        frames, offsets = source.clip(index), source.offsets(index, SIZE)
        assert len(frames) == 4 and all(frame.size == SIZE for frame in frames)
        original = np.asarray(images.image(index))
        for frame, (dx, dy) in zip(frames, offsets, strict=True):
            assert abs(dx) <= limit and abs(dy) <= limit
            assert np.array_equal(np.asarray(frame), _shifted(original, dx, dy))
        # a straight path: offsets change by (almost, after rounding) the same step between frames
        steps = np.diff(np.array(offsets), axis=0)
        assert np.abs(steps - steps.mean(axis=0)).max() <= 1
        moving += offsets[0] != offsets[-1]
        assert source.label(index) == images.label(index)
    assert moving >= 6  # most of 8 clips move (a zero-length path after rounding is possible, not likely)


def test_the_same_index_gives_the_same_clip_and_indices_differ():
    first, again = _clips(), _clips()
    for index in range(len(first)):
        a = [np.asarray(f) for f in first.clip(index)]
        b = [np.asarray(f) for f in again.clip(index)]
        assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    paths = {tuple(first.offsets(i, SIZE)) for i in range(len(first))}
    assert len(paths) == len(first)
    assert first.identity() == {
        "kind": "clips",
        "frames": 4,
        "max_shift": MAX_SHIFT,
        "images": {"kind": "synthetic", "images": 8, "img_size": [20, 20], "classes": 10},
    }


def test_loader_batches_are_clips_with_one_augmentation_per_clip():
    source = _clips(frames=3)
    spec = InputSpec.for_model((16, 16), 3)
    plain = ImageDataset(source, Preprocess(spec, train=False))
    clip, label = plain[2]
    assert clip.shape == (3, 3, 16, 16) and label == source.label(2)
    expected = torch.stack([Preprocess(spec, train=False)(frame) for frame in source.clip(2)], dim=1)
    assert torch.equal(clip, expected)
    images, labels = next(eval_batches(plain, batch_size=4))
    assert images.shape == (4, 3, 3, 16, 16) and labels.tolist() == [source.label(i) for i in range(4)]
    # training: pad-and-crop + flip drawn once per clip, so the frames keep exactly their relative motion
    augment = ImageDataset(source, Preprocess(spec, train=True, augment="none", hflip=True), seed=1)
    flips = 0
    for index in range(len(source)):
        clip, _ = augment[(index, 0)]
        frames = torch.stack([Preprocess(spec, train=False)(f) for f in source.clip(index)], dim=1)
        flipped = torch.equal(clip, frames.flip(-1))
        assert flipped or torch.equal(clip, frames)
        flips += flipped
    assert 0 < flips < len(source)
    batch, _ = next(train_batches(augment, batch_per_rank=4, seed=1))
    assert batch.shape == (4, 3, 3, 16, 16)


def test_clip_specs_are_checked():
    with pytest.raises(DatasetError, match="clips are read by video students only"):
        open_source("clips:4:synthetic:8")
    for spec in ("clips:0:synthetic:8", "clips:x:synthetic:8", "clips:4:", "clips:4", "clips:65:synthetic:8"):
        with pytest.raises(DatasetError, match="frame count from 1 to 64"):
            open_source(spec, clips=True)
    with pytest.raises(DatasetError, match="not of clips"):
        open_source("clips:2:clips:2:synthetic:8", clips=True)
    sliced = open_source("clips:2:synthetic:8[2:5]", img_size=SIZE, num_classes=10, clips=True)
    assert len(sliced) == 3 and sliced.label(0) == SyntheticSource(8, SIZE, 10).label(2)
