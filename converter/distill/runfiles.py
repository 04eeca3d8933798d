"""The files of a run folder (`--out DIR`), each replaced atomically.

`run.json` (resolved inputs and the run fingerprint; the alignment summary added when that phase ends),
`recipe.yaml` (the resolved recipe), `metrics.jsonl` (one JSON object per logged step), `checkpoint.pt` (everything
needed to continue: the phase (`align`, else distillation), student, projectors, optimizer, scheduler, step, every
rank's RNG state, the fingerprint) and, at the end, `student.safetensors` + `student.config.json` in the
model-file format (upstream Vim keys, projectors dropped). A killed run leaves the last complete checkpoint; a
checkpoint whose fingerprint differs from this run's is refused, and one that is not a checkpoint at all is refused
by the model-checkpoint reader (which never runs code from a file). A write that fails (a full disk) is a `RunError`
naming the file. `run.lock` keeps a second run out of a folder in use.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import torch

from tmconvert.converter.checkpoint.safe_unpickle import load_torch_file
from tmconvert.converter.distill.errors import RunError
from tmconvert.converter.modelfile.converted import OutputPaths, load_converted, write_model_file
from tmconvert.converter.modelfile.files import AtomicFile
from tmconvert.converter.modelfile.safetensors import TensorSpec
from tmconvert.models import build_model, state_dict_shapes

CHECKPOINT_FORMAT = "tmconvert-distill-checkpoint"
CHECKPOINT_VERSION = 1
TIMING_FIELDS = ("images_per_second", "elapsed")  # step-record fields that vary from run to run


@dataclass(frozen=True)
class RunPaths:
    folder: Path

    @property
    def student(self) -> Path:
        return self.folder / "student.safetensors"

    @property
    def sidecar(self) -> Path:
        return self.folder / "student.config.json"

    @property
    def checkpoint(self) -> Path:
        return self.folder / "checkpoint.pt"

    @property
    def metrics(self) -> Path:
        return self.folder / "metrics.jsonl"

    @property
    def recipe(self) -> Path:
        return self.folder / "recipe.yaml"

    @property
    def run(self) -> Path:
        return self.folder / "run.json"

    @property
    def lock(self) -> Path:
        return self.folder / "run.lock"

    @property
    def model_file(self) -> OutputPaths:
        return OutputPaths(self.student, self.sidecar, None)

    @property
    def started(self) -> list[Path]:
        """What a run writes when it starts: a folder with only these holds no progress to lose."""
        return [self.run, self.recipe, self.metrics]

    @property
    def results(self) -> list[Path]:
        """What a run has made: its checkpoint and its distilled student."""
        return [self.checkpoint, self.student, self.sidecar]

    def all(self) -> list[Path]:
        return [*self.started, *self.results]


class RunLock:
    """An exclusive lock on `run.lock`, held by the process that writes the run (rank 0) from its checks to its end.

    A POSIX record lock (`lockf`), not an `flock`: the kernel drops it when its process dies, and forked children
    (data-loader workers, which outlive a killed run by seconds) do not inherit it; so a killed run leaves a stale
    file, not a held lock. The process must not open the file a second time (closing that would drop the lock).
    `release` removes the file while still holding it; `acquire` therefore checks that the file it locked is still
    the one at the path, and locks the new one otherwise.
    """

    def __init__(self, path: Path, handle: IO[bytes], made_folder: bool):
        self.path, self.handle, self.made_folder = path, handle, made_folder

    @classmethod
    def acquire(cls, path: Path) -> RunLock:
        """Lock the run folder (made when missing), or fail at once (RunError) when another run holds it."""
        folder = path.parent
        with writing(folder):
            try:
                folder.mkdir()
                made_folder = True
            except FileExistsError:
                made_folder = False
        while True:
            try:
                with writing(path):
                    handle = open(path, "ab")  # noqa: SIM115 - held open for the whole run
            except RunError:
                if made_folder:
                    with contextlib.suppress(OSError):
                        folder.rmdir()
                raise
            try:
                fcntl.lockf(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except (BlockingIOError, PermissionError):  # EAGAIN or EACCES: another process holds it
                handle.close()
                raise RunError(
                    f"--out {folder}: another run holds this folder (it has {path.name} locked); "
                    "wait for it to end or use another --out"
                ) from None
            if _is_at(handle, path):
                return cls(path, handle, made_folder)
            handle.close()  # its holder removed it as this run opened it

    def release(self) -> None:
        """Remove the lock file, then the folder when this lock made it and nothing else is in it."""
        if self.handle.closed:
            return
        self.path.unlink(missing_ok=True)
        self.handle.close()
        if self.made_folder:
            with contextlib.suppress(OSError):  # not empty: the run's files
                self.path.parent.rmdir()


def _is_at(handle: IO[bytes], path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), os.stat(path))
    except FileNotFoundError:
        return False


@contextlib.contextmanager
def writing(path: Path) -> Iterator[None]:
    """An OSError while writing `path` (a full disk, a quota, a read-only folder) as a RunError naming it."""
    try:
        yield
    except OSError as exc:
        raise RunError(f"{path}: cannot write ({exc.strerror or exc})") from None


def save_checkpoint(path: Path, state: dict[str, Any], fingerprint: str, parts: dict[str, Any]) -> None:
    """Atomically replace the run's checkpoint."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "fingerprint": fingerprint,
        "fingerprint_parts": json.dumps(parts, sort_keys=True),
        **state,
    }
    with writing(path), AtomicFile(path, overwrite=True) as file:
        torch.save(payload, file)


