"""Distillation across processes on the CPU: two DDP ranks (gloo) reproduce one process, a second run cannot enter
the folder of a running one, and a run killed with SIGKILL (its lock released by the kernel) resumes to the result
of an uninterrupted run. Each test starts fresh Python processes (a few seconds)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests._distill_factory import convert_student, recipe, request, state_of, write_teacher
from tmconvert.converter.cli import main
from tmconvert.converter.distill.run import prepare_run, run_distillation

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("procs")
    teacher = write_teacher(folder / "teacher.safetensors")
    return teacher, convert_student(teacher, folder / "student.safetensors")


def _cli_process(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    code = f"import sys; from tmconvert.converter.cli import main; sys.exit(main({args!r}))"
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.Popen(
        [sys.executable, "-c", code], cwd=ROOT, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _args(teacher: Path, student: Path, recipe_file: Path, out: Path, *extra: str) -> list[str]:
    return [
        "distill",
        str(teacher),
        str(student),
        "--data",
        "synthetic:16",
        "--out",
        str(out),
        "--recipe",
        str(recipe_file),
        "--heads",
        "2",
        "--device",
        "cpu",
        *extra,
    ]


def test_two_gloo_ranks_train_exactly_like_one_process(files, tmp_path):
    teacher, student = files
    overrides = ["optim.warmup_fraction=0"]
    loaded = recipe(tmp_path, overrides, steps=4, batch_size=8)
    single = run_distillation(prepare_run(request(teacher, student, "synthetic:16", tmp_path / "single", loaded)))
    port = _free_port()
    args = _args(
        teacher,
        student,
        tmp_path / "recipe.yaml",
        tmp_path / "ddp",
        "--set",
        overrides[0],
        "--steps",
        "4",
        "--batch-size",
        "8",
    )
    torchrun_env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2"}
    procs = [_cli_process(args, {**torchrun_env, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in range(2)]
    outputs = [p.communicate(timeout=180) for p in procs]
    for proc, (_out, err) in zip(procs, outputs, strict=True):
        assert proc.returncode == 0, err
    assert "distilled" in outputs[0][0] and outputs[1][0] == ""  # rank 0 reports, rank 1 is silent
    run = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert run["world"] == 2
    assert not (tmp_path / "ddp" / "run.lock").exists()  # rank 0 locked the folder (rank 1 did not) and released it
    a, b = state_of(single.paths.student), state_of(tmp_path / "ddp" / "student.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-5)


RECIPE = "recipe: 1\ndata:\n  workers: {workers}\nrun:\n  log_every: 1\n  checkpoint_every: 2\n"


def test_sigkilled_run_resumes_to_the_uninterrupted_result(files, tmp_path, capsys):
    teacher, student = files
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(workers=2))
    extra = ["--steps", "60", "--batch-size", "4"]
    proc = _cli_process(_args(teacher, student, tmp_path / "recipe.yaml", tmp_path / "killed", *extra))
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 7:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be killed"
    assert main(_args(teacher, student, tmp_path / "recipe.yaml", tmp_path / "killed", *extra, "--force")) == 1
    assert capsys.readouterr().err == (
        f"error: --out {tmp_path / 'killed'}: another run holds this folder (it has run.lock locked); wait for it to "
        "end or use another --out\n"
    )
    assert proc.poll() is None, "the run ended before it could be killed"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)  # its loader workers outlive it for seconds, and must not hold the lock meanwhile
    assert (tmp_path / "killed" / "run.lock").exists()  # left behind, but no longer locked: resume takes it
    checkpoint = torch.load(tmp_path / "killed" / "checkpoint.pt", weights_only=True)
    assert 6 <= checkpoint["step"] < 60 and not (tmp_path / "killed" / "student.safetensors").exists()
    # the worker count is not part of the run: resume and compare in this process without workers
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(workers=0))
    assert main(_args(teacher, student, tmp_path / "recipe.yaml", tmp_path / "killed", *extra, "--resume")) == 0
    assert not (tmp_path / "killed" / "run.lock").exists()
    proc.communicate(timeout=30)
    assert main(_args(teacher, student, tmp_path / "recipe.yaml", tmp_path / "straight", *extra)) == 0
    a = state_of(tmp_path / "straight" / "student.safetensors")
    b = state_of(tmp_path / "killed" / "student.safetensors")
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6)
    steps = [json.loads(line).get("step") for line in metrics.read_text().splitlines()]
    assert steps == [*range(1, 61), 60]  # one record per step (no duplicates from the replayed steps), then "done"


def test_a_rank_that_cannot_start_stops_every_rank(files, tmp_path):
    """Rank 0 finds the folder held by another run; rank 1 must not wait for it at a collective forever."""
    teacher, student = files
    (tmp_path / "recipe.yaml").write_text(RECIPE.format(workers=0))
    out = tmp_path / "held"
    out.mkdir()
    holder_code = (
        "import fcntl, sys; f = open(sys.argv[1], 'ab'); fcntl.lockf(f, fcntl.LOCK_EX); print(flush=True); input()"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", holder_code, str(out / "run.lock")],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "\n"
        env = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2"}
        args = _args(teacher, student, tmp_path / "recipe.yaml", out, "--steps", "2", "--batch-size", "4")
        procs = [_cli_process(args, {**env, "RANK": str(rank), "LOCAL_RANK": str(rank)}) for rank in range(2)]
        (_, err0), (_, err1) = (p.communicate(timeout=120) for p in procs)
    finally:
        holder.communicate("\n", timeout=30)
    assert [p.returncode for p in procs] == [1, 1]
    assert "another run holds this folder" in err0
    assert "another process of this torchrun job could not start the run" in err1
