"""File formats: which bytes hold the tensors, and lazy access to them by their stored name.

A `TensorStore` knows every tensor's shape and dtype without reading data (safetensors headers; memory-mapped torch
zip files) and reads one tensor on `get`. `open_weights` turns a user's path into a store: a `.safetensors` file, a
torch pickle (zip or legacy, any `.pt/.pth/.bin` name: the bytes decide, not the suffix), a sharded
`*.index.json`, or a Hugging Face model folder. Errors from safetensors and torch become `CheckpointError`s naming
the file (and the tensor).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import stat
import zipfile
from abc import ABC, abstractmethod
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open

from tmconvert.converter.checkpoint.containers import select_state_dict
from tmconvert.converter.checkpoint.errors import CheckpointError
from tmconvert.converter.checkpoint.safe_unpickle import load_torch_file, torch_reason
from tmconvert.converter.dtypes import from_safetensors

# Hugging Face model folders, in the order transformers prefers them.
HF_WEIGHT_FILES = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
CONFIG_FILE = "config.json"
_EXPECTED = "(expected a checkpoint file or a model folder)"


class TensorStore(ABC):
    """Tensors by stored name: metadata up front, data on demand."""

    files: tuple[Path, ...]

    @abstractmethod
    def keys(self) -> list[str]: ...

    @abstractmethod
    def shape(self, key: str) -> tuple[int, ...]: ...

    @abstractmethod
    def dtype(self, key: str) -> torch.dtype: ...

    @abstractmethod
    def get(self, key: str) -> torch.Tensor: ...

    @abstractmethod
    def close(self) -> None:
        """Release open files (after this, `get` may fail)."""


class _SafetensorsEntry(NamedTuple):
    handle: Any  # safetensors' safe_open object (no public type)
    file: Path
    shape: tuple[int, ...]
    dtype: torch.dtype


class SafetensorsStore(TensorStore):
    """One or several `.safetensors` files; `weight_map` (from a shard index) says which file holds which tensor."""

    def __init__(
        self, files: Sequence[Path], *, weight_map: Mapping[str, Path] | None = None, index: Path | None = None
    ):
        self.files = tuple(files)
        self._handles: list[Any] = []
        self._entries: dict[str, _SafetensorsEntry] = {}
        try:
            for file in self.files:
                handle = _safe_open(file)
                self._handles.append(handle)
                keys = handle.keys()  # a safe_open handle is not iterable itself
                for key in keys:
                    if key in self._entries:
                        raise CheckpointError(f"{file}: tensor '{key}' is also stored in {self._entries[key].file}")
                    self._entries[key] = _SafetensorsEntry(handle, file, *_safetensors_meta(handle, file, key))
            if weight_map is not None:
                for key, shard in weight_map.items():
                    found = self._entries.get(key)
                    if found is None or found.file != shard:
                        raise CheckpointError(
                            f"{index}: tensor '{key}' is listed in shard {shard.name}, which lacks it"
                        )
        except BaseException:
            self.close()
            raise

    def keys(self) -> list[str]:
        return list(self._entries)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._entries[key].shape

    def dtype(self, key: str) -> torch.dtype:
        return self._entries[key].dtype

    def get(self, key: str) -> torch.Tensor:
        entry = self._entries[key]
        try:
            return entry.handle.get_tensor(key)
        except Exception as exc:
            raise CheckpointError(f"{entry.file}: cannot read tensor '{key}': {torch_reason(exc)}") from exc

    def close(self) -> None:
        for handle in self._handles:
            handle.__exit__(None, None, None)
        self._handles.clear()


class TorchStore(TensorStore):
    """Tensors unpickled from torch files; zip files are memory-mapped, so their data stays on disk until used."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], files: Sequence[Path]):
        self.files = tuple(files)
        self._tensors = dict(tensors)

    def keys(self) -> list[str]:
        return list(self._tensors)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self._tensors[key].shape)

    def dtype(self, key: str) -> torch.dtype:
        return self._tensors[key].dtype

    def get(self, key: str) -> torch.Tensor:
        return self._tensors[key].detach()

    def close(self) -> None:
        self._tensors.clear()


