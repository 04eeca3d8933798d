"""Hostile input at the CLI: every mistake ends in one line on stderr (exit 1; 2 for usage; 130 for Ctrl-C, even
during start-up), stdout holds nothing but output (the launcher's first-run install included), help shows flags as
flags, and `--calib` takes every data spec `--data` does."""

from __future__ import annotations

import gzip
import json
import os
import pickle
import re
import struct
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

from tests._ckpt_factory import SMALL, make_vit_state_dict, write_checkpoint
from tests._distill_factory import write_image_folder
from tmconvert.converter.cli import eval as eval_cmd
from tmconvert.converter.cli import main
from tmconvert.converter.data import sources
from tmconvert.converter.data.calibration import CALIB_LIMIT, parse_calib
from tmconvert.models import registry as registry_module
from tmconvert.models.registry import register
from tmconvert.models.vim import VimConfig

ROOT = Path(__file__).resolve().parents[1]
TARGET = "vim-test-hostile"
COMMANDS = ("inspect", "convert", "check", "list", "distill", "eval", "verify")


@pytest.fixture(autouse=True)
def tiny_target(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(registry_module, "_REGISTRY", dict(registry_module._REGISTRY))
    register(TARGET, VimConfig(embed_dim=16, depth=3, d_state=4))


@pytest.fixture
def src(tmp_path: Path) -> Path:
    (tmp_path / "src").mkdir()
    return write_checkpoint(make_vit_state_dict(SMALL, seed=0), tmp_path / "src" / "teacher.safetensors")


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------------------------------------------
# Ctrl-C while the console script imports its commands (torch takes seconds)

_CTRL_C_WHILE_IMPORTING = """
import importlib.metadata, os, signal, sys

class CtrlC:
    '''Sends SIGINT to this process as {module} starts importing: Ctrl-C during start-up, at a fixed point.'''

    def find_spec(self, name, path=None, target=None):
        if name == {module!r}:
            os.kill(os.getpid(), signal.SIGINT)
        return None

sys.meta_path.insert(0, CtrlC())
(script,) = importlib.metadata.entry_points(group="console_scripts", name="tmconvert")
sys.exit(script.load()(["list", "--json"]))
"""


@pytest.mark.parametrize("module", ["typer", "torch", "tmconvert.converter.cli.convert"])
def test_ctrl_c_during_start_up_exits_130_without_a_traceback(module: str) -> None:
    code = _CTRL_C_WHILE_IMPORTING.format(module=module)
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert (done.returncode, done.stdout, done.stderr) == (130, "", "interrupted\n")


# ---------------------------------------------------------------------------------------------------------------
# Help: flags are flags


@pytest.mark.parametrize("command", [None, *COMMANDS])
def test_help_shows_flags_without_a_type(command: str | None, capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    code, out, _ = _run(capsys, *([command] if command else []), "--help")
    assert code == 0
    assert "<bool>" not in out
    assert re.search(r"│ +--help +Show this message and exit\.", out), out
    if command is not None:
        assert re.search(r"│ +--json +Print ", out), out


def test_help_still_shows_the_type_of_options_that_take_a_value(capsys, monkeypatch) -> None:
    monkeypatch.setenv("COLUMNS", "200")
    _, out, _ = _run(capsys, "eval", "--help")
    assert re.search(r"--batch-size +<int range>", out) and re.search(r"--data +<str>", out), out


# ---------------------------------------------------------------------------------------------------------------
# --seed


@pytest.mark.parametrize("seed", [str(2**70), str(2**63), "-1"])
def test_convert_seed_out_of_range_is_one_line(seed: str, tmp_path, src, capsys) -> None:
    out = tmp_path / "o.safetensors"
    code, stdout, err = _run(capsys, str(src), "--to", TARGET, "--heads", "2", "--out", str(out), "--seed", seed)
    assert (code, stdout) == (1, "")
    assert err == f"error: --seed {seed}: out of range; choose 0 to {2**63 - 1}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_convert_takes_the_largest_seed(tmp_path, src, capsys) -> None:
    out = tmp_path / "o.safetensors"
    code, stdout, err = _run(
        capsys, str(src), "--to", TARGET, "--heads", "2", "--out", str(out), "--seed", str(2**63 - 1), "--json"
    )
    assert code == 0, err
    assert json.loads(stdout)["options"]["seed"] == 2**63 - 1


# ---------------------------------------------------------------------------------------------------------------
# --calib: every data spec, bounded, errors naming --calib


def _fashion_mnist(root: Path, count: int) -> Path:
    """A stand-in for Fashion-MNIST's IDX files: `count` random 28x28 grey images in both splits."""
    root.mkdir()
    rng = np.random.default_rng(0)
    arrays = {"images-idx3": rng.integers(0, 256, (count, 28, 28)), "labels-idx1": np.arange(count) % 10}
    for stem in ("train", "t10k"):
        for kind, array in arrays.items():
            header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + b"".join(struct.pack(">I", s) for s in array.shape)
            (root / f"{stem}-{kind}-ubyte.gz").write_bytes(gzip.compress(header + array.astype(np.uint8).tobytes()))
    return root


# spec (with {fm}: the Fashion-MNIST folder, {lab}/{flat}: image folders) -> images a verification runs (<= 32)
CALIB_SPECS = {
    "5": 5,
    "synthetic:6": 6,
    "synthetic:9[2:6]": 4,
    "fashion-mnist": 32,  # of 40: verification runs 32 images at most
    "fashion-mnist[:7]": 7,
    "fashion-mnist:{fm}": 32,
    "fashion-mnist:{fm}[-5:]": 5,
    "{lab}": 5,
    "{lab}[1:4]": 3,
    "{flat}": 3,
    "{flat}[:2]": 2,
}


@pytest.mark.parametrize("spec", list(CALIB_SPECS))
def test_calib_takes_every_data_spec(spec: str, tmp_path, src, capsys, monkeypatch) -> None:
    fm = _fashion_mnist(tmp_path / "fm", 40)
    monkeypatch.setenv("TMCONVERT_FASHION_MNIST", str(fm))
    lab = write_image_folder(tmp_path / "lab", {"a": 2, "b": 3})
    flat = write_image_folder(tmp_path / "flat", {"": 3})
    calib = spec.format(fm=fm, lab=lab, flat=flat)
    out = tmp_path / "o.safetensors"
    code, stdout, err = _run(
        capsys, str(src), "--to", TARGET, "--heads", "2", "--out", str(out), "--calib", calib, "--json"
    )
    assert code == 0, err
    report = json.loads(stdout)
    assert report["options"]["score"] == "activation" and str(report["options"]["calib"]) == calib
    assert report["verification"]["numeric"]["images"] == CALIB_SPECS[spec]
    code, stdout, err = _run(capsys, "verify", str(out), "--teacher", str(src), "--heads", "2", "--calib", calib)
    assert code == 0, err
    code, stdout, err = _run(capsys, "verify", str(out), "--calib", calib, "--json")
    assert code == 0, err
    assert json.loads(stdout)["images"] == CALIB_SPECS[spec]


def test_calib_count_is_bounded(tmp_path, src, capsys) -> None:
    assert parse_calib(str(CALIB_LIMIT)) == CALIB_LIMIT and parse_calib("007") == 7
    out = str(tmp_path / "o.safetensors")
    for count in ("0", str(CALIB_LIMIT + 1), "9" * 5000):
        code, stdout, err = _run(capsys, str(src), "--to", TARGET, "--heads", "2", "--out", out, "--calib", count)
        assert (code, stdout, err) == (1, "", f"error: --calib {count}: give 1 to {CALIB_LIMIT} synthetic images\n")
    code, _, err = _run(capsys, "verify", out, "--calib", str(CALIB_LIMIT + 1))
    assert (code, err) == (1, f"error: --calib {CALIB_LIMIT + 1}: give 1 to {CALIB_LIMIT} synthetic images\n")
    # '²' passes str.isdigit, not int(): a folder name like any other
    code, _, err = _run(capsys, str(src), "--to", TARGET, "--heads", "2", "--out", out, "--calib", "²")
    assert (code, err) == (1, "error: ²: no such data folder\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_calib_spec_errors_name_calib(tmp_path, src, capsys) -> None:
    lab = write_image_folder(tmp_path / "lab", {"a": 2, "b": 3})
    out = str(tmp_path / "o.safetensors")
    too_many = "synthetic:" + "9" * 23
    needs_count = "synthetic data needs an image count from 1 to 10000000, e.g. synthetic:256"
    long_slice = "synthetic:3[" + "1" * 5000 + ":]"
    expected = {
        f"{lab}[9:]": f"--calib {lab}[9:]: the slice selects no images (the source has 5)",
        "synthetic:0": f"--calib synthetic:0: {needs_count}",
        too_many: f"--calib {too_many}: {needs_count}",
        long_slice: f"--calib {long_slice}: slice bounds too long",
    }
    for calib, message in expected.items():
        for args in ([str(src), "--to", TARGET, "--heads", "2", "--out", out], ["verify", out]):
            code, stdout, err = _run(capsys, *args, "--calib", calib)
            assert (code, stdout, err) == (1, "", f"error: {message}\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lab", "src"]


# ---------------------------------------------------------------------------------------------------------------
# A plain pickle is not a torch checkpoint


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_plain_pickle_is_named_as_such_without_torchs_warning(protocol: int, tmp_path, capsys) -> None:
    path = tmp_path / "weights.pt"
    path.write_bytes(pickle.dumps({"blocks.0.attn.qkv.weight": [1.0, 2.0]}, protocol=protocol))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code, stdout, err = _run(capsys, "inspect", str(path), "--json")
    assert [str(w.message) for w in caught] == []
    assert (code, stdout) == (1, "")
    reason = f"not a torch checkpoint: a plain pickle (protocol {protocol}), not written by torch.save"
    assert err == f"error: {path}: {reason}\n"


# ---------------------------------------------------------------------------------------------------------------
# Image-loading workers


@pytest.mark.parametrize(
    ("cpus", "batches", "workers"), [(1, 10, 0), (2, 10, 1), (4, 10, 3), (64, 100, 8), (64, 3, 3), (64, 1, 0)]
)
def test_default_workers_follow_the_cpus_this_process_may_use(cpus, batches, workers, monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cpus)))
    assert sources.default_workers(batches) == workers


@pytest.mark.parametrize(("given", "expected"), [((), 3), (("--workers", "0"), 0), (("--workers", "2"), 2)])
def test_eval_reads_images_with_workers_by_default(given, expected, tmp_path, src, capsys, monkeypatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(4)))
    used = []
    real = eval_cmd.eval_batches

    def recording(*args, workers: int, **kwargs):
        used.append(workers)
        return real(*args, workers=0, **kwargs)

    monkeypatch.setattr(eval_cmd, "eval_batches", recording)
    args = ["eval", str(src), "--heads", "2", "--data", "synthetic:40", "--batch-size", "8", "--json", *given]
    code, stdout, err = _run(capsys, *args)
    assert code == 0, err
    assert used == [expected] and json.loads(stdout)["images"] == 40


