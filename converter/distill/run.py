"""The distillation run: inputs checked up front, the training loop, checkpoints, resume, the distilled output.

`prepare_run` locks the run folder (one run per folder), loads the teacher, the student (a tmconvert model file of any
Mamba family — ViM, PlainMamba, VideoMamba, VMamba — or a registry name for a from-scratch baseline whose geometry
and classes follow the teacher), the data (images, or clips for a video student: `families.py`) and the layer
pairing (for a hierarchical student, where each pair's grids meet: `grids.py`), and checks that they fit together
and that the run folder may be written — all before anything but the lock is written. `run_distillation` then
trains, and releases the lock: first, when `align.steps` > 0, the layer-wise alignment phase (`align.py`, global
steps 1..align.steps), then distillation (the next `steps` steps) with its own fresh optimizer and schedule. Both
phases share one data stream, one step loop (`_PhaseLoop`: logging, checkpoints, stop conditions in global steps)
and the run files; a checkpoint records its phase.

The run folder's files are `runfiles.py`'s. A fresh run that fails before its first checkpoint removes what it
wrote, and a folder holding no checkpoint or student (a run killed before its first checkpoint) is started over by a
plain rerun: there is nothing to continue. A killed run leaves the last complete checkpoint, and `--resume`
continues from it to the very result an uninterrupted run gives: data order and augmentation are functions of
(seed, epoch, index) (`data.loaders`), and the optimizer, scheduler and RNG states are restored. A checkpoint whose
fingerprint (recipe minus its `run` section, teacher and student hashes, data, process count) differs from this
run's is refused. Under `torchrun` (`processes.py`) the similarities behind the adaptive weights are averaged over
ranks, so k processes compute what one process computes on the same global batch.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn

from tmconvert.converter import __version__
from tmconvert.converter.configs import config_json, derive_target_config
from tmconvert.converter.data.clips import ClipSource
from tmconvert.converter.data.loaders import ImageDataset, steps_per_epoch, train_batches
from tmconvert.converter.data.preprocess import InputSpec, Preprocess
from tmconvert.converter.data.sources import ImageSource, open_source
from tmconvert.converter.distill.align import AlignmentPlan, AlignmentTrainer, AlignStep, plan_alignment
from tmconvert.converter.distill.errors import RunError
from tmconvert.converter.distill.families import TeacherTargets, check_feature_pairs, student_depth, time_steps
from tmconvert.converter.distill.loss import LossOutput
from tmconvert.converter.distill.processes import DistContext
from tmconvert.converter.distill.recipe import LoadedRecipe, Recipe
from tmconvert.converter.distill.runfiles import (
    TIMING_FIELDS,
    MetricsLog,
    RunLock,
    RunPaths,
    load_checkpoint,
    save_checkpoint,
    update_run_record,
    write_student,
    write_text_atomic,
)
from tmconvert.converter.distill.trainer import StepResult, Trainer, build_loss, resolve_amp, resolve_cuda_graph
from tmconvert.converter.errors import TmconvertError
from tmconvert.converter.modelfile.classifier import LoadedModel, load_classifier, load_model_file
from tmconvert.converter.modelfile.converted import encode_metadata, header_fields
from tmconvert.converter.modelfile.files import sha256_files
from tmconvert.models import ModelConfigError, ViTConfig, build_model, family_of, get_config


@dataclass(frozen=True)
class DistillRequest:
    """Everything `tmconvert distill` was asked to do."""

    teacher: Path
    student: str  # a tmconvert model file, or a registry name (vim-t, plainmamba-l1) for a from-scratch student
    data: str  # see data.open_source (clips:T:... for a video student)
    out: Path  # the run folder
    recipe: LoadedRecipe
    resume: bool = False
    force: bool = False
    stop_after: int | None = None  # stop (with a checkpoint) once this global step is done
    time_limit: float | None = None  # seconds; stop (with a checkpoint) at the first log step past it
    num_heads: int | None = None  # teacher heads, when shapes cannot tell


@dataclass
class PreparedRun:
    request: DistillRequest
    recipe: Recipe
    teacher: LoadedModel
    student: nn.Module  # the student model (a Mamba family)
    student_config: Any  # as stored (the recipe's drop path only applies while training)
    student_metadata: dict[str, Any]  # of the input file; {} for a from-scratch student
    student_origin: str  # the file name, or the registry name
    pairs: list[tuple[int, int]]
    source: ImageSource | ClipSource
    frames: int | None  # frames per clip; None: images
    input_spec: InputSpec
    labelled: bool
    paths: RunPaths
    fingerprint: str
    fingerprint_parts: dict[str, Any]
    notes: list[str]
    dist: DistContext  # the processes and device the run was prepared for, and trains on
    alignment: AlignmentPlan | None = None  # what the alignment phase aligns (align.steps > 0)
    resume_state: dict[str, Any] | None = None  # the checkpoint to continue from (--resume), fingerprint checked
    pair_grids: list[dict[str, Any]] | None = None  # a hierarchical student's pairs: stage, grids, widths
    lock: RunLock | None = None  # rank 0's hold on the run folder, until run_distillation ends


def even_pairs(student_depth: int, teacher_depth: int) -> list[tuple[int, int]]:
    """min(S, T) pairs at matching relative depth, ends aligned: ((k+1)·S/n − 1, (k+1)·T/n − 1).

    ViM 24 vs DeiT 12: student layer 2k+1 ← teacher block k (two Mamba layers per transformer block, each block
    being two residual sub-layers).
    """
    n = min(student_depth, teacher_depth)
    return [((k + 1) * student_depth // n - 1, (k + 1) * teacher_depth // n - 1) for k in range(n)]


def plan_pairs(metadata: dict[str, Any]) -> list[tuple[int, int]]:
    """(student layer, teacher block) of every inherited layer in a converted file's layer plan whose output is that
    block's output: a layer that took only a block's attention sub-layer ends mid-block and is not paired (its MLP
    partner, the next layer, is)."""
    plan = metadata.get("layer_plan") or []
    return [
        (int(e["layer"]), int(e["block"]))
        for e in plan
        if isinstance(e, dict) and e.get("block") is not None and e.get("sublayer", "block") != "attn"
    ]


def resolve_pairs(
    setting: str | list[tuple[int, int]], metadata: dict[str, Any], student_depth: int, teacher_depth: int
) -> list[tuple[int, int]]:
    """The recipe's `loss.pairs`: explicit pairs, `even`, or `plan` (the file's layer plan, else `even`)."""
    origin = "loss.pairs"
    if setting == "even":
        pairs = even_pairs(student_depth, teacher_depth)
    elif setting == "plan":
        pairs = plan_pairs(metadata)
        origin = "the student's layer plan"
        if not pairs:
            pairs = even_pairs(student_depth, teacher_depth)
    else:
        pairs = [(int(s), int(t)) for s, t in setting]
    if not pairs:
        raise RunError("loss.pairs is empty: give at least one STUDENT:TEACHER pair, or plan / even")
    seen: set[int] = set()
    for s, t in pairs:
        if not 0 <= s < student_depth:
            raise RunError(f"{origin}: pair {s}:{t} names student layer {s}; the student has 0..{student_depth - 1}")
        if not 0 <= t < teacher_depth:
            raise RunError(f"{origin}: pair {s}:{t} names teacher block {t}; the teacher has 0..{teacher_depth - 1}")
        if s in seen:
            raise RunError(f"{origin}: student layer {s} is paired twice")
        seen.add(s)
    return pairs


def student_metadata(
    prepared: PreparedRun, step: int, final: dict[str, Any], align: dict[str, Any] | None = None
) -> dict[str, str]:
    """The input student's metadata (layer plan, index sets, mapping, source, ...) plus what distillation did
    (`step`: its distillation steps) and, when the run aligned its layers first, the alignment summary.

    Timings stay in metrics.jsonl only, so the same run always writes the same bytes."""
    cfg = prepared.student_config
    base = {k: v for k, v in prepared.student_metadata.items() if k != "distill"}
    base.update(header_fields(base.get("target", prepared.student_origin), cfg))
    base["input"] = prepared.input_spec.to_json()
    base.setdefault("layer_plan", [{"layer": j, "block": None} for j in range(student_depth(cfg))])
    base["distill"] = {
        "teacher": prepared.request.teacher.name,
        "teacher_sha256": prepared.fingerprint_parts["teacher_sha256"],
        "student": prepared.student_origin,
        "data": prepared.source.identity(),
        "recipe": prepared.recipe.to_json(),
        "pairs": [list(p) for p in prepared.pairs],
        "steps": step,
        "fingerprint": prepared.fingerprint,
        "final": {k: v for k, v in final.items() if k not in TIMING_FIELDS},
    }
    if align is not None:
        base["distill"]["align"] = align
    return encode_metadata(dict(sorted(base.items())))


def _load_student(spec: str, teacher_cfg: ViTConfig, seed: int) -> tuple[torch.nn.Module, dict[str, Any], str]:
    path = Path(spec)
    if path.exists() or path.suffix == ".safetensors":
        if not path.is_file():
            raise RunError(f"{path}: no such student file (a tmconvert .safetensors, or a model name like vim-t)")
        loaded = load_model_file(path)
        return loaded.model, loaded.metadata, path.name
    try:
        get_config(spec)
    except ModelConfigError:
        raise RunError(f"student {spec!r} is neither a file nor a known model name (see `tmconvert list`)") from None
    cfg = derive_target_config(spec, teacher_cfg)
    return build_model(cfg, seed=seed), {}, spec


def _check_fit(teacher: ViTConfig, student: Any, recipe: Recipe, source: ImageSource | ClipSource) -> list[str]:
    """The teacher, student, data and recipe fit together; returns notes about pieces switched off."""
    if tuple(student.img_size) != tuple(teacher.img_size) or student.in_chans != teacher.in_chans:
        raise RunError(
            f"student input {student.img_size[0]}x{student.img_size[1]}x{student.in_chans} differs from the "
            f"teacher's {teacher.img_size[0]}x{teacher.img_size[1]}x{teacher.in_chans}: both must read the same images"
        )
    if recipe.loss.kd > 0 and student.num_classes != teacher.num_classes:
        raise RunError(
            f"logit KD needs the same classes: student has {student.num_classes}, teacher {teacher.num_classes} "
            "(set loss.kd=0 to distil features only)"
        )
    notes = []
    if source.classes is not None and len(source.classes) > student.num_classes:
        raise RunError(f"the data has {len(source.classes)} classes, the student predicts {student.num_classes}")
    if source.classes is None and recipe.loss.task > 0:
        notes.append("unlabelled data: the task loss is off")
    if recipe.loss.task == 0 and recipe.loss.kd == 0 and recipe.loss.feature == 0:
        raise RunError("every loss weight is 0 (loss.task, loss.kd, loss.feature): nothing to train")
    return notes


def _check_location(folder: Path) -> None:
    if folder.exists() and not folder.is_dir():
        raise RunError(f"--out {folder}: is a file, expected a run folder")
    parent = folder if folder.exists() else folder.parent
    if not parent.exists():
        raise RunError(f"--out {folder}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunError(f"--out {folder}: {parent} is not writable")


def _check_contents(paths: RunPaths, *, resume: bool, force: bool) -> None:
    """--resume needs a checkpoint; a plain run needs --force where a run made a checkpoint or a student (files of a
    run stopped before its first checkpoint are replaced: nothing to continue, nothing to lose)."""
    if resume:
        if not paths.checkpoint.is_file():
            raise RunError(
                f"--resume: no checkpoint to continue in {paths.folder} (expected {paths.checkpoint.name}); "
                "a run stopped before its first checkpoint starts again without --resume"
            )
        return
    if any(p.exists() for p in paths.results) and not force:
        existing = [p.name for p in paths.all() if p.exists()]
        raise RunError(
            f"--out {paths.folder}: holds a run ({', '.join(existing)}); --resume continues it, --force starts over"
        )


def _fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def prepare_run(request: DistillRequest, dist: DistContext | None = None) -> PreparedRun:
    """Lock the run folder (rank 0), then load and check every input. Raises a `TmconvertError` naming the problem,
    and then leaves nothing behind (the lock released, a folder it made removed).

    Under torchrun the ranks then agree (one collective) whether all of them are ready: a problem only one rank
    sees (rank 0's lock, a file another rank cannot read) stops every rank, instead of leaving the others waiting
    at the first collective of a run that never starts."""
    dist = dist or DistContext()
    paths = RunPaths(request.out)
    lock: RunLock | None = None
    failure: TmconvertError | ModelConfigError | None = None
    try:
        _check_location(paths.folder)
        lock = RunLock.acquire(paths.lock) if dist.is_main else None
        prepared = _prepare(request, dist, paths)
    except (TmconvertError, ModelConfigError) as exc:
        failure = exc
    except BaseException:
        if lock is not None:
            lock.release()
        raise
    if dist.any(failure is not None):
        if lock is not None:
            lock.release()
        if failure is not None:
            raise failure
        raise RunError("another process of this torchrun job could not start the run (its error says why)")
    prepared.lock = lock
    return prepared


def _prepare(request: DistillRequest, dist: DistContext, paths: RunPaths) -> PreparedRun:
    recipe = request.recipe.recipe
    _check_contents(paths, resume=request.resume, force=request.force)
    if recipe.batch_size % dist.world:
        raise RunError(f"batch size {recipe.batch_size} is not divisible by the {dist.world} processes")
    teacher = load_classifier(request.teacher, num_heads=request.num_heads)
    if teacher.family != "vit":
        raise RunError(f"{request.teacher}: the teacher must be a ViT checkpoint, got a {teacher.family} model")
    teacher_cfg: ViTConfig = teacher.config  # type: ignore[assignment]
    student, student_metadata, origin = _load_student(request.student, teacher_cfg, recipe.seed)
    stored_cfg = student.cfg
    if recipe.student.drop_path != stored_cfg.drop_path_rate:
        training_cfg = dataclasses.replace(stored_cfg, drop_path_rate=recipe.student.drop_path)
        rebuilt = build_model(training_cfg, device="meta")
        rebuilt.load_state_dict(student.state_dict(), strict=True, assign=True)
        student = rebuilt
    source = open_source(
        request.data, split="train", img_size=teacher_cfg.img_size, num_classes=stored_cfg.num_classes, clips=True
    )
    frames = source.frames if isinstance(source, ClipSource) else None
    time_steps(stored_cfg, frames, f"--data {request.data}")  # clips need a video student, frames its tubelets
    notes = _check_fit(teacher_cfg, stored_cfg, recipe, source)
    if steps_per_epoch(len(source), recipe.batch_size // dist.world, dist.world) == 0:
        raise RunError(f"--data {request.data}: {len(source)} images do not make one batch of {recipe.batch_size}")
    pairs = resolve_pairs(recipe.loss.pairs, student_metadata, student_depth(stored_cfg), teacher_cfg.depth)
    pair_grids = None
    if recipe.loss.feature > 0:  # grids must match, or (hierarchical students) meet on a common grid
        pair_grids = check_feature_pairs(stored_cfg, teacher_cfg, pairs, frames, recipe.loss.grid)
    alignment = None
    if recipe.align.steps > 0:
        if family_of(stored_cfg) != "vim":
            raise RunError(
                f"align.steps: the layer-wise alignment phase aligns ViM layers only, {origin} is a "
                f"{family_of(stored_cfg)} (set align.steps=0)"
            )
        alignment = plan_alignment(student_metadata, origin, stored_cfg, teacher_cfg, recipe.align.steps)
    student_id: dict[str, Any] = (
        {"file_sha256": sha256_files([Path(request.student)])}
        if Path(request.student).is_file()
        else {"name": origin, "config": config_json(stored_cfg), "seed": recipe.seed}
    )
    parts = {
        "recipe": recipe.fingerprint_view(),
        "teacher_sha256": sha256_files(teacher.files),
        "student": student_id,
        "data": source.identity(),
        "world": dist.world,
    }
    fingerprint = _fingerprint(parts)
    resume_state = load_checkpoint(paths.checkpoint, fingerprint, parts) if request.resume else None
    return PreparedRun(
        request=request,
        dist=dist,
        recipe=recipe,
        teacher=teacher,
        student=student,
        student_config=stored_cfg,
        student_metadata=student_metadata,
        student_origin=origin,
        pairs=pairs,
        source=source,
        frames=frames,
        input_spec=InputSpec.for_model(teacher_cfg.img_size, teacher_cfg.in_chans, teacher.metadata),
        labelled=source.classes is not None,
        paths=paths,
        fingerprint=fingerprint,
        fingerprint_parts=parts,
        notes=notes,
        alignment=alignment,
        resume_state=resume_state,
        pair_grids=pair_grids,
    )


@dataclass
class StepReport:
    """What rank 0 tells the progress display at a log step of distillation. Steps are global: distillation runs
    from `first` (align.steps) to `total`."""

    step: int
    total: int
    lr: float
    loss: float
    parts: dict[str, float]
    similarities: dict[str, list[float]]
    weights: dict[str, list[float]]
    grad_norm: float | None
    images_per_second: float
    elapsed: float
    eta: float
    first: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "lr": self.lr,
            "loss": self.loss,
            **self.parts,
            "similarities": self.similarities,
            "weights": self.weights,
            "grad_norm": self.grad_norm,
            "images_per_second": round(self.images_per_second, 1),
            "elapsed": round(self.elapsed, 2),
        }


@dataclass
class AlignReport:
    """What rank 0 tells the progress display at a log step of the alignment phase (global steps 1..`total`); the
    per-layer lists follow `layers` (the aligned student layers, in layer-plan order)."""

    step: int
    total: int
    lr: float
    loss: float
    layers: list[int]
    layer_loss: list[float]
    update_cosine: list[float]
    output_cosine: list[float]
    grad_norm: float | None
    images_per_second: float
    elapsed: float
    eta: float
    first: ClassVar[int] = 0  # the phase starts the run

    def to_json(self) -> dict[str, Any]:
        return {
            "phase": "align",
            "step": self.step,
            "lr": self.lr,
            "loss": self.loss,
            "layers": self.layers,
            "layer_loss": self.layer_loss,
            "update_cosine": self.update_cosine,
            "output_cosine": self.output_cosine,
            "grad_norm": self.grad_norm,
            "images_per_second": round(self.images_per_second, 1),
            "elapsed": round(self.elapsed, 2),
        }


@dataclass
class DistillResult:
    paths: RunPaths
    step: int
    total: int
    finished: bool
    fingerprint: str
    final: dict[str, Any]
    seconds: float
    notes: list[str] = field(default_factory=list)
    align: dict[str, Any] | None = None  # the alignment summary, once the phase is done

    def to_json(self) -> dict[str, Any]:
        return {
            "out": str(self.paths.folder),
            "student": str(self.paths.student) if self.finished else None,
            "step": self.step,
            "steps": self.total,
            "finished": self.finished,
            "fingerprint": self.fingerprint,
            "final": self.final,
            "align": self.align,
            "seconds": round(self.seconds, 2),
            "notes": self.notes,
        }


def _run_record(prepared: PreparedRun, dist: DistContext, amp: bool, cuda_graph: bool) -> dict[str, Any]:
    request = prepared.request
    alignment = prepared.alignment
    record = {
        "fingerprint": prepared.fingerprint,
        "fingerprint_parts": prepared.fingerprint_parts,
        "teacher": str(request.teacher),
        "teacher_config": config_json(prepared.teacher.config),
        "student": request.student,
        "student_config": config_json(prepared.student_config),
        "data": request.data,
        "frames": prepared.frames,
        "input": prepared.input_spec.to_json(),
        "labelled": prepared.labelled,
        "pairs": [list(p) for p in prepared.pairs],
        "steps": prepared.recipe.steps,
        "align_steps": prepared.recipe.align.steps,
        "align_pairs": [p.to_json() for p in alignment.pairings] if alignment is not None else [],
        "recipe_source": request.recipe.source,
        "recipe_sha256": request.recipe.sha256,
        "overrides": list(request.recipe.overrides),
        "world": dist.world,
        "device": str(dist.device),
        "amp_bf16": amp,
        "cuda_graph": cuda_graph,  # of distillation; alignment steps are eager
        "notes": prepared.notes,
        "tmconvert_version": __version__,
        "torch_version": torch.__version__,
    }
    if prepared.pair_grids is not None:  # a hierarchical student: where each pair's tokens meet
        record["pair_grids"] = {"match": prepared.recipe.loss.grid, "pairs": prepared.pair_grids}
    return record


def _log_values(out: LossOutput, dist: DistContext) -> tuple[float, dict[str, float]]:
    """Total and parts averaged over ranks (one collective)."""
    names = sorted(out.parts)
    stacked = torch.stack([out.total.detach().float(), *(out.parts[n].float() for n in names)])
    values = dist.mean(stacked).tolist()
    return values[0], dict(zip(names, values[1:], strict=True))


def run_distillation(
    prepared: PreparedRun,
    *,
    on_report: Callable[[StepReport | AlignReport], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> DistillResult:
    """Train (fresh or resumed) until the recipe's steps are done or a stop condition hits; write the outputs.

    Trains on the device and processes `prepare_run` was given (`prepared.dist`), then releases the folder's lock. A
    fresh run that fails before its first checkpoint removes the files it started: it left nothing to continue."""
    fresh = prepared.dist.is_main and prepared.resume_state is None
    try:
        return _train(prepared, on_report, on_note)
    except BaseException:
        if fresh and not prepared.paths.checkpoint.exists():
            for path in prepared.paths.started:
                path.unlink(missing_ok=True)
        raise
    finally:
        if prepared.lock is not None:
            prepared.lock.release()


@dataclass(frozen=True)
class _Pace:
    images_per_second: float
    elapsed: float
    eta: float


class _PhaseLoop:
    """The step loop both phases share, in global steps: batches from one stream, a report (metrics line, progress)
    at every log step, the phase's last step and a stop, checkpoints, `--stop-after` and `--time-limit`."""

    def __init__(
        self,
        prepared: PreparedRun,
        metrics: MetricsLog,
        batches: Iterator[tuple[torch.Tensor, torch.Tensor]],
        on_report: Callable[[StepReport | AlignReport], None] | None,
        start_time: float,
    ):
        self.prepared, self.metrics, self.batches = prepared, metrics, batches
        self.on_report, self.start_time = on_report, start_time
        self.total = prepared.recipe.align.steps + prepared.recipe.steps  # the run's last global step

    def run(
        self,
        trainer: Trainer | AlignmentTrainer,
        end: int,
        report: Callable[[Any, int, _Pace], StepReport | AlignReport],
        extra_state: dict[str, Any],
    ) -> bool:
        """Step `trainer` to global step `end`; True when a stop ended the run first (its checkpoint written).

        `report(result, step, pace)` makes a log step's report (a collective: every rank calls it); `extra_state`
        goes into every checkpoint besides the trainer's state."""
        prepared, dist = self.prepared, self.prepared.dist
        recipe, request = prepared.recipe, prepared.request
        loop_start = time.perf_counter()
        first_step, window_step, window_time = trainer.step, trainer.step, loop_start
        while trainer.step < end:
            images, labels = next(self.batches)
            result = trainer.train_step(images, labels if prepared.labelled else None)
            step = trainer.step
            stop_requested = request.stop_after is not None and step >= request.stop_after
            if step % recipe.run.log_every == 0 or step == end or stop_requested:
                now = time.perf_counter()
                elapsed = now - self.start_time
                steps_per_s = (step - first_step) / max(now - loop_start, 1e-9)
                pace = _Pace(
                    images_per_second=(step - window_step) * recipe.batch_size / max(now - window_time, 1e-9),
                    elapsed=elapsed,
                    eta=(end - step) / steps_per_s if steps_per_s > 0 else math.inf,
                )
                made = report(result, step, pace)
                window_step, window_time = step, now
                if dist.is_main:
                    self.metrics.append(made.to_json())
                    if self.on_report is not None:
                        self.on_report(made)
                if request.time_limit is not None:
                    stop_requested = dist.any(stop_requested or elapsed >= request.time_limit)
            every = recipe.run.checkpoint_every
            if step == end or stop_requested or (every and step % every == 0):
                snapshot = {**trainer.state_dict(), **extra_state}  # collective
                if dist.is_main:
                    fingerprint, parts = prepared.fingerprint, prepared.fingerprint_parts
                    save_checkpoint(prepared.paths.checkpoint, snapshot, fingerprint, parts)
                dist.barrier()
            if stop_requested and step < self.total:
                return True
        return False


def _align_report(trainer: AlignmentTrainer, result: AlignStep, step: int, pace: _Pace) -> AlignReport:
    return AlignReport(
        step=step,
        total=trainer.spec.steps,
        lr=trainer.lr,
        layers=[p.layer for p in trainer.pairings],
        **trainer.measure(result),
        grad_norm=float(result.grad_norm) if result.grad_norm is not None else None,
        images_per_second=pace.images_per_second,
        elapsed=pace.elapsed,
        eta=pace.eta,
    )


def _distill_report(trainer: Trainer, result: StepResult, step: int, pace: _Pace) -> StepReport:
    recipe = trainer.recipe
    loss_value, parts = _log_values(result.loss, trainer.dist)
    return StepReport(
        step=step,
        total=recipe.align.steps + recipe.steps,
        first=recipe.align.steps,
        lr=trainer.lr,
        loss=loss_value,
        parts=parts,
        similarities={k: [round(x, 5) for x in v.tolist()] for k, v in result.loss.similarities.items()},
        weights={k: [round(x, 4) for x in v.tolist()] for k, v in result.loss.weights.items()},
        grad_norm=float(result.grad_norm) if result.grad_norm is not None else None,
        images_per_second=pace.images_per_second,
        elapsed=pace.elapsed,
        eta=pace.eta,
    )


def _train(
    prepared: PreparedRun,
    on_report: Callable[[StepReport | AlignReport], None] | None,
    on_note: Callable[[str], None] | None,
) -> DistillResult:
    dist = prepared.dist
    start_time = time.perf_counter()
    recipe, request, paths = prepared.recipe, prepared.request, prepared.paths
    state, prepared.resume_state = prepared.resume_state, None
    cuda_graph = resolve_cuda_graph(recipe.run.cuda_graph, dist)
    torch.manual_seed(recipe.seed)  # projectors: the same on every rank, with or without alignment first
    loss = build_loss(recipe, prepared.student, prepared.teacher.config, prepared.pairs, prepared.frames)
    if state is None and dist.is_main:
        for stale in paths.results:
            stale.unlink(missing_ok=True)  # --force: a new run must not leave the old one's results around
        record = _run_record(prepared, dist, resolve_amp(recipe.run.amp, dist.device), cuda_graph)
        write_text_atomic(paths.run, json.dumps(record, indent=2) + "\n")
        write_text_atomic(paths.recipe, recipe.to_yaml())
    dist.barrier()
    start_step = int(state["step"]) if state is not None else 0
    metrics = MetricsLog(paths.metrics, enabled=dist.is_main, resume_step=start_step if request.resume else None)
    notes = list(prepared.notes)
    for note in notes:
        if on_note is not None and dist.is_main:
            on_note(note)

    preprocess = Preprocess(
        prepared.input_spec,
        train=True,
        augment=recipe.data.augment,
        hflip=recipe.data.hflip,
        scale=recipe.data.scale,
        pad=recipe.data.pad,
    )
    dataset = ImageDataset(prepared.source, preprocess, seed=recipe.seed)
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = train_batches(
        dataset,
        batch_per_rank=recipe.batch_size // dist.world,
        world=dist.world,
        rank=dist.rank,
        seed=recipe.seed,
        workers=min(recipe.data.workers, len(os.sched_getaffinity(0))),  # never more loaders than usable CPUs
        start_step=start_step,
        pin_memory=dist.device.type == "cuda",
    )
    loop = _PhaseLoop(prepared, metrics, batches, on_report, start_time)

    def stopped_result(step: int, align: dict[str, Any] | None) -> DistillResult:
        seconds = time.perf_counter() - start_time
        return DistillResult(paths, step, loop.total, False, prepared.fingerprint, metrics.last, seconds, notes, align)

    align = state.get("align") if state is not None else None  # a distillation checkpoint of a run that aligned
    if prepared.alignment is not None and (state is None or state.get("phase") == "align"):
        aligner = AlignmentTrainer(prepared.teacher.model, prepared.student, prepared.alignment, recipe, dist)
        if state is not None:
            aligner.load_state_dict(state)
            state = None
        if loop.run(aligner, recipe.align.steps, functools.partial(_align_report, aligner), {}):
            return stopped_result(aligner.step, None)
        align = aligner.summary()
        if dist.is_main:
            update_run_record(paths.run, {"align": align})
        del aligner  # its optimizer state: memory distillation can use

    trainer = Trainer(
        prepared.teacher.model,
        prepared.student,
        loss,
        recipe,
        dist,
        labelled=prepared.labelled,
        start_step=recipe.align.steps,
        targets=TeacherTargets.for_student(prepared.teacher.config, prepared.student_config),
    )
    torch.manual_seed(recipe.seed + dist.rank)  # drop-path draws: one stream per rank
    if state is not None:
        trainer.load_state_dict(state)
        del state
    extra_state = {"align": align} if align is not None else {}
    if loop.run(trainer, loop.total, functools.partial(_distill_report, trainer), extra_state):
        return stopped_result(trainer.step, align)

    final = metrics.last
    if dist.is_main:
        metadata = student_metadata(prepared, trainer.step - recipe.align.steps, final, align)
        write_student(paths, trainer.student, prepared.student_config, metadata)
        metrics.append({"event": "done", "step": trainer.step, "student": str(paths.student)})
    dist.barrier()
    seconds = time.perf_counter() - start_time
    return DistillResult(paths, trainer.step, loop.total, True, prepared.fingerprint, final, seconds, notes, align)