@dataclasses.dataclass(frozen=True)
class Weights:
    """What `open_weights` found: the store plus where it came from."""

    store: TensorStore
    format: str  # 'safetensors' | 'safetensors-sharded' | 'torch-zip' | 'torch-legacy' | 'torch-sharded' | 'hf-dir'
    weights_format: str  # the format of the weight files themselves (differs from `format` only for 'hf-dir')
    container: str  # 'flat' | 'model' | 'state_dict' | 'module' | 'model_ema' | 'state_dict_ema'
    container_entries: tuple[str, ...]  # top-level entries of a wrapped torch checkpoint, () when flat
    config_file: Path | None  # a config.json beside the weights, if any (read by detection)


def open_weights(path: Path, *, ema: bool) -> Weights:
    """Open whatever `path` names: a weights file, a shard index or a model folder."""
    if stat.S_ISDIR(_stat(path).st_mode):
        weights_file = next((path / name for name in HF_WEIGHT_FILES if os.path.lexists(path / name)), None)
        if weights_file is None:
            raise CheckpointError(f"{path}: folder holds no weights: expected one of {', '.join(HF_WEIGHT_FILES)}")
        return dataclasses.replace(_open_file(weights_file, ema=ema), format="hf-dir")
    return _open_file(path, ema=ema)


def _stat(path: Path) -> os.stat_result:
    """`path`'s status through links; a missing file, a loop of links and a denied look-up each say so."""
    try:
        return path.stat()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: no such file or directory {_EXPECTED}") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointError(f"{path}: symbolic link loop {_EXPECTED}") from None
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from None


def _require_regular(path: Path) -> None:
    """Only regular files are read: a FIFO or a device would block or never end."""
    mode = _stat(path).st_mode
    if not stat.S_ISREG(mode):
        kind = "a folder" if stat.S_ISDIR(mode) else "a FIFO" if stat.S_ISFIFO(mode) else "a device or socket"
        raise CheckpointError(f"{path}: not a regular file ({kind}); expected a checkpoint file or a model folder")


def sniff_format(path: Path) -> str:
    """'safetensors', 'torch-zip', 'torch-legacy' or 'index', from the file's first bytes (index: its name)."""
    if path.name.endswith(".index.json"):
        return "index"
    try:
        with path.open("rb") as file:
            head = file.read(16)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    if not head:
        raise CheckpointError(f"{path}: empty file (expected safetensors or a torch checkpoint)")
    if head.startswith(b"PK\x03\x04"):
        return "torch-zip"
    header_size = int.from_bytes(head[:8], "little") if len(head) >= 8 else 0
    if head[8:9] == b"{" and header_size <= path.stat().st_size - 8:  # u64 header length, then a JSON header
        return "safetensors"
    if head[0] == 0x80 and len(head) > 1 and head[1] <= 5:  # pickle PROTO opcode: torch.save's legacy format
        return "torch-legacy"
    if path.suffix == ".safetensors":  # damaged header: let safetensors say what is wrong
        return "safetensors"
    raise CheckpointError(
        f"{path}: unrecognised file: expected safetensors, a torch zip archive or a legacy torch pickle"
    )


def _open_file(path: Path, *, ema: bool) -> Weights:
    _require_regular(path)
    kind = sniff_format(path)
    config = path.parent / CONFIG_FILE
    if config.exists() and not config.is_file():  # a folder or a FIFO there would be skipped or block the read
        raise CheckpointError(f"{config}: not a regular file (expected the model's config.json)")
    config_file = config if config.exists() else None
    if kind == "index":
        return _open_index(path, ema=ema, config_file=config_file)
    if kind == "safetensors":
        if ema:
            raise CheckpointError(f"{path}: no EMA weights: a safetensors file holds one flat state dict")
        return Weights(SafetensorsStore([path]), kind, kind, "flat", (), config_file)
    container, tensors, entries = select_state_dict(_load_torch(path, kind), ema=ema, path=path)
    return Weights(TorchStore(tensors, [path]), kind, kind, container, entries, config_file)


