"""Writing converted models: atomic, streamed, reproducible; and reading them back.

The `.safetensors` file is written tensor by tensor straight from the engine (the header is known from the plan
before any tensor exists), into an anonymous file (Linux `O_TMPFILE`) in the destination folder that gets a name
only once it is complete and fsynced. A conversion that fails, is interrupted, or is killed with SIGKILL therefore
leaves neither a partial output nor a temp file behind. Where `O_TMPFILE` is unavailable a hidden temp file in the
same folder is used and removed on any exception (SIGKILL could then leave it).

Metadata in the safetensors header records the tool version, the mapping (name, sha256), the source (file name,
sha256, format, config), the options, the layer plan, the chosen index sets and the target config, so
`load_converted` rebuilds the model without flags. Nothing time- or host-dependent goes in: the same inputs and
seed give a byte-identical file. A sidecar `<stem>.config.json` carries the same information for people and other
tools; `--format vim` adds `<stem>.pth` holding `{'model': state_dict}` for the upstream Vim code.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import io
import json
import os
import re
import secrets
import struct
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch
from safetensors import safe_open

from tmconvert.converter.errors import OutputError
from tmconvert.models.vim import VimConfig, state_dict_shapes

SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
HASH_CHUNK = 1 << 20
WRITE_BUFFER = 1 << 20
_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400


@dataclass(frozen=True)
class OutputPaths:
    """The files one conversion writes: the weights, the sidecar config, and the upstream-Vim `.pth` if asked."""

    weights: Path
    sidecar: Path
    pth: Path | None

    @classmethod
    def for_weights(cls, weights: Path, *, vim_pth: bool) -> OutputPaths:
        stem = weights.name.removesuffix(".safetensors")
        pth = weights.with_name(f"{stem}.pth") if vim_pth else None
        return cls(weights, weights.with_name(f"{stem}.config.json"), pth)

    def all(self) -> list[Path]:
        return [p for p in (self.weights, self.sidecar, self.pth) if p is not None]


def check_output_paths(paths: OutputPaths, *, force: bool) -> None:
    """Fail early, before any work: the folder must exist and be writable; existing files need --force."""
    folder = paths.weights.parent
    if not folder.exists():
        raise OutputError(f"{paths.weights}: folder {folder} does not exist")
    if not folder.is_dir():
        raise OutputError(f"{paths.weights}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{paths.weights}: folder {folder} is not writable")
    for path in paths.all():
        if path.is_dir():
            raise OutputError(f"{path}: is a folder, expected a file path")
        if path.exists() and not force:
            raise OutputError(f"{path}: exists; pass --force to overwrite")


def sha256_file(path: Path, *, chunk: int = HASH_CHUNK) -> str:
    """Streamed sha256 (constant memory)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while block := handle.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def sha256_files(paths: Iterable[Path]) -> str:
    """sha256 of one file, or of `name sha256` lines for a sharded checkpoint."""
    paths = list(paths)
    if len(paths) == 1:
        return sha256_file(paths[0])
    lines = "".join(f"{p.name} {sha256_file(p)}\n" for p in paths)
    return hashlib.sha256(lines.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Atomic files


def _libc_linkat() -> Callable[..., int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    return getattr(libc, "linkat", None)


class AtomicFile:
    """A file that appears at `path` complete or not at all.

    Data goes to an unnamed `O_TMPFILE` inode in the target folder, which `commit` links into place (via a hidden
    name and `os.replace` when overwriting); an uncommitted inode vanishes with its descriptor, even on SIGKILL.
    """

    def __init__(self, path: Path, *, overwrite: bool):
        self.path = path
        self.overwrite = overwrite
        self._named_temp: Path | None = None
        folder = str(path.parent)
        linkat = _libc_linkat() if hasattr(os, "O_TMPFILE") else None
        fd = -1
        if linkat is not None:
            try:
                fd = os.open(folder, os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644)
            except OSError:
                fd = -1
        if fd < 0:
            self._named_temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
            fd = os.open(self._named_temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self._linkat = linkat
        self.file: IO[bytes] = os.fdopen(fd, "wb", buffering=WRITE_BUFFER)
        self.committed = False

    def commit(self) -> None:
        self.file.flush()
        os.fsync(self.file.fileno())
        if self._named_temp is not None:
            self._rename_into_place(self._named_temp)
        else:
            temp = self.path.with_name(f".{self.path.name}.{secrets.token_hex(4)}.tmp")
            target = temp if self.overwrite else self.path
            proc_path = f"/proc/self/fd/{self.file.fileno()}".encode()
            if self._linkat(_AT_FDCWD, proc_path, _AT_FDCWD, os.fsencode(target), _AT_SYMLINK_FOLLOW) != 0:
                errno = ctypes.get_errno()
                if errno == 17:  # EEXIST
                    raise OutputError(f"{self.path}: exists; pass --force to overwrite")
                raise OutputError(f"{self.path}: cannot create ({os.strerror(errno)})")
            if self.overwrite:
                self._rename_into_place(temp)
        self.file.close()
        _fsync_dir(self.path.parent)
        self.committed = True

    def _rename_into_place(self, temp: Path) -> None:
        if not self.overwrite and self.path.exists():
            raise OutputError(f"{self.path}: exists; pass --force to overwrite")
        try:
            os.replace(temp, self.path)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            raise OutputError(f"{self.path}: cannot write ({exc.strerror})") from None
        self._named_temp = None

    def discard(self) -> None:
        if not self.file.closed:
            self.file.close()
        if self._named_temp is not None:
            self._named_temp.unlink(missing_ok=True)
            self._named_temp = None


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


@contextmanager
def atomic_files(paths: Iterable[Path], *, overwrite: bool) -> Iterator[dict[Path, AtomicFile]]:
    """Open several atomic files; when the block ends without error all are committed, the first path last (so the
    main file appears only after its companions), none otherwise."""
    opened: dict[Path, AtomicFile] = {}
    try:
        for path in paths:
            try:
                opened[path] = AtomicFile(path, overwrite=overwrite)
            except OSError as exc:
                raise OutputError(f"{path}: cannot write in {path.parent} ({exc.strerror})") from None
        yield opened
        for handle in reversed(opened.values()):
            handle.commit()
    finally:
        for handle in opened.values():
            if not handle.committed:
                handle.discard()


# ---------------------------------------------------------------------------------------------------------------
# safetensors, streamed


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # float32 | float16 | bfloat16

    @property
    def nbytes(self) -> int:
        n = 1
        for s in self.shape:
            n *= s
        return n * _TORCH_DTYPES[self.dtype].itemsize


def safetensors_header(specs: list[TensorSpec], metadata: dict[str, str]) -> bytes:
    """The length-prefixed JSON header for tensors written back to back in `specs` order (8-byte padded)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for spec in specs:
        header[spec.name] = {
            "dtype": SAFETENSORS_DTYPES[spec.dtype],
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
        want = (tuple(spec.shape), _TORCH_DTYPES[spec.dtype])
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


def write_json(handle: IO[bytes], payload: dict[str, Any]) -> None:
    """Indented, sorted JSON with lists of numbers kept on one line (index sets stay readable)."""
    text = json.dumps(payload, indent=2, sort_keys=True)
    text = re.sub(r"\[\s*(-?\d+(?:\s*,\s*-?\d+)*)\s*\]", lambda m: "[" + re.sub(r"\s+", " ", m.group(1)) + "]", text)
    handle.write((text + "\n").encode())


def write_vim_pth(handle: IO[bytes], weights: Path, cfg: VimConfig) -> None:
    """`{'model': state_dict}` in the target model's key order: what upstream Vim loads with strict=True."""
    _, state, _ = load_converted(weights, cfg=cfg)
    buffer = io.BytesIO()
    torch.save({"model": state}, buffer)
    handle.write(buffer.getbuffer())


# ---------------------------------------------------------------------------------------------------------------
# Reading back


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The safetensors metadata of a converted file, JSON values decoded."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as handle:
            raw = handle.metadata() or {}
    except Exception as exc:  # safetensors raises its own error types
        raise OutputError(f"{path}: not a readable safetensors file ({exc})") from None
    out: dict[str, Any] = {}
    for key, value in raw.items():
        try:
            out[key] = json.loads(value)
        except json.JSONDecodeError:
            out[key] = value
    return out


def load_converted(
    path: str | Path, *, cfg: VimConfig | None = None
) -> tuple[VimConfig, dict[str, torch.Tensor], dict[str, Any]]:
    """(config, state_dict in model order, metadata) of a file `tmconvert` wrote; the config comes from the file."""
    path = Path(path)
    metadata = read_metadata(path)
    if cfg is None:
        if "target_config" not in metadata:
            raise OutputError(f"{path}: no tmconvert metadata (target_config); was it written by tmconvert?")
        cfg = VimConfig(**metadata["target_config"])
    order = list(state_dict_shapes(cfg))
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        if keys != set(order):
            missing, extra = sorted(set(order) - keys), sorted(keys - set(order))
            raise OutputError(f"{path}: keys do not match the target config (missing {missing[:3]}, extra {extra[:3]})")
        state = {name: handle.get_tensor(name) for name in order}
    return cfg, state, metadata
