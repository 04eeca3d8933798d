"""The dtype table: every tensor dtype tmconvert reads or writes, by its name, aliases and safetensors code.

The one list of dtypes: the checkpoint readers map safetensors codes through it, the mapping schema takes its
storable names, `--dtype` its aliases, and the writer its codes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from tmconvert.converter.errors import ConfigError


@dataclass(frozen=True)
class DType:
    name: str  # torch's name without the prefix: float32
    torch: torch.dtype
    safetensors: str  # the code in a safetensors header: F32
    aliases: tuple[str, ...] = ()  # short names accepted by --dtype: fp32
    storable: bool = False  # a converted model may store its tensors in it

    @property
    def itemsize(self) -> int:
        return self.torch.itemsize


TABLE: tuple[DType, ...] = (
    DType("float32", torch.float32, "F32", ("fp32",), storable=True),
    DType("float16", torch.float16, "F16", ("fp16",), storable=True),
    DType("bfloat16", torch.bfloat16, "BF16", ("bf16",), storable=True),
    DType("float64", torch.float64, "F64"),
    DType("float8_e4m3fn", torch.float8_e4m3fn, "F8_E4M3"),
    DType("float8_e5m2", torch.float8_e5m2, "F8_E5M2"),
    DType("int64", torch.int64, "I64"),
    DType("int32", torch.int32, "I32"),
    DType("int16", torch.int16, "I16"),
    DType("int8", torch.int8, "I8"),
    DType("uint64", torch.uint64, "U64"),
    DType("uint32", torch.uint32, "U32"),
    DType("uint16", torch.uint16, "U16"),
    DType("uint8", torch.uint8, "U8"),
    DType("bool", torch.bool, "BOOL"),
)

STORABLE: tuple[str, ...] = tuple(d.name for d in TABLE if d.storable)  # float32, float16, bfloat16
_BY_NAME = {name: d for d in TABLE for name in (d.name, *d.aliases)}
_BY_CODE = {d.safetensors: d for d in TABLE}


def storable(name: str) -> DType:
    """A dtype converted models may be stored in, by name or alias (`bf16`); ConfigError otherwise."""
    found = _BY_NAME.get(name)
    if found is None or not found.storable:
        choices = ", ".join(d.aliases[0] for d in TABLE if d.storable)
        raise ConfigError(f"--dtype {name}: choose one of {choices}")
    return found


def from_safetensors(code: str) -> DType | None:
    """The dtype of a safetensors header code, or None for a code torch cannot hold."""
    return _BY_CODE.get(code)