# ---------------------------------------------------------------------------------------------------------------
# The launcher's first run: pip's and venv's output goes to stderr

_FAKE_PYTHON = """#!/usr/bin/env bash
# python3 and the venv's python: `-m venv DIR` makes DIR with this file and a fake tmconvert, `-m pip` logs its
# arguments; both print to stdout as the real ones do.
case "$1 $2" in
    "-m venv")
        dir="${@: -1}"
        mkdir -p "$dir/bin"
        cp "$0" "$dir/bin/python"
        printf '#!/usr/bin/env bash\\nprintf "{\\\\"argv\\\\": \\\\"%%s\\\\"}\\\\n" "$*"\\n' >"$dir/bin/tmconvert"
        chmod +x "$dir/bin/tmconvert"
        echo "venv: made $dir" ;;
    "-m pip")
        echo "${*:3}" >>"$PIP_LOG"
        echo "Collecting torch"
        echo "Successfully installed tmconvert" ;;
esac
"""


def _fake_tools(folder: Path, gpu: bool) -> Path:
    folder.mkdir()
    for name, text in {"python3": _FAKE_PYTHON, "nvidia-smi": f"#!/bin/sh\nexit {0 if gpu else 1}\n"}.items():
        (folder / name).write_text(text)
        (folder / name).chmod(0o755)
    return folder


