"""Safetensors written as a stream: the header is known from the plan before any tensor exists, so each tensor is
written the moment it is made and dropped (a conversion never holds the whole output)."""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import IO, Any

import torch

from tmconvert.converter import dtypes


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # float32 | float16 | bfloat16

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * dtypes.storable(self.dtype).itemsize


def safetensors_header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    """The length-prefixed JSON header for tensors written back to back in `specs` order (8-byte padded)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": dtypes.storable(spec.dtype).safetensors,
            "shape": list(spec.shape),
            "data_offsets": [offset, offset + spec.nbytes],
        }
        offset += spec.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=True).encode()
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw


def write_safetensors_stream(
    handle: IO[bytes],
    specs: list[TensorSpec],
    tensors: Iterable[tuple[str, torch.Tensor]],
    metadata: dict[str, str],
    *,
    on_tensor: Callable[[str, int], None] | None = None,
) -> int:
    """Write a safetensors file from an iterator yielding tensors in `specs` order; returns bytes written."""
    head = safetensors_header(specs, metadata)
    handle.write(head)
    written = len(head)
    expected = iter(specs)
    for name, tensor in tensors:
        spec = next(expected, None)
        if spec is None or spec.name != name:
            raise RuntimeError(f"tensor stream out of order: got {name}, expected {spec.name if spec else 'end'}")
        want = (tuple(spec.shape), dtypes.storable(spec.dtype).torch)
        if (tuple(tensor.shape), tensor.dtype) != want:
            raise RuntimeError(f"{name}: produced {tuple(tensor.shape)} {tensor.dtype}, planned {want}")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        handle.write(memoryview(data))
        written += data.nbytes
        if on_tensor is not None:
            on_tensor(name, data.nbytes)
    if next(expected, None) is not None:
        raise RuntimeError("tensor stream ended early")
    return written
