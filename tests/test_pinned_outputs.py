"""Byte-for-byte pins of what the main commands write, so refactors provably change no output.

Each test runs a command through the CLI entry point, as a user would, on the CPU with a fixed seed, and compares the
sha256 of the files it writes with the value recorded when the pin was set. A change here means a user's output
changed: either the change is a bug, or it is deliberate and the pin is updated in the same commit with the reason.

One field may differ from the pin: a converted file records the sha256 of the mapping file it was made with, which
changes with any edit of the shipped mapping, comments and layout included. The check puts the hash the mapping had
when the pin was set back in its place (same length, so every other byte stays where it was) before hashing, and
separately checks that the recorded hash is the current mapping's.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch

from tmconvert.converter.cli import main

REPO = Path(__file__).resolve().parents[1]
TEACHER = REPO / "assets" / "fmnist-vit-t.safetensors"
MAPPING = REPO / "mappings" / "vit-vim-mlp.yaml"  # the default for vim-t
MAPPING_SHA256_AT_PIN = "566963140c412d21576aebd8b627b1ea7fdfd2de956a675068855eea7976d838"

# Pin history: set before the restructure into per-stage packages (which changed no byte); updated once when the
# teacher config gained reg_tokens / pre_norm / patch_bias / act, which every file records in `source_config`
# (the tensors did not change: the .pth pin, weights only, stayed the same); updated again when the plan's tensor
# counts gained the kind `fitted` (metadata and sidecar `counts` have `"fitted": 0`; .pth and tensors unchanged).
# README main job: `bin/tmconvert assets/fmnist-vit-t.safetensors --to vim-t`
MAIN_JOB_SHA256 = "37a4ed172368d78e3359ec69326d1bfc02b718f71d6a547e9ca13ee4c1fc5acf"
MAIN_JOB_SIDECAR_SHA256 = "2475fe070487c202405bd7c013ad5c64d0e6aec782a5a870724f2b171bb8e32a"
# `--format vim`: the same conversion plus the upstream-Vim `{'model': state_dict}` .pth
VIM_SAFETENSORS_SHA256 = "f62e2c8d8bcd811f2c5a97f4ee99802721d6c8c9a930f8edd0067a3cddb7f3a6"
VIM_PTH_SHA256 = "4a662b38b1a0e7de7010778faf46f4f7f58c5044214754654b375debefabeb9f"
# `tmconvert distill` of the main job's student, 3 steps on synthetic images
DISTILLED_SHA256 = "40a4c4dec3221178ca4ed0e543d5205a36fef2912c472d00b8081b04545c96f8"

RECIPE = "recipe: 1\nbatch_size: 8\nsteps: 3\ndata:\n  workers: 0\nrun:\n  log_every: 1\n"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _as_pinned(path: Path) -> bytes:
    """A converted file's bytes with the current mapping's hash replaced by the one it had at the pin."""
    data, current = path.read_bytes(), hashlib.sha256(MAPPING.read_bytes()).hexdigest().encode()
    assert data.count(current) == 1, f"{path.name} does not record the mapping's sha256 exactly once"
    return data.replace(current, MAPPING_SHA256_AT_PIN.encode())


def _sha256_as_pinned(path: Path) -> str:
    return hashlib.sha256(_as_pinned(path)).hexdigest()


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("pinned") / "fmnist-vit-t-vim-t.safetensors"
    assert main([str(TEACHER), "--to", "vim-t", "--out", str(out)]) == 0
    return out


@pytest.fixture
def one_thread():
    """Float reductions split across threads may round differently; one thread gives one answer."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_readme_main_job_output_is_pinned(converted: Path) -> None:
    assert _sha256_as_pinned(converted) == MAIN_JOB_SHA256
    assert _sha256_as_pinned(converted.with_name("fmnist-vit-t-vim-t.config.json")) == MAIN_JOB_SIDECAR_SHA256


def test_vim_format_output_is_pinned(tmp_path: Path) -> None:
    out = tmp_path / "fmnist-vit-t-vim-t.safetensors"
    assert main([str(TEACHER), "--to", "vim-t", "--out", str(out), "--format", "vim", "--no-verify"]) == 0
    assert _sha256_as_pinned(out) == VIM_SAFETENSORS_SHA256  # the main job's file, its options naming the format
    assert _sha256(out.with_suffix(".pth")) == VIM_PTH_SHA256


def test_distilled_student_is_pinned(tmp_path: Path, converted: Path, one_thread: None) -> None:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(RECIPE)
    student = tmp_path / converted.name  # the conversion's output as it was at the pin (its hash is the run's input)
    student.write_bytes(_as_pinned(converted))
    run = tmp_path / "run"
    args = ["distill", str(TEACHER), str(student), "--data", "synthetic:16", "--out", str(run)]
    assert main([*args, "--recipe", str(recipe), "--device", "cpu", "--seed", "3"]) == 0
    assert _sha256(run / "student.safetensors") == DISTILLED_SHA256
