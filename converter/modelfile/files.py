"""Files on disk: written atomically (complete or not at all), and hashed in constant memory.

An `AtomicFile` writes into an anonymous file (Linux `O_TMPFILE`) in the destination folder that gets a name only
once it is complete and fsynced, so a write that fails, is interrupted or is killed with SIGKILL leaves neither a
partial file nor a temp file behind. Where `O_TMPFILE` is unavailable a hidden temp file in the same folder is used
and removed on any exception (SIGKILL could then leave it). `atomic_files` does the same for several files at once.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import os
import secrets
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

from tmconvert.converter.modelfile.errors import OutputError

HASH_CHUNK = 1 << 20
WRITE_BUFFER = 1 << 20
_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400


def check_writable(paths: list[Path], *, force: bool) -> None:
    """Fail early, before any work: the (first path's) folder must exist and be writable; existing files need
    --force."""
    first = paths[0]
    folder = first.parent
    if not folder.exists():
        raise OutputError(f"{first}: folder {folder} does not exist")
    if not folder.is_dir():
        raise OutputError(f"{first}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{first}: folder {folder} is not writable")
    for path in paths:
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


def _libc_linkat() -> Callable[..., int] | None:
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name, use_errno=True)
    except OSError:
        return None
    return getattr(libc, "linkat", None)


class AtomicFile:
    """A file that appears at `path` complete or not at all; `with AtomicFile(p, overwrite=True) as f: f.write(...)`.

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

    def __enter__(self) -> IO[bytes]:
        return self.file

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        """Commit when the block succeeded; discard on any exception (Ctrl-C included)."""
        if exc_type is None:
            self.commit()
        if not self.committed:
            self.discard()

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