def load_checkpoint(path: Path, fingerprint: str, parts: dict[str, Any]) -> dict[str, Any]:
    """The run's checkpoint, refused (RunError naming what differs) when it belongs to another run.

    Read like a model checkpoint (`load_torch_file`: CheckpointError naming the file, or the global a malicious
    pickle asks for); nothing read from the file reaches a message unchecked."""
    state = load_torch_file(path, mmap=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path}: not a tmconvert distillation checkpoint")
    theirs_fingerprint = state.get("fingerprint")
    if theirs_fingerprint != fingerprint:
        theirs = _json_object(state.get("fingerprint_parts"))
        differ = sorted(k for k in parts if parts[k] != theirs.get(k))
        shown = theirs_fingerprint if isinstance(theirs_fingerprint, str) and theirs_fingerprint.isalnum() else "?"
        raise RunError(
            f"{path}: belongs to another run (fingerprint {shown}, this run {fingerprint}; "
            f"differs in: {', '.join(differ) or 'unknown'}); use another --out or --force to start over"
        )
    return state


def _json_object(text: Any) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def write_text_atomic(path: Path, text: str) -> None:
    with writing(path), AtomicFile(path, overwrite=True) as file:
        file.write(text.encode())


def update_run_record(path: Path, entries: dict[str, Any]) -> None:
    """Add `entries` to `run.json` (what a phase found out, e.g. the alignment summary), atomically; the rest of the
    record stays as the run's first start wrote it."""
    try:
        record = _json_object(path.read_text(errors="replace"))
    except OSError:  # gone or unreadable: the entries are what is left to record
        record = {}
    write_text_atomic(path, json.dumps({**record, **entries}, indent=2) + "\n")


class MetricsLog:
    """`metrics.jsonl`: one JSON object per logged step; a resumed run first drops lines past its checkpoint."""

    def __init__(self, path: Path, *, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        self.last: dict[str, Any] = {}  # the latest step record (the run's final numbers when it ends)
        if not enabled:
            return
        kept = ""
        if resume_step is not None and path.exists():
            for line in path.read_text(errors="replace").splitlines(keepends=True):
                record = _json_object(line) if line.endswith("\n") else {}  # a line cut short by the kill: dropped
                step = record.get("step")
                if "event" not in record and isinstance(step, int) and step <= resume_step:
                    kept += line
                    self.last = record
        write_text_atomic(path, kept)

    def append(self, record: dict[str, Any]) -> None:
        if "event" not in record:
            self.last = record
        if self.enabled:
            with writing(self.path), open(self.path, "a") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")


def write_student(paths: RunPaths, student: torch.nn.Module, cfg: Any, metadata: dict[str, str]) -> None:
    """The distilled student (fp32, the target's key order; no projectors) and its sidecar, atomically, then a
    strict reload check."""
    state = student.state_dict()
    tensors = [(name, state[name].detach().float().cpu().contiguous()) for name in state_dict_shapes(cfg)]
    specs = [TensorSpec(name, tuple(t.shape), "float32") for name, t in tensors]
    with writing(paths.student):
        write_model_file(paths.model_file, specs, iter(tensors), metadata, overwrite=True)
    _, reloaded, _ = load_converted(paths.student)
    build_model(cfg, device="meta").load_state_dict(reloaded, strict=True, assign=True)