@pytest.mark.parametrize("gpu", [False, True], ids=["cpu", "gpu"])
def test_launcher_first_run_keeps_stdout_for_the_command(gpu: bool, tmp_path) -> None:
    tools = _fake_tools(tmp_path / "tools", gpu)
    venv, log = tmp_path / "venv", tmp_path / "pip.log"
    env = {
        **os.environ,
        "PATH": f"{tools}:{os.environ['PATH']}",
        "PYTHON": str(tools / "python3"),
        "TMCONVERT_VENV": str(venv),
        "PIP_LOG": str(log),
    }
    command = [str(ROOT / "bin" / "tmconvert"), "inspect", "x.pth", "--json"]
    first = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert first.returncode == 0, first.stderr
    assert first.stdout == '{"argv": "inspect x.pth --json"}\n'
    assert "Collecting torch" in first.stderr and f"venv: made {venv}" in first.stderr
    assert "ready:" in first.stderr
    installs = log.read_text().splitlines()
    assert len(installs) == (1 if gpu else 2) and installs[-1].endswith(f"-e {ROOT}")
    again = subprocess.run(command, capture_output=True, text=True, env=env, timeout=60)
    assert (again.returncode, again.stdout, again.stderr) == (0, first.stdout, "")
    assert log.read_text().splitlines() == installs  # the stamp: nothing installed twice


def test_verify_refuses_an_out_of_range_seed_before_reading_anything(tmp_path, capsys):
    assert main(["verify", str(tmp_path / "absent.safetensors"), "--seed", str(2**70)]) == 1
    captured = capsys.readouterr()
    assert captured.out == "" and f"--seed {2**70}: out of range; choose 0 to {2**63 - 1}" in captured.err


def test_eval_workers_are_bounded(tmp_path, capsys):
    """A process per worker: `--workers 100000` is a usage error, not an attempt to start that many."""
    assert main(["eval", str(tmp_path / "absent.safetensors"), "--data", "synthetic:2", "--workers", "100000"]) == 2
    captured = capsys.readouterr()
    assert (
        captured.out == ""
        and "Invalid value for '--workers': Input should be less than or equal to 256" in captured.err
    )
