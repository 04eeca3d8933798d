"""Loading torch pickles (`.pt/.pth/.bin`) without ever executing code from them.

`torch.load(weights_only=True)` is the gate: its unpickler only rebuilds tensors, containers and plain values and
refuses every other global before anything runs. facebookresearch DeiT / timm training checkpoints also pickle their
command line as an `argparse.Namespace`; that one class is allow-listed (it only stores attributes), nothing else.
A refused global becomes an `UnsafePickleError` naming the file and the global.

Zip-format files are memory-mapped, so tensors are read from disk only when touched; the legacy (pre-1.6) format
cannot be mapped and is read whole.
"""

from __future__ import annotations

import _compat_pickle
import argparse
import io
import pickle
import pickletools
import re
import warnings
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from tmconvert.converter.checkpoint.errors import CheckpointError, UnsafePickleError

# The only classes a checkpoint may ask for beyond torch's own weights-only set, and why each is harmless:
# argparse.Namespace (DeiT/timm `args`) is an attribute bag; rebuilding it calls no user code.
ALLOWED_GLOBALS: tuple[type, ...] = (argparse.Namespace,)

# torch's weights-only unpickler names the refused global as "GLOBAL module.name" (wording varies by version).
_REFUSED_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")
_TORCH_BOILERPLATE = (
    "weights only load failed",
    "in pytorch 2.6",
    "please file an issue",
    "check the documentation",
    "(1)",
    "(2)",
    "weightsunpickler error",
)


def load_torch_file(path: Path, *, mmap: bool) -> Any:
    """Unpickle a torch checkpoint with the weights-only unpickler; `mmap` for zip files (lazy tensor data).

    torch warns about every pickle protocol but 2 (a plain `pickle.dumps`, or `torch.save(pickle_protocol=4)`); the
    failure that follows says what is wrong, so the warning is not shown."""
    try:
        with torch.serialization.safe_globals(list(ALLOWED_GLOBALS)), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
            return torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as exc:
        refused = _REFUSED_GLOBAL.search(str(exc))
        if refused:
            raise UnsafePickleError(
                f"{path}: refused to unpickle: it asks for the global '{_full_name(path, refused.group(1))}', "
                "which is not a tensor, "
                f"a plain value or an allow-listed class ({', '.join(_qualname(t) for t in ALLOWED_GLOBALS)}); "
                "nothing from the file was executed"
            ) from exc
        raise CheckpointError(_plain_pickle(path) or f"{path}: corrupted torch pickle: {torch_reason(exc)}") from exc
    except Exception as exc:  # any failure inside torch.load is a property of the file (truncated zip, bad magic, ...)
        raise CheckpointError(
            _plain_pickle(path) or f"{path}: cannot read torch checkpoint: {torch_reason(exc)}"
        ) from exc


def _plain_pickle(path: Path) -> str | None:
    """The error for a pickle that torch.save did not write, told by its opcodes (nothing is run): torch's legacy
    files open with a pickle of its magic number, zip files with no pickle at all. None for any other file."""
    try:
        with path.open("rb") as f:
            ops = pickletools.genops(f)
            opcode, protocol, _ = next(ops)
            first_value = next(arg for op, arg, _ in ops if op.name != "FRAME")
    except (OSError, ValueError, StopIteration):  # unreadable, or not a pickle after all
        return None
    if opcode.name != "PROTO" or first_value == torch.serialization.MAGIC_NUMBER:
        return None
    return f"{path}: not a torch checkpoint: a plain pickle (protocol {protocol}), not written by torch.save"


def torch_reason(exc: BaseException) -> str:
    """The informative part of a torch/safetensors error message, on one line."""
    lines = [line.strip() for line in str(exc).splitlines()]
    kept = [line for line in lines if line and not line.lower().startswith(_TORCH_BOILERPLATE)]
    reason = " ".join(kept) or type(exc).__name__
    # torch appends a long "this is likely a corrupted file" explanation to miniz errors: keep the first sentence.
    first_sentence = reason.split(". ")[0].rstrip(".")
    return first_sentence[:300]


def requested_globals(path: Path) -> Iterator[str]:
    """Every global the file's pickle(s) ask for, as Python 3 `module.name`, found by reading opcodes (no execution)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                member = next(name for name in archive.namelist() if name.endswith("data.pkl"))
                data = archive.read(member)
        else:
            data = path.read_bytes()
    except (OSError, StopIteration, zipfile.BadZipFile):
        return
    stream = io.BytesIO(data)
    while stream.tell() < len(data):  # legacy torch files are several pickles in a row, then raw tensor bytes
        strings: list[str] = []
        try:
            for opcode, arg, _ in pickletools.genops(stream):
                if isinstance(arg, str):
                    strings.append(arg)
                if opcode.name == "GLOBAL":
                    yield _python3_name(*str(arg).split(" ", 1))
                elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                    yield _python3_name(strings[-2], strings[-1])
        except Exception:  # raw tensor bytes after the last pickle, or a damaged stream
            return


def _full_name(path: Path, reported: str) -> str:
    """torch reports refused globals by their Python 2 pickle names ('exec', 'commands.Popen'): name the real one."""
    for name in requested_globals(path):
        module, _, attr = name.rpartition(".")
        py2_module = _compat_pickle.REVERSE_IMPORT_MAPPING.get(module, module)
        if reported in (name, attr, f"{py2_module}.{attr}"):
            return name
    return reported


def _python3_name(module: str, name: str) -> str:
    """Undo pickle protocol 2's Python 2 spellings (`__builtin__`, `commands`), as unpickling does."""
    module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
    return f"{_compat_pickle.IMPORT_MAPPING.get(module, module)}.{name}"


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"
