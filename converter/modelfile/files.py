"""Files on disk: written atomically (complete or not at all, several files as one), and hashed in constant memory.

An `AtomicFile` writes into an anonymous file (Linux `O_TMPFILE`) in the destination folder, so a write that fails,
is interrupted or is killed leaves nothing behind; where `O_TMPFILE` is unavailable a hidden
`.<name>.<random>.tmp` is used instead (SIGKILL could leave that one).

Committing moves complete, fsynced files into place, the main file last: its arrival is the commit point. Before
anything moves, a commit record `.<main>.commit` (held locked while in use) lists the files, their inodes and where
each replaced companion waits meanwhile. A commit cut short is undone by the process itself on an exception, Ctrl-C,
SIGTERM or SIGHUP, and after SIGKILL or a crash by the next check or commit of the same main file: the files of one
commit appear together or not at all, and nothing of an interrupted one stays in the way.

Only regular files (or symbolic links, which are replaced and never followed) are ever replaced; devices, FIFOs,
sockets and folders are refused, and so is a link to one.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fcntl
import hashlib
import json
import os
import secrets
import signal
import stat
import threading
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from tmconvert.converter.modelfile.errors import OutputError

HASH_CHUNK = 1 << 20
WRITE_BUFFER = 1 << 20
_AT_FDCWD = -100
_AT_SYMLINK_FOLLOW = 0x400
_KINDS = {
    stat.S_IFDIR: "a folder",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFIFO: "a FIFO",
    stat.S_IFSOCK: "a socket",
}


def check_writable(paths: list[Path], *, force: bool, inputs: Iterable[Path] = ()) -> None:
    """Fail early, before any work: the (first path's) folder must exist and be writable, no path may be one of
    `inputs` (by any name or link) nor anything but a regular file, and existing files need --force.

    A commit of the first path that was cut short is undone first, so its leftovers are not in the way."""
    first = paths[0]
    folder = first.parent
    if not folder.exists():
        raise OutputError(f"{first}: folder {folder} does not exist")
    if not folder.is_dir():
        raise OutputError(f"{first}: {folder} is not a folder")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise OutputError(f"{first}: folder {folder} is not writable")
    settle_interrupted(first)
    by_identity = {_identity(path): path for path in inputs}
    by_identity.pop(None, None)
    for path in paths:
        if path.is_dir():
            raise OutputError(f"{path}: is a folder, expected a file path")
        same = by_identity.get(_identity(path))
        if same is not None:
            raise OutputError(f"{path}: is the input file {same}; choose another output path")
        _check_replaceable(path, overwrite=force)


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


class _Recorded:
    """A file that keeps the first OS error of its writes: torch.save reports a failed write (a full disk) as a
    RuntimeError of its own, which names neither the file nor the reason."""

    def __init__(self, file: IO[bytes]):
        self._file = file
        self.error: OSError | None = None

    def write(self, data: Any) -> int:
        try:
            return self._file.write(data)
        except OSError as exc:
            self.error = self.error or exc
            raise

    def flush(self) -> None:
        try:
            self._file.flush()
        except OSError as exc:
            self.error = self.error or exc
            raise

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


class AtomicFile:
    """A file that appears at `path` complete or not at all; `with AtomicFile(p, overwrite=True) as f: f.write(...)`.

    Data goes to an unnamed `O_TMPFILE` inode in the target folder; committing names it `staged` (hidden) and moves
    it into place. An uncommitted inode vanishes with its descriptor, even on SIGKILL.
    """

    def __init__(self, path: Path, *, overwrite: bool):
        self.path = path
        self.overwrite = overwrite
        self.staged = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        self._linkat = _libc_linkat() if hasattr(os, "O_TMPFILE") else None
        fd = -1
        if self._linkat is not None:
            try:
                fd = os.open(str(path.parent), os.O_TMPFILE | os.O_WRONLY | os.O_CLOEXEC, 0o644)
            except OSError:
                fd = -1
        self._anonymous = fd >= 0
        if not self._anonymous:
            fd = os.open(self.staged, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        self.file: Any = _Recorded(os.fdopen(fd, "wb", buffering=WRITE_BUFFER))
        self.committed = False

    def write_error(self) -> OutputError | None:
        """The error to report when writing failed because the file system refused (full disk, size limit)."""
        error = self.file.error
        return None if error is None else OutputError(f"{self.path}: cannot write ({error.strerror or error})")

    def sync(self) -> tuple[int, int]:
        """Flush and fsync the data; returns its (device, inode), which its names share."""
        try:
            self.file.flush()
            os.fsync(self.file.fileno())
        except OSError as exc:
            raise OutputError(f"{self.path}: cannot write ({exc.strerror or exc})") from None
        info = os.fstat(self.file.fileno())
        return info.st_dev, info.st_ino

    def stage(self) -> None:
        """Give the data its hidden name `staged` (a named temp file has it already)."""
        if not self._anonymous:
            return
        proc_path = f"/proc/self/fd/{self.file.fileno()}".encode()
        if self._linkat(_AT_FDCWD, proc_path, _AT_FDCWD, os.fsencode(self.staged), _AT_SYMLINK_FOLLOW) != 0:
            raise OutputError(f"{self.path}: cannot create ({os.strerror(ctypes.get_errno())})")
        self._anonymous = False

    def commit(self) -> None:
        _commit([self], overwrite=self.overwrite)

    def __enter__(self) -> IO[bytes]:
        return self.file

    def __exit__(self, exc_type: type[BaseException] | None, *_: object) -> None:
        """Commit when the block succeeded; discard on any exception (Ctrl-C included)."""
        try:
            if exc_type is None:
                self.commit()
            elif issubclass(exc_type, Exception) and (error := self.write_error()) is not None:
                raise error from None
        finally:
            if not self.committed:
                self.discard()

    def discard(self) -> None:
        """Drop the data; closing flushes what is buffered, which fails again where the disk refused it."""
        with suppress(OSError):
            self.file.close()
        if not self._anonymous:
            self.staged.unlink(missing_ok=True)


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
    """Open several atomic files; when the block ends without error all are committed as one (the first path last,
    so the main file appears only with its companions), none otherwise."""
    opened: dict[Path, AtomicFile] = {}
    try:
        for path in paths:
            try:
                opened[path] = AtomicFile(path, overwrite=overwrite)
            except OSError as exc:
                raise OutputError(f"{path}: cannot write in {path.parent} ({exc.strerror})") from None
        try:
            yield opened
        except Exception:
            for handle in opened.values():
                if (error := handle.write_error()) is not None:
                    raise error from None
            raise
        _commit(list(opened.values()), overwrite=overwrite)
    finally:
        for handle in opened.values():
            if not handle.committed:
                handle.discard()


# ---------------------------------------------------------------------------------------------------------------
# Committing several files as one


@dataclass(frozen=True)
class _Entry:
    """One file of a commit: where it goes, its hidden name until then, its inode, and where the file it replaces
    waits until the main file is in place (companions only; the main file is replaced in one rename)."""

    path: Path
    staged: Path
    inode: tuple[int, int]
    backup: Path | None

    def to_json(self) -> dict[str, Any]:
        backup = self.backup.name if self.backup else None
        return {"name": self.path.name, "staged": self.staged.name, "inode": list(self.inode), "backup": backup}

    @classmethod
    def from_json(cls, folder: Path, item: dict[str, Any]) -> _Entry:
        """An entry read back; names must be plain names (the record can reach nothing outside its folder)."""
        names = [item["name"], item["staged"], *([item["backup"]] if item["backup"] else [])]
        if not all(isinstance(n, str) and n not in ("", ".", "..") and Path(n).name == n for n in names):
            raise ValueError("not a plain file name")
        device, inode = (int(number) for number in item["inode"])
        backup = folder / item["backup"] if item["backup"] else None
        return cls(folder / item["name"], folder / item["staged"], (device, inode), backup)


class _Signalled(BaseException):
    """SIGTERM or SIGHUP arrived while files were being moved into place; raised again once the commit is undone."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


def _commit(handles: list[AtomicFile], *, overwrite: bool) -> None:
    """Move complete files into place as one: the companions, then `handles[0]` (the main file). Every check comes
    before the record is written; from then on, any failure or signal undoes the commit before it propagates."""
    main = handles[0].path
    settle_interrupted(main)
    entries = []
    for handle in handles:
        inode = handle.sync()
        _check_replaceable(handle.path, overwrite=overwrite)
        replaced = handle is not handles[0] and os.path.lexists(handle.path)
        entries.append(
            _Entry(handle.path, handle.staged, inode, handle.staged.with_suffix(".old") if replaced else None)
        )
    entries.append(entries.pop(0))  # the main file last
    record = _record_path(main)
    fd = _write_record(record, entries)
    try:
        try:
            with _signals_raise():
                for handle in handles:
                    handle.stage()
                for entry in entries:
                    _move_into_place(entry)
        finally:
            _finish(main, record, entries)  # done, or (on any exception or signal) undone
    except _Signalled as exc:
        signal.raise_signal(exc.signum)  # the signal's own handler is back: it ends the process
        raise
    finally:
        os.close(fd)
    for handle in handles:
        handle.file.close()
        handle.committed = True


def _move_into_place(entry: _Entry) -> None:
    try:
        if entry.backup is not None:
            os.replace(entry.path, entry.backup)
        os.replace(entry.staged, entry.path)
    except OSError as exc:
        raise OutputError(f"{entry.path}: cannot write ({exc.strerror})") from None
    _fsync_dir(entry.path.parent)  # each move durable before the next: a crash never shows the main file alone


def _settle(entries: list[_Entry]) -> None:
    """Bring a commit to one of its two consistent states: done if the main file (last) is in place, else none of
    it (companions of this commit removed, the files they replaced put back). Hidden names are cleared either way."""
    done = _identity(entries[-1].path) == entries[-1].inode
    for entry in entries:
        entry.staged.unlink(missing_ok=True)
        if not done and _identity(entry.path) == entry.inode:
            entry.path.unlink()
        if entry.backup is not None and os.path.lexists(entry.backup):
            if done:
                entry.backup.unlink()
            else:
                os.replace(entry.backup, entry.path)


def settle_interrupted(main: Path) -> None:
    """Undo (or, if its main file arrived, finish) a commit of `main` that a kill or crash cut short."""
    record = _record_path(main)
    try:
        fd = os.open(record, os.O_RDWR | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise OutputError(f"{main}: cannot read its commit record {record} ({exc.strerror})") from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OutputError(f"{main}: its commit record {record} is not a regular file")
        _lock(fd, main, record)
        try:
            entries = [_Entry.from_json(main.parent, item) for item in json.loads(os.read(fd, 1 << 20))]
        except (ValueError, KeyError, TypeError):
            entries = []  # written only in part: nothing had moved yet
        _finish(main, record, entries)
    finally:
        os.close(fd)


def _finish(main: Path, record: Path, entries: list[_Entry]) -> None:
    """Settle a commit and remove its record."""
    try:
        if entries:
            _settle(entries)
        record.unlink()
    except OSError as exc:
        raise OutputError(f"{main}: cannot complete or undo its commit ({exc.strerror}); see {record}") from None
    _fsync_dir(main.parent)


def _record_path(main: Path) -> Path:
    return main.with_name(f".{main.name}.commit")


def _write_record(record: Path, entries: list[_Entry]) -> int:
    """Create, lock and fill the commit record; returns its descriptor (the lock lasts until it is closed)."""
    main = entries[-1].path
    try:
        fd = os.open(record, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
    except FileExistsError:
        raise OutputError(f"{main}: another process is writing it (its commit record {record} exists)") from None
    except OSError as exc:
        raise OutputError(f"{main}: cannot write its commit record {record} ({exc.strerror})") from None
    try:
        _lock(fd, main, record)
        os.write(fd, json.dumps([entry.to_json() for entry in entries]).encode())
        os.fsync(fd)
    except BaseException as exc:
        os.close(fd)
        record.unlink(missing_ok=True)
        if isinstance(exc, OSError):
            raise OutputError(f"{main}: cannot write its commit record {record} ({exc.strerror})") from None
        raise
    _fsync_dir(record.parent)
    return fd


def _lock(fd: int, main: Path, record: Path) -> None:
    """Hold the record for this process: a commit in progress is never undone by another."""
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise OutputError(f"{main}: another process is writing it (its commit record {record} is held)") from None


@contextmanager
def _signals_raise() -> Iterator[None]:
    """While files move into place, SIGTERM and SIGHUP (where they would simply end the process) raise `_Signalled`,
    so the commit is undone before the process ends as the signal says. Python handles signals in its main thread
    only; elsewhere this does nothing and a later check or commit undoes what a signal cut short."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, _frame: object) -> None:
        raise _Signalled(signum)

    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGTERM, signal.SIGHUP)}
    previous = {sig: old for sig, old in previous.items() if old == signal.SIG_DFL}
    for sig in previous:
        signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _identity(path: Path) -> tuple[int, int] | None:
    """(device, inode) of what `path` names, through links; None if nothing."""
    try:
        info = os.stat(path)
    except OSError:
        return None
    return info.st_dev, info.st_ino


def _check_replaceable(path: Path, *, overwrite: bool) -> None:
    """Nothing at `path`, or (with `overwrite`) a regular file or a symbolic link; a link to anything but a regular
    file, a device, a FIFO, a socket or a folder is refused even then."""
    try:
        mode = path.lstat().st_mode
    except FileNotFoundError:
        return
    kind = _KINDS.get(stat.S_IFMT(mode))
    if stat.S_ISLNK(mode):
        try:
            target = _KINDS.get(stat.S_IFMT(path.stat().st_mode))
        except OSError:
            target = None  # a dangling link (or a loop): only the link itself is replaced
        kind = target and f"a symbolic link to {target}"
    if kind is not None:
        raise OutputError(f"{path}: is {kind}, not a regular file; refusing to replace it, even with --force")
    if not overwrite:
        raise OutputError(f"{path}: exists; pass --force to overwrite")
