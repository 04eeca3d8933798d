"""Finding the state dict inside a loaded torch checkpoint, and the wrapper prefixes around its names.

Training scripts wrap the weights: facebookresearch DeiT saves `{'model', 'model_ema', 'optimizer', 'args', ...}`,
timm `{'state_dict', 'state_dict_ema', ...}`. timm's own loader picks EMA weights first when they exist; we never do:
EMA weights are read only when asked for (`ema=True`), and asking for them when there are none is an error.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import torch

from tmconvert.converter.checkpoint.errors import CheckpointError

MAIN_ENTRIES = ("state_dict", "model", "module")  # non-EMA weights, in the order timm looks for them
EMA_ENTRIES = ("state_dict_ema", "model_ema")
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DistributedDataParallel / DataParallel, torch.compile


def select_state_dict(obj: Any, *, ema: bool, path: Path) -> tuple[str, dict[str, torch.Tensor], tuple[str, ...]]:
    """Return (container name, name → tensor, top-level entries of the checkpoint) for the weights to read."""
    if not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: expected a state dict (a mapping of names to tensors), found a {type(obj).__name__}"
        )
    if not obj:
        raise CheckpointError(f"{path}: empty state dict (no tensors)")
    if _has_tensors(obj):
        if ema:
            raise CheckpointError(f"{path}: no EMA weights: the file is a plain state dict (drop --ema / ema=True)")
        return "flat", _tensors(obj), ()

    entries = tuple(str(key) for key in obj)
    listed = ", ".join(repr(e) for e in entries[:12])
    for entry in EMA_ENTRIES if ema else MAIN_ENTRIES:
        inner = obj.get(entry)
        if isinstance(inner, Mapping):
            tensors = _tensors(inner)
            if not tensors:
                raise CheckpointError(f"{path}: entry '{entry}' holds no tensors (empty state dict)")
            return entry, tensors, entries
    if ema:
        raise CheckpointError(
            f"{path}: no EMA weights: looked for {' or '.join(repr(e) for e in EMA_ENTRIES)}, found entries {listed}"
        )
    present_ema = [e for e in EMA_ENTRIES if isinstance(obj.get(e), Mapping)]
    if present_ema:
        raise CheckpointError(
            f"{path}: the checkpoint holds only EMA weights ('{present_ema[0]}'); pass --ema (ema=True) to read them"
        )
    raise CheckpointError(
        f"{path}: no state dict found: expected a mapping of names to tensors or an entry "
        f"{', '.join(repr(e) for e in MAIN_ENTRIES)} holding one; found entries {listed}"
    )


def strip_wrapper_prefixes(names: Iterable[str], *, path: Path) -> dict[str, str]:
    """Map each name without `module.` / `_orig_mod.` prefixes (any order, repeated) to the name as stored."""
    stripped: dict[str, str] = {}
    for name in names:
        short = name
        while short.startswith(WRAPPER_PREFIXES):
            short = short.split(".", 1)[1]
        if short in stripped:
            raise CheckpointError(
                f"{path}: tensors '{stripped[short]}' and '{name}' have the same name once wrapper prefixes "
                f"({', '.join(WRAPPER_PREFIXES)}) are removed"
            )
        stripped[short] = name
    return stripped


def _has_tensors(mapping: Mapping[Any, Any]) -> bool:
    return any(isinstance(value, torch.Tensor) for value in mapping.values())


def _tensors(mapping: Mapping[Any, Any]) -> dict[str, torch.Tensor]:
    """The tensor entries; other values (counters, metadata) are not weights."""
    return {str(key): value for key, value in mapping.items() if isinstance(value, torch.Tensor)}
