"""Data sources, the teacher's preprocessing, augmentation determinism and resumable, rank-split loaders."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests._distill_factory import write_image_folder
from tmconvert.converter.data.errors import DatasetError
from tmconvert.converter.data.loaders import EpochSampler, ImageDataset, train_batches
from tmconvert.converter.data.preprocess import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    InputSpec,
    Preprocess,
    grey_batch_to_input,
    random_resized_box,
)
from tmconvert.converter.data.sources import open_source

SPEC16 = InputSpec.for_model((16, 16), 3)


def test_image_folder_labelled_flat_and_bad_layouts(tmp_path):
    labelled = write_image_folder(tmp_path / "lab", {"zebra": 2, "ant": 3})
    source = open_source(str(labelled))
    assert source.classes == ("ant", "zebra") and len(source) == 5
    assert [source.label(i) for i in range(5)] == [0, 0, 0, 1, 1]
    flat = write_image_folder(tmp_path / "flat", {"": 3})
    source = open_source(str(flat))
    assert source.classes is None and source.label(0) == -1 and source.image(0).size == (16, 16)
    mixed = write_image_folder(tmp_path / "mixed", {"": 1, "a": 1})
    with pytest.raises(DatasetError, match="mixes class subfolders"):
        open_source(str(mixed))
    (tmp_path / "empty" / "a").mkdir(parents=True)
    with pytest.raises(DatasetError, match="no images"):
        open_source(str(tmp_path / "empty"))
    with pytest.raises(DatasetError, match="no such data folder"):
        open_source(str(tmp_path / "missing"))
    with pytest.raises(DatasetError, match="not a folder"):
        open_source(str(labelled / "ant" / "0.png"))


def test_unreadable_image_fails_with_its_file_name(tmp_path):
    root = write_image_folder(tmp_path / "d", {"a": 2})
    (root / "a" / "broken.png").write_bytes(b"not a png at all")
    source = open_source(str(root))
    broken = source.files.index(root / "a" / "broken.png")
    with pytest.raises(DatasetError, match=r"broken\.png: cannot read image"):
        source.image(broken)
    dataset = ImageDataset(source, Preprocess(SPEC16, train=True), seed=0)
    for workers in (0, 1):  # from a worker process too, as one line (not the worker's traceback)
        with pytest.raises(DatasetError, match=r"^\S+broken\.png: cannot read image \([^\n]*\)$"):
            for _ in zip(range(3), train_batches(dataset, batch_per_rank=3, workers=workers), strict=False):
                pass


def test_input_spec_from_metadata_and_for_grey_models():
    assert SPEC16.mean == IMAGENET_MEAN and SPEC16.std == IMAGENET_STD
    meta = {"input": {"mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}}
    assert InputSpec.for_model((28, 28), 3, meta).mean == (0.5, 0.5, 0.5)
    grey = InputSpec.for_model((28, 28), 1)
    assert grey.channels == 1 and grey.mean == pytest.approx((sum(IMAGENET_MEAN) / 3,))


def _write_idx(path: Path, array: np.ndarray) -> None:
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
    path.write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))


def test_fashion_mnist_adapter_matches_the_embedded_teachers_preprocessing(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (6, 28, 28), dtype=np.uint8), np.arange(6) % 10
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    _write_idx(tmp_path / "train-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "train-labels-idx1-ubyte.gz", labels)
    source = open_source(f"fashion-mnist:{tmp_path}", split="test")
    assert len(source) == 6 and source.label(4) == 4 and source.classes[0] == "T-shirt/top"
    dataset = ImageDataset(source, Preprocess(InputSpec.for_model((28, 28), 3), train=False))
    ours = torch.stack([dataset[i][0] for i in range(6)])
    torch.testing.assert_close(ours, grey_batch_to_input(torch.from_numpy(images)))


def test_pad_crop_augmentation_is_a_function_of_seed_epoch_and_index():
    source = open_source("synthetic:4", img_size=(16, 16), num_classes=10)
    dataset = ImageDataset(source, Preprocess(SPEC16, train=True, pad=0.25), seed=3)
    a, b, c = dataset[(1, 0)][0], dataset[(1, 0)][0], dataset[(1, 1)][0]
    assert a.shape == (3, 16, 16) and torch.equal(a, b) and not torch.equal(a, c)
    assert dataset[(1, 0)][1] == source.label(1)
    # pad-and-crop brings in zero (black) borders somewhere over a few draws: normalised black is -mean/std
    black = torch.tensor([-m / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    found = any(
        torch.allclose(dataset[(0, epoch)][0][:, :, col], black[:, None].expand(3, 16), atol=1e-5)
        for epoch in range(8)
        for col in (0, 15)
    ) or any(
        torch.allclose(dataset[(0, epoch)][0][:, row, :], black[:, None].expand(3, 16), atol=1e-5)
        for epoch in range(8)
        for row in (0, 15)
    )
    assert found


def test_resized_crop_and_eval_centre_crop_sizes():
    rng = np.random.default_rng(0)
    for _ in range(200):
        x0, y0, x1, y1 = random_resized_box((80, 60), (0.08, 1.0), (3 / 4, 4 / 3), rng)
        assert 0 <= x0 < x1 <= 80 and 0 <= y0 < y1 <= 60
    spec = InputSpec.for_model((64, 64), 3)
    img = Image.fromarray(np.random.default_rng(1).integers(0, 256, (50, 90, 3), dtype=np.uint8))
    train = Preprocess(spec, train=True)
    assert train.mode == "resized_crop" and train(img, rng).shape == (3, 64, 64)
    evaluation = Preprocess(spec, train=False)
    assert evaluation.eval_crop == 0.875 and evaluation(img).shape == (3, 64, 64)
    small = Preprocess(SPEC16, train=False)
    exact = Image.fromarray(np.full((16, 16, 3), 255, dtype=np.uint8))
    expected = torch.tensor([(1 - m) / s for m, s in zip(IMAGENET_MEAN, IMAGENET_STD, strict=True)])
    torch.testing.assert_close(small(exact), expected[:, None, None].expand(3, 16, 16))


def test_synthetic_data_is_deterministic():
    a = open_source("synthetic:5", img_size=(16, 16), num_classes=3)
    b = open_source("synthetic:5", img_size=(16, 16), num_classes=3)
    assert np.array_equal(np.array(a.image(2)), np.array(b.image(2)))
    assert not np.array_equal(np.array(a.image(2)), np.array(a.image(3)))
    assert {a.label(i) for i in range(5)} <= {0, 1, 2}
    for bad in ("synthetic:0", "synthetic:x", ""):
        with pytest.raises(DatasetError):
            open_source(bad)
    with pytest.raises(DatasetError, match="--split"):
        open_source("synthetic:4", split="val")


def test_two_ranks_see_the_global_batches_of_one_process():
    dataset = list(range(10))
    single = list(EpochSampler(dataset, world=1, rank=0, seed=5))
    ranks = [list(EpochSampler(dataset, world=2, rank=r, seed=5)) for r in range(2)]
    batch = 4  # global; 2 per rank
    for step in range(2):
        together = ranks[0][2 * step : 2 * step + 2] + ranks[1][2 * step : 2 * step + 2]
        assert sorted(together) == sorted(single[batch * step : batch * step + batch])
    resumed = EpochSampler(dataset, world=1, rank=0, seed=5)
    resumed.set_position(0, 4)
    assert list(resumed) == single[4:]
    resumed.set_position(1, 0)
    assert [i for i, _ in resumed] != [i for i, _ in single] and {e for _, e in resumed} == {1}


def test_train_batches_resume_mid_epoch_and_across_epochs():
    source = open_source("synthetic:10", img_size=(16, 16), num_classes=10)
    dataset = ImageDataset(source, Preprocess(SPEC16, train=True), seed=1)
    fresh = [batch for _, batch in zip(range(7), train_batches(dataset, batch_per_rank=3, seed=1), strict=False)]
    for start in (2, 4):  # 3 batches per epoch: step 2 is mid-epoch 0, step 4 is in epoch 1
        resumed = next(train_batches(dataset, batch_per_rank=3, seed=1, start_step=start))
        assert torch.equal(resumed[0], fresh[start][0]) and torch.equal(resumed[1], fresh[start][1])
    with pytest.raises(DatasetError, match="do not make one batch"):
        next(train_batches(dataset, batch_per_rank=11))


def test_a_slice_of_any_source_is_a_source(tmp_path):
    whole = open_source("synthetic:10", img_size=(8, 8), num_classes=3)
    head, tail = (
        open_source("synthetic:10[:-3]", img_size=(8, 8), num_classes=3),
        open_source("synthetic:10[-3:]", img_size=(8, 8), num_classes=3),
    )
    assert (len(head), len(tail)) == (7, 3)
    assert [tail.label(i) for i in range(3)] == [whole.label(i) for i in range(7, 10)]
    assert np.array_equal(np.asarray(tail.image(0)), np.asarray(whole.image(7)))
    assert tail.identity()["slice"] == [7, 10] and tail.classes == whole.classes
    with pytest.raises(DatasetError, match=r"synthetic:10\[5:5\]: the slice selects no images"):
        open_source("synthetic:10[5:5]", img_size=(8, 8), num_classes=3)
