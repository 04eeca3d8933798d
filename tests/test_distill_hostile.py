"""Hostile input to `tmconvert distill`: an empty, garbage or malicious checkpoint on --resume, a full disk, a run
stopped before its first checkpoint, a second run in a folder in use. Each is one line on stderr and exit code 1,
and a fresh run that fails before its first checkpoint leaves nothing."""

from __future__ import annotations

import contextlib
import json
import os
import re
import resource
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from tests._distill_factory import TEST_RECIPE, convert_student, write_teacher
from tmconvert.converter.cli import main
from tmconvert.converter.distill.runfiles import CHECKPOINT_FORMAT


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path, Path]:
    folder = tmp_path_factory.mktemp("hostile")
    teacher = write_teacher(folder / "teacher.safetensors")
    (folder / "recipe.yaml").write_text(TEST_RECIPE)
    return teacher, convert_student(teacher, folder / "student.safetensors"), folder / "recipe.yaml"


def _args(files: tuple[Path, Path, Path], out: Path, *extra: str, steps: int = 2) -> list[str]:
    teacher, student, recipe_file = files
    return [
        "distill",
        str(teacher),
        str(student),
        "--data",
        "synthetic:8",
        "--out",
        str(out),
        "--recipe",
        str(recipe_file),
        "--heads",
        "2",
        "--batch-size",
        "4",
        "--steps",
        str(steps),
        "--device",
        "cpu",
        "--json",  # no progress lines: stderr holds only the error
        *extra,
    ]


def _error(args: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line `tmconvert` prints for a user error (exit code 1)."""
    code = main(args)
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.count("\n") == 1 and "\x1b" not in err, err
    return err


class _Payload:
    """Pickles as a call to `func(*args)`: what a malicious checkpoint does to run code on load."""

    def __init__(self, func: object, *args: object):
        self.func, self.args = func, args

    def __reduce__(self) -> tuple[object, tuple[object, ...]]:
        return self.func, self.args


def test_resume_from_an_empty_checkpoint_is_one_line(files, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"")
    err = _error(_args(files, out, "--resume"), capsys)
    assert err == f"error: {out / 'checkpoint.pt'}: cannot read torch checkpoint: EOFError\n"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]


def test_resume_from_a_malicious_checkpoint_names_the_global_and_runs_nothing(files, tmp_path, capsys):
    out, marker = tmp_path / "run", tmp_path / "pwned"
    out.mkdir()
    path = out / "checkpoint.pt"
    torch.save({"format": CHECKPOINT_FORMAT, "student": _Payload(os.system, f"touch {marker}")}, path)
    err = _error(_args(files, out, "--resume"), capsys)
    assert err == (
        f"error: {path}: refused to unpickle: it asks for the global 'posix.system', which is not a tensor, a plain "
        "value or an allow-listed class (argparse.Namespace); nothing from the file was executed\n"
    )
    assert "weights_only" not in err and not marker.exists()
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt"]


def test_resume_from_a_garbage_checkpoint_prints_nothing_from_it(files, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    garbage = {"format": CHECKPOINT_FORMAT, "fingerprint": "\x1b[2J\x1b[31mok", "fingerprint_parts": "[1, 2]"}
    torch.save(garbage, out / "checkpoint.pt")
    err = _error(_args(files, out, "--resume"), capsys)
    assert re.fullmatch(
        rf"error: {re.escape(str(out / 'checkpoint.pt'))}: belongs to another run \(fingerprint \?, this run "
        r"[0-9a-f]{16}; differs in: data, recipe, student, teacher_sha256, world\); use another --out or --force to "
        r"start over\n",
        err,
    ), err


def test_resume_drops_garbage_lines_of_metrics(files, tmp_path):
    out = tmp_path / "run"
    assert main(_args(files, out, "--stop-after", "1")) == 0
    with open(out / "metrics.jsonl", "ab") as metrics:
        metrics.write(b'\xff\xfe\x1b[2J\n[1, 2]\n{"step": "1"}\n{"step": null}\n{"step": 1')
    assert main(_args(files, out, "--resume")) == 0
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2]


@contextlib.contextmanager
def _file_size_limit(limit: int) -> Iterator[None]:
    """Writes past `limit` bytes of a file fail (EFBIG) the way writes on a full disk fail (ENOSPC): an OSError from
    the kernel in the middle of a write."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    handler = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the default action kills the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, handler)


@pytest.mark.parametrize(
    ("limit", "steps", "name"),
    [(1000, 2, "run.json"), (8000, 30, "metrics.jsonl"), (20000, 2, "checkpoint.pt")],
)
def test_full_disk_before_the_first_checkpoint_is_one_line_and_leaves_nothing(
    files, tmp_path, capsys, limit, steps, name
):
    out = tmp_path / "run"
    with _file_size_limit(limit):
        err = _error(_args(files, out, steps=steps), capsys)
    assert err == f"error: {out / name}: cannot write (File too large)\n"
    assert not out.exists()
    assert main(_args(files, out, steps=steps)) == 0
    assert (out / "student.safetensors").is_file()


def test_full_disk_in_a_resumed_run_keeps_its_checkpoint(files, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(_args(files, out, "--stop-after", "1")) == 0
    capsys.readouterr()
    with _file_size_limit(20000):
        err = _error(_args(files, out, "--resume"), capsys)
    assert err == f"error: {out / 'checkpoint.pt'}: cannot write (File too large)\n"
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl", "recipe.yaml", "run.json"]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["step"] == 1
    assert main(_args(files, out, "--resume")) == 0
    assert (out / "student.safetensors").is_file()


def test_a_run_stopped_before_its_first_checkpoint_starts_again(files, tmp_path, capsys):
    """What a SIGKILL before the first checkpoint leaves: the run's first files and a stale (unlocked) lock file."""
    out = tmp_path / "run"
    out.mkdir()
    for name, text in [
        ("run.json", "{}\n"),
        ("recipe.yaml", "recipe: 1\n"),
        ("metrics.jsonl", '{"step": 1'),
        ("run.lock", ""),
    ]:
        (out / name).write_text(text)
    err = _error(_args(files, out, "--resume"), capsys)
    assert err == (
        f"error: --resume: no checkpoint to continue in {out} (expected checkpoint.pt); a run stopped before its "
        "first checkpoint starts again without --resume\n"
    )
    assert main(_args(files, out)) == 0
    steps = [json.loads(line).get("step") for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 2] and json.loads((out / "run.json").read_text())["world"] == 1
    assert not (out / "run.lock").exists()


@contextlib.contextmanager
def _locked_by_another_process(path: Path) -> Iterator[None]:
    """`path` locked the way a run locks its folder, by a process that holds it until the block ends."""
    code = "import fcntl, sys; f = open(sys.argv[1], 'ab'); fcntl.lockf(f, fcntl.LOCK_EX); print(flush=True); input()"
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "\n"
        yield
    finally:
        holder.communicate("\n", timeout=30)


def test_a_folder_another_run_holds_is_refused_at_once(files, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    with _locked_by_another_process(out / "run.lock"):
        err = _error(_args(files, out, "--force"), capsys)
        assert err == (
            f"error: --out {out}: another run holds this folder (it has run.lock locked); wait for it to end or use "
            "another --out\n"
        )
        assert sorted(p.name for p in out.iterdir()) == ["run.lock"]
    assert main(_args(files, out)) == 0
    assert (out / "student.safetensors").is_file() and not (out / "run.lock").exists()
