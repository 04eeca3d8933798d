"""The experiment script's bookkeeping: which learning rate each arm is credited with, and the target verdicts.

These decide the published table (benchmarks/distill_experiment.py), so they are checked on hand-made results."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "distill_experiment.py"


@pytest.fixture(scope="module")
def experiment():
    spec = importlib.util.spec_from_file_location("distill_experiment", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _write(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _row(arm: str, seed: int, steps: int, lr: float, top1: float, val: float) -> dict:
    return {"arm": arm, "seed": seed, "steps": steps, "lr": lr, "top1": top1, "val_top1": val}


def test_rates_are_compared_on_shared_seeds_and_reused_for_other_seeds(experiment, tmp_path):
    rows = [
        _row("a", 0, 500, 1e-3, 0.80, 0.81),
        _row("a", 0, 500, 2e-3, 0.82, 0.83),
        # seeds 1 and 2 only at 1e-3, with high hold-out scores: they must not make 1e-3 look better than 2e-3
        _row("a", 1, 500, 1e-3, 0.90, 0.95),
        _row("a", 2, 500, 1e-3, 0.90, 0.95),
        _row("c", 0, 500, 5e-4, 0.86, 0.87),
        _row("c", 0, 500, 1e-3, 0.85, 0.84),
    ]
    results = _write(tmp_path / "results.jsonl", rows)
    groups = experiment._read_rows(results)
    assert experiment._chosen_rate(groups[("a", 500)]) == 2e-3
    rates = experiment._best_rates(results, ["a", "c", "c-uniform"], [500])
    assert rates == {("a", 500): 2e-3, ("c", 500): 5e-4, ("c-uniform", 500): 5e-4}
    with pytest.raises(SystemExit, match="no learning-rate sweep of arm d at 500 steps"):
        experiment._best_rates(results, ["d"], [500])


def test_summary_states_both_targets(experiment, tmp_path):
    rows = [_row("a", s, n, 1e-3, acc, acc) for s in (0, 1) for n, acc in ((500, 0.80), (2000, 0.86))]
    rows += [_row("c", s, n, 5e-4, acc, acc) for s in (0, 1) for n, acc in ((500, 0.87), (2000, 0.88))]
    summary = experiment._summary(_write(tmp_path / "results.jsonl", rows))
    assert "| a | 2000 | 0.001 | 2 | 86.00 ± 0.00 |" in summary
    assert "500 steps: (c) - (a) = +7.00 points (target >= +2: met)" in summary
    assert "2000 steps: (c) - (a) = +2.00 points (target >= +2: met)" in summary
    assert "reaches (a)'s 2000-step accuracy (86.00 %) at 500 steps, 0.25x the steps (target <= 1/3: met)" in summary
    rows = [r | {"top1": 0.70} if r["arm"] == "c" else r for r in rows]
    summary = experiment._summary(_write(tmp_path / "results.jsonl", rows))
    assert "(c) - (a) = -10.00 points (target >= +2: missed)" in summary
    assert "does not reach (a)'s 2000-step accuracy" in summary