def _load_torch(path: Path, kind: str) -> Any:
    """Unpickle a torch file; zip archives are memory-mapped, after checking they are complete."""
    if kind == "torch-zip" and not zipfile.is_zipfile(path):  # torch's own message for this is an errno
        raise CheckpointError(f"{path}: truncated or corrupted torch zip archive (no zip central directory)")
    return load_torch_file(path, mmap=kind == "torch-zip")


def _open_index(index: Path, *, ema: bool, config_file: Path | None) -> Weights:
    weight_map = _read_weight_map(index)
    shard_kinds = {shard: sniff_format(shard) for shard in weight_map.values()}
    shards, kinds = list(shard_kinds), set(shard_kinds.values())
    if kinds == {"safetensors"}:
        if ema:
            raise CheckpointError(f"{index}: no EMA weights: safetensors shards hold one flat state dict")
        store = SafetensorsStore(shards, weight_map=weight_map, index=index)
        return Weights(store, "safetensors-sharded", "safetensors-sharded", "flat", (), config_file)
    if kinds <= {"torch-zip", "torch-legacy"}:
        tensors: dict[str, torch.Tensor] = {}
        for shard in shards:
            _, shard_tensors, _ = select_state_dict(_load_torch(shard, shard_kinds[shard]), ema=ema, path=shard)
            for key, tensor in shard_tensors.items():
                if key in tensors:
                    raise CheckpointError(f"{shard}: tensor '{key}' is stored in more than one shard")
                tensors[key] = tensor
        for key, shard in weight_map.items():
            if key not in tensors:
                raise CheckpointError(f"{index}: tensor '{key}' is listed in shard {shard.name}, which lacks it")
        return Weights(TorchStore(tensors, shards), "torch-sharded", "torch-sharded", "flat", (), config_file)
    raise CheckpointError(f"{index}: shards mix formats ({', '.join(sorted(kinds))}); expected one kind")


def _read_weight_map(index: Path) -> dict[str, Path]:
    """The index's tensor → shard file map, every shard checked to exist."""
    try:
        data = json.loads(index.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{index}: not a readable shard index (JSON): {exc}") from exc
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: shard index without a 'weight_map' of tensor names to shard files")
    resolved: dict[str, Path] = {}
    for key, shard_name in weight_map.items():
        if not isinstance(shard_name, str) or Path(shard_name).name != shard_name:
            raise CheckpointError(f"{index}: tensor '{key}' names shard {shard_name!r}; expected a file name")
        shard = index.parent / shard_name
        if not os.path.lexists(shard):
            raise CheckpointError(f"{index}: shard '{shard_name}' (holding tensor '{key}') does not exist")
        resolved[str(key)] = shard
    for shard in dict.fromkeys(resolved.values()):
        _require_regular(shard)
    return resolved


def _safe_open(file: Path) -> Any:
    try:
        return safe_open(str(file), framework="pt", device="cpu")
    except Exception as exc:
        raise CheckpointError(f"{file}: corrupted or truncated safetensors file: {torch_reason(exc)}") from exc


def _safetensors_meta(handle: Any, file: Path, key: str) -> tuple[tuple[int, ...], torch.dtype]:
    view = handle.get_slice(key)
    code = view.get_dtype()
    dtype = from_safetensors(code)
    if dtype is None:
        raise CheckpointError(f"{file}: tensor '{key}' has dtype {code}, which torch cannot hold")
    return tuple(view.get_shape()), dtype.torch
