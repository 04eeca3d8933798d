"""CUDA-graph training steps (`run.cuda_graph`): when they are used, and that replaying captured steps trains exactly
like eager steps, across a resume that switches modes. The equivalence tests need a GPU (they run on the device
machine); the mode rules run everywhere."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tests._distill_factory import convert_student, recipe, request, state_of, write_teacher
from tmconvert.converter.distill.processes import DistContext, init_distributed
from tmconvert.converter.distill.run import prepare_run, run_distillation
from tmconvert.converter.distill.trainer import GRAPH_WARMUP_STEPS, resolve_cuda_graph
from tmconvert.converter.errors import ConfigError

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA device")
# fp32 (no autocast) so that graph and eager steps can be compared closely; the scan's dB/dC are summed with atomics
# in any order, hence a small tolerance rather than bitwise equality.
EXACT = ["optim.warmup_fraction=0", "data.augment=pad_crop", "data.hflip=true", "run.amp=off"]


@pytest.mark.parametrize(
    ("setting", "dist", "expected"),
    [
        ("auto", DistContext(device=torch.device("cpu")), False),
        (False, DistContext(device=torch.device("cpu")), False),
        ("auto", DistContext(world=2, device=torch.device("cuda", 0)), False),
        ("auto", DistContext(device=torch.device("cuda", 0)), True),
        (False, DistContext(device=torch.device("cuda", 0)), False),
        (True, DistContext(device=torch.device("cuda", 0)), True),
    ],
)
def test_graphs_are_used_on_one_cuda_process_only(setting, dist, expected):
    assert resolve_cuda_graph(setting, dist) is expected


def test_graphs_forced_where_impossible_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match=r"run.cuda_graph=true: .* on cpu"):
        resolve_cuda_graph(True, DistContext(device=torch.device("cpu")))
    with pytest.raises(ConfigError, match=r"under torchrun"):
        resolve_cuda_graph(True, DistContext(world=2, device=torch.device("cuda", 0)))
    teacher = write_teacher(tmp_path / "teacher.safetensors")
    student = convert_student(teacher, tmp_path / "student.safetensors")
    loaded = recipe(tmp_path, ["run.cuda_graph=on"], steps=2, batch_size=4)
    prepared = prepare_run(
        request(teacher, student, "synthetic:8", tmp_path / "run", loaded), DistContext(device=torch.device("cpu"))
    )
    with pytest.raises(ConfigError, match="CUDA graphs need one CUDA process"):
        run_distillation(prepared)
    assert not (tmp_path / "run").exists()  # refused before anything was written


def _cuda_run(teacher: Path, student: Path, tmp_path: Path, out: str, graph: str, **kw) -> object:
    loaded = recipe(tmp_path, [*EXACT, f"run.cuda_graph={graph}"], steps=10, batch_size=4)
    req = request(teacher, student, "synthetic:24", tmp_path / out, loaded, **kw)
    return run_distillation(prepare_run(req, init_distributed("cuda")))


def _logged(path: Path, key: str = "loss") -> list[float]:
    """One value per logged step (the last line of metrics.jsonl is the run's "done" event, not a step)."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return [row[key] for row in rows if "event" not in row]


@needs_cuda
def test_replayed_steps_train_like_eager_steps(tmp_path):
    teacher = write_teacher(tmp_path / "teacher.safetensors")
    student = convert_student(teacher, tmp_path / "student.safetensors")
    eager = _cuda_run(teacher, student, tmp_path, "eager", "off")
    graph = _cuda_run(teacher, student, tmp_path, "graph", "on")
    assert graph.finished and GRAPH_WARMUP_STEPS + 2 < 10  # warm-up, one capture, several replays
    assert _logged(graph.paths.metrics) == pytest.approx(_logged(eager.paths.metrics), rel=1e-4, abs=1e-5)
    lrs = _logged(graph.paths.metrics, "lr")
    assert lrs == sorted(lrs, reverse=True) and lrs[-1] < 0.1 * lrs[0]  # the schedule reaches the captured step
    a, b = state_of(eager.paths.student), state_of(graph.paths.student)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5)


@needs_cuda
def test_resume_switching_between_eager_and_graph_steps(tmp_path):
    teacher = write_teacher(tmp_path / "teacher.safetensors")
    student = convert_student(teacher, tmp_path / "student.safetensors")
    straight = _cuda_run(teacher, student, tmp_path, "straight", "on")
    first = _cuda_run(teacher, student, tmp_path, "split", "off", stop_after=5)
    assert not first.finished and first.step == 5
    second = _cuda_run(teacher, student, tmp_path, "split", "on", resume=True)
    assert second.finished and second.step == 10
    assert _logged(second.paths.metrics) == pytest.approx(_logged(straight.paths.metrics), rel=1e-4, abs=1e-5)
    a, b = state_of(straight.paths.student), state_of(second.paths.student)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-5)
