"""The IDX reader: exact round trip of constructed files, and one clear error per kind of damage."""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import pytest

from tmconvert.converter.data.errors import DatasetError
from tmconvert.converter.data.fashion_mnist import load_fashion_mnist, read_idx


def _idx_bytes(array: np.ndarray) -> bytes:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    return header + array.astype(np.uint8).tobytes()


def test_round_trip_plain_and_gzip(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    (tmp_path / "a-idx3-ubyte").write_bytes(_idx_bytes(images))
    (tmp_path / "a-idx3-ubyte.gz").write_bytes(gzip.compress(_idx_bytes(images)))
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte"), images)
    assert np.array_equal(read_idx(tmp_path / "a-idx3-ubyte.gz"), images)


def test_damaged_files_are_named(tmp_path: Path) -> None:
    good = _idx_bytes(np.zeros((2, 2, 2), dtype=np.uint8))
    cases = {
        "missing": (None, "no such file"),
        "magic": (b"\x01\x02" + good[2:], "not an IDX file"),
        "short": (good[:-1], "expected 24 for shape"),
        "long": (good + b"\x00", "expected 24 for shape"),
        "header": (good[:6], "truncated IDX header"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        if data is not None:
            path.write_bytes(data)
        with pytest.raises(DatasetError, match=message) as info:
            read_idx(path)
        assert str(path) in str(info.value)
    (tmp_path / "bad.gz").write_bytes(b"not gzip")
    with pytest.raises(DatasetError, match=r"bad\.gz: cannot read"):
        read_idx(tmp_path / "bad.gz")


def test_split_and_location_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="split must be 'train' or 'test'"):
        load_fashion_mnist("val", tmp_path)
    with pytest.raises(DatasetError, match="Fashion-MNIST not found"):
        load_fashion_mnist("test", tmp_path / "nowhere")
