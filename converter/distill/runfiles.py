"""The files of a run folder (`--out DIR`), each replaced atomically.

`run.json` (resolved inputs and the run fingerprint), `recipe.yaml` (the resolved recipe), `metrics.jsonl` (one JSON
object per logged step), `checkpoint.pt` (everything needed to continue: student, projectors, optimizer, scheduler,
step, every rank's RNG state, the fingerprint) and, at the end, `student.safetensors` + `student.config.json` in the
model-file format (upstream Vim keys, projectors dropped). A killed run leaves the last complete checkpoint; a
checkpoint whose fingerprint differs from this run's is refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

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
    def model_file(self) -> OutputPaths:
        return OutputPaths(self.student, self.sidecar, None)

    def all(self) -> list[Path]:
        return [self.run, self.recipe, self.metrics, self.checkpoint, self.student, self.sidecar]


def save_checkpoint(path: Path, state: dict[str, Any], fingerprint: str, parts: dict[str, Any]) -> None:
    """Atomically replace the run's checkpoint."""
    payload = {
        "format": CHECKPOINT_FORMAT,
        "version": CHECKPOINT_VERSION,
        "fingerprint": fingerprint,
        "fingerprint_parts": json.dumps(parts, sort_keys=True),
        **state,
    }
    with AtomicFile(path, overwrite=True) as file:
        torch.save(payload, file)


def load_checkpoint(path: Path, fingerprint: str, parts: dict[str, Any]) -> dict[str, Any]:
    """The run's checkpoint, refused (RunError naming what differs) when it belongs to another run."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for a damaged or foreign file
        raise RunError(f"{path}: not a readable distillation checkpoint ({str(exc).splitlines()[0]})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise RunError(f"{path}: not a tmconvert distillation checkpoint")
    if state["fingerprint"] != fingerprint:
        theirs = json.loads(state.get("fingerprint_parts", "{}"))
        differ = sorted(k for k in set(parts) | set(theirs) if parts.get(k) != theirs.get(k))
        raise RunError(
            f"{path}: belongs to another run (fingerprint {state['fingerprint']}, this run {fingerprint}; "
            f"differs in: {', '.join(differ) or 'unknown'}); use another --out or --force to start over"
        )
    return state


def write_text_atomic(path: Path, text: str) -> None:
    with AtomicFile(path, overwrite=True) as file:
        file.write(text.encode())


class MetricsLog:
    """`metrics.jsonl`: one JSON object per logged step; a resumed run first drops lines past its checkpoint."""

    def __init__(self, path: Path, *, enabled: bool, resume_step: int | None):
        self.path, self.enabled = path, enabled
        self.last: dict[str, Any] = {}  # the latest step record (the run's final numbers when it ends)
        if not enabled:
            return
        kept = ""
        if resume_step is not None and path.exists():
            for line in path.read_text().splitlines(keepends=True):
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by the kill
                if line.endswith("\n") and "event" not in record and record.get("step", 0) <= resume_step:
                    kept += line
                    self.last = record
        write_text_atomic(path, kept)

    def append(self, record: dict[str, Any]) -> None:
        if "event" not in record:
            self.last = record
        if self.enabled:
            with open(self.path, "a") as handle:
                handle.write(json.dumps(record, sort_keys=True) + "\n")


def write_student(paths: RunPaths, student: torch.nn.Module, cfg: Any, metadata: dict[str, str]) -> None:
    """The distilled student (fp32, the target's key order; no projectors) and its sidecar, atomically, then a
    strict reload check."""
    state = student.state_dict()
    tensors = [(name, state[name].detach().float().cpu().contiguous()) for name in state_dict_shapes(cfg)]
    specs = [TensorSpec(name, tuple(t.shape), "float32") for name, t in tensors]
    write_model_file(paths.model_file, specs, iter(tensors), metadata, overwrite=True)
    _, reloaded, _ = load_converted(paths.student)
    build_model(cfg, device="meta").load_state_dict(reloaded, strict=True, assign=True)
