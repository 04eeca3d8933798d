"""The distillation run: inputs checked up front, the training loop, checkpoints, resume, the distilled output.

`prepare_run` loads the teacher, the student (a tmconvert ViM file, or a registry name for a from-scratch baseline
whose geometry and classes follow the teacher), the data and the layer pairing, and checks that they fit together
and that the run folder may be written — all before anything is written. `run_distillation` then trains.

The run folder (`--out DIR`) holds `run.json` (resolved inputs and the run fingerprint), `recipe.yaml` (the resolved
recipe), `metrics.jsonl` (one JSON object per logged step), `checkpoint.pt` (everything needed to continue: student,
projectors, optimizer, scheduler, step, every rank's RNG state, the fingerprint) and, at the end,
`student.safetensors` + `student.config.json` in the converter's format (upstream Vim keys, projectors dropped).
Every file is replaced atomically; a killed run leaves the last complete checkpoint, and `--resume` continues from
it to the very result an uninterrupted run gives: data order and augmentation are functions of (seed, epoch, index)
(`data.py`), and the optimizer, scheduler and RNG states are restored. A checkpoint whose fingerprint (recipe minus
its `run` section, teacher and student hashes, data, process count) differs from this run's is refused.

Scale: one process, or several under `torchrun` (DistributedDataParallel; NCCL on GPUs, gloo on CPUs). The batch
size is global; rank 0 logs and writes. The similarities behind the adaptive weights are averaged over ranks, so k
processes compute what one process computes on the same global batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tmconvert.converter import __version__
from tmconvert.converter.data.images import (
    ImageDataset,
    ImageSource,
    InputSpec,
    Preprocess,
    open_source,
    steps_per_epoch,
    train_batches,
)
from tmconvert.converter.distill.loss import DistillationLoss, FeatureAlignment, LossOutput, token_alignment
from tmconvert.converter.distill.recipe import LoadedRecipe, Recipe
from tmconvert.converter.errors import ConfigError, RunError
from tmconvert.converter.modelfile.output import (
    AtomicFile,
    TensorSpec,
    atomic_files,
    load_converted,
    sha256_files,
    write_json,
    write_safetensors_stream,
)
from tmconvert.converter.plan.plan import config_json, derive_target_config
from tmconvert.converter.verify.accuracy import LoadedModel, load_classifier, load_vim
from tmconvert.models.registry import get_config
from tmconvert.models.vim import VimConfig, VisionMamba, state_dict_shapes
from tmconvert.models.vit import VisionTransformer, ViTConfig

CHECKPOINT_FORMAT = "tmconvert-distill-checkpoint"
CHECKPOINT_VERSION = 1
TIMING_FIELDS = ("images_per_second", "elapsed")  # step-record fields that vary from run to run


# ---------------------------------------------------------------------------------------------------------------
# Processes


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: world size, rank, and the device it trains on."""

    world: int = 1
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over ranks (a copy; the input is left alone)."""
        if not self.distributed:
            return tensor
        out = tensor.detach().clone()
        torch_dist.all_reduce(out)
        return out / self.world

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (a collective: every rank must call it)."""
        if not self.distributed:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
        return bool(value.item())

    def gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        torch_dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            torch_dist.barrier()


def init_distributed(device: str | None = None) -> DistContext:
    """From torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK), or a single process.

    `device`: "cpu", "cuda", or None (CUDA when available). Multi-process runs use NCCL on GPUs, gloo on CPUs.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device not in (None, "cpu", "cuda"):
        raise ConfigError(f"--device {device}: choose cpu or cuda")
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo", world_size=world, rank=rank)
    return DistContext(world=world, rank=rank, device=dev)


# ---------------------------------------------------------------------------------------------------------------
# Inputs


@dataclass(frozen=True)
class DistillRequest:
    """Everything `tmconvert distill` was asked to do."""

    teacher: Path
    student: str  # a tmconvert ViM file, or a registry name (vim-t) for a from-scratch student
    data: str  # see data.open_source
    out: Path  # the run folder
    recipe: LoadedRecipe
    resume: bool = False
    force: bool = False
    stop_after: int | None = None  # stop (with a checkpoint) once this global step is done
    time_limit: float | None = None  # seconds; stop (with a checkpoint) at the first log step past it
    num_heads: int | None = None  # teacher heads, when shapes cannot tell


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

    def all(self) -> list[Path]:
        return [self.run, self.recipe, self.metrics, self.checkpoint, self.student, self.sidecar]


@dataclass
class PreparedRun:
    request: DistillRequest
    recipe: Recipe
    teacher: LoadedModel
    student: VisionMamba
    student_config: VimConfig  # as stored (the recipe's drop path only applies while training)
    student_metadata: dict[str, Any]  # of the input file; {} for a from-scratch student
    student_origin: str  # the file name, or the registry name
    pairs: list[tuple[int, int]]
    source: ImageSource
    input_spec: InputSpec
    labelled: bool
    paths: RunPaths
    fingerprint: str
    fingerprint_parts: dict[str, Any]
    notes: list[str]
    dist: DistContext  # the processes and device the run was prepared for, and trains on
    resume_state: dict[str, Any] | None = None  # the checkpoint to continue from (--resume), fingerprint checked


def even_pairs(student_depth: int, teacher_depth: int) -> list[tuple[int, int]]:
    """min(S, T) pairs at matching relative depth, ends aligned: ((k+1)·S/n − 1, (k+1)·T/n − 1).

    ViM 24 vs DeiT 12: student layer 2k+1 ← teacher block k (two Mamba layers per transformer block, each block
    being two residual sub-layers).
    """
    n = min(student_depth, teacher_depth)
    return [((k + 1) * student_depth // n - 1, (k + 1) * teacher_depth // n - 1) for k in range(n)]


def plan_pairs(metadata: dict[str, Any]) -> list[tuple[int, int]]:
    """(student layer, teacher block) of every inherited layer in a converted file's layer plan."""
    plan = metadata.get("layer_plan") or []
    return [(int(e["layer"]), int(e["block"])) for e in plan if isinstance(e, dict) and e.get("block") is not None]


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


def _load_student(spec: str, teacher_cfg: ViTConfig, seed: int) -> tuple[VisionMamba, dict[str, Any], str]:
    path = Path(spec)
    if path.exists() or path.suffix == ".safetensors":
        if not path.is_file():
            raise RunError(f"{path}: no such student file (a tmconvert ViM .safetensors, or a model name like vim-t)")
        loaded = load_vim(path)
        return loaded.model, loaded.metadata, path.name
    try:
        get_config(spec)
    except ConfigError:
        raise RunError(f"student {spec!r} is neither a file nor a known model name (see `tmconvert list`)") from None
    cfg = derive_target_config(spec, teacher_cfg)
    return VisionMamba(cfg, seed=seed), {}, spec


def _check_fit(teacher: ViTConfig, student: VimConfig, recipe: Recipe, source: ImageSource) -> list[str]:
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


def _check_folder(paths: RunPaths, *, resume: bool, force: bool) -> None:
    folder = paths.folder
    if folder.exists() and not folder.is_dir():
        raise RunError(f"--out {folder}: is a file, expected a run folder")
    parent = folder if folder.exists() else folder.parent
    if not parent.exists():
        raise RunError(f"--out {folder}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise RunError(f"--out {folder}: {parent} is not writable")
    if resume:
        if not paths.checkpoint.is_file():
            raise RunError(f"--resume: no checkpoint to continue in {folder} (expected {paths.checkpoint.name})")
        return
    existing = [p.name for p in paths.all() if p.exists()]
    if existing and not force:
        raise RunError(
            f"--out {folder}: holds a run ({', '.join(existing)}); --resume continues it, --force starts over"
        )


def _fingerprint(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


def prepare_run(request: DistillRequest, dist: DistContext | None = None) -> PreparedRun:
    """Load and check every input; writes nothing. Raises a `TmconvertError` naming the problem."""
    dist = dist or DistContext()
    recipe = request.recipe.recipe
    paths = RunPaths(request.out)
    _check_folder(paths, resume=request.resume, force=request.force)
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
        rebuilt = VisionMamba(training_cfg, device="meta")
        rebuilt.load_state_dict(student.state_dict(), strict=True, assign=True)
        student = rebuilt
    source = open_source(request.data, split="train", img_size=teacher_cfg.img_size,
                         num_classes=stored_cfg.num_classes)  # fmt: skip
    notes = _check_fit(teacher_cfg, stored_cfg, recipe, source)
    if steps_per_epoch(len(source), recipe.batch_size // dist.world, dist.world) == 0:
        raise RunError(f"--data {request.data}: {len(source)} images do not make one batch of {recipe.batch_size}")
    pairs = resolve_pairs(recipe.loss.pairs, student_metadata, stored_cfg.depth, teacher_cfg.depth)
    if recipe.loss.feature > 0:
        token_alignment(stored_cfg.token_layout(), teacher_cfg.token_layout())  # grids must match
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
        input_spec=teacher.input_spec,
        labelled=source.classes is not None,
        paths=paths,
        fingerprint=fingerprint,
        fingerprint_parts=parts,
        notes=notes,
        resume_state=resume_state,
    )


# ---------------------------------------------------------------------------------------------------------------
# Training


class StudentWithLoss(nn.Module):
    """The trainable part (student + projectors) as one module, so DistributedDataParallel syncs both."""

    def __init__(self, student: VisionMamba, loss: DistillationLoss):
        super().__init__()
        self.student = student
        self.loss = loss

    def forward(
        self,
        images: torch.Tensor,
        teacher_logits: torch.Tensor,
        teacher_layers: list[torch.Tensor],
        labels: torch.Tensor | None,
        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> LossOutput:
        out = self.student.forward_all(images, return_directions=self.loss.needs_directions)
        return self.loss(out.logits, out.directions, teacher_logits, teacher_layers, labels, reduce)


def build_loss(
    recipe: Recipe, student: VisionMamba, teacher_cfg: ViTConfig, pairs: list[tuple[int, int]]
) -> DistillationLoss:
    """The recipe's loss for this student/teacher pair (projectors drawn from torch's current RNG)."""
    spec = recipe.loss
    alignment = None
    if spec.feature > 0:
        index, valid = token_alignment(student.token_layout(), teacher_cfg.token_layout())
        alignment = FeatureAlignment(
            pairs,
            student.scan_orders(),
            index,
            valid,
            student_width=student.cfg.d_inner,
            teacher_width=teacher_cfg.embed_dim,
            projector=spec.projector,
            adaptive=spec.adaptive,
            multi_directional=spec.multi_directional,
            min_similarity=spec.min_similarity,
        )
    return DistillationLoss(task=spec.task, kd=spec.kd, feature=spec.feature, label_smoothing=spec.label_smoothing,
                            temperature=spec.temperature, alignment=alignment)  # fmt: skip


def param_groups(module: StudentWithLoss, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay on the student's `no_weight_decay()` (pos/cls embeddings, A_log, D) nor on any
    norm weight or bias (every parameter with fewer than two dimensions), projectors' included."""
    skip = {f"student.{name}" for name in module.student.no_weight_decay()}
    decay, no_decay = [], []
    for name, param in module.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or name in skip else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def lr_schedule(recipe: Recipe) -> Callable[[int], float]:
    """LR factor per step: linear warm-up over `warmup_fraction` of the steps, then cosine down to `min_lr`."""
    total, opt = recipe.steps, recipe.optim
    warmup = round(opt.warmup_fraction * total)
    floor = min(opt.min_lr / opt.lr, 1.0)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def resolve_amp(setting: str, device: torch.device) -> bool:
    """bf16 autocast: `auto` on CUDA only, `bf16` anywhere, `off` never."""
    return setting == "bf16" or (setting == "auto" and device.type == "cuda")


def resolve_cuda_graph(setting: str | bool, dist: DistContext) -> bool:
    """Replay each training step as one CUDA graph: `auto` on a single CUDA process, true there or an error, false.

    A small student's step is thousands of short kernels whose launches, not the GPU, set the pace (ViM-T on 28 px
    images); one graph replay launches them all at once. Not under DDP, whose gradient all-reduce hooks run outside
    the captured step."""
    possible = dist.device.type == "cuda" and not dist.distributed
    if setting is True and not possible:
        where = "under torchrun (DDP)" if dist.distributed else f"on {dist.device.type}"
        raise ConfigError(f"run.cuda_graph=true: CUDA graphs need one CUDA process, this run is {where}")
    return possible and setting is not False


@dataclass
class StepResult:
    loss: LossOutput
    grad_norm: torch.Tensor | None


GRAPH_WARMUP_STEPS = 3  # eager steps on a side stream before capture: lazy initialisation (cuBLAS, Triton) settles


class Trainer:
    """One optimisation step of the student (and projectors) against a frozen teacher, and its resumable state.

    With CUDA graphs (`run.cuda_graph`) the first GRAPH_WARMUP_STEPS steps run eagerly, the next one is captured
    (forward, backward, clipping and the AdamW update, on static input buffers) and every later step copies its batch
    into those buffers and replays the graph. The learning rate then lives in a device tensor that the schedule
    fills between replays; the arithmetic is the eager step's."""

    def __init__(
        self,
        teacher: VisionTransformer,
        student: VisionMamba,
        loss: DistillationLoss,
        recipe: Recipe,
        dist: DistContext | None = None,
        *,
        labelled: bool = True,
    ):
        self.dist = dist or DistContext()
        device = self.dist.device
        self.recipe = recipe
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.module = StudentWithLoss(student, loss).to(device)
        self.module.train()
        self.model: nn.Module = self.module
        if self.dist.distributed:
            # logits reach the loss only through task (labelled data) or KD; without them unpaired layers and the
            # head get no gradient, which DDP must be told
            unused = recipe.loss.kd == 0 and (recipe.loss.task == 0 or not labelled)
            self.model = DistributedDataParallel(
                self.module, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=unused
            )
        self.cuda_graph = resolve_cuda_graph(recipe.run.cuda_graph, self.dist)
        self.optimizer = torch.optim.AdamW(
            param_groups(self.module, recipe.optim.weight_decay),
            lr=recipe.optim.lr,
            betas=recipe.optim.betas,
            eps=recipe.optim.eps,
        )
        self._place_optimizer_state()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_schedule(recipe))
        self.amp = resolve_amp(recipe.run.amp, device)
        self.step = 0
        adaptive_and_shared = recipe.loss.adaptive and self.dist.distributed
        self._reduce = self.dist.mean if adaptive_and_shared else None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static: tuple[torch.Tensor, torch.Tensor | None, StepResult] | None = None
        self._eager_steps = 0

    def _place_optimizer_state(self) -> None:
        """Fit AdamW's groups and state to this run's mode, whichever mode wrote a resumed checkpoint. For graph
        capture AdamW must be `capturable` (step counts on the device) and read its rate from a device tensor; the
        schedule's base rate stays a float, so filling that tensor never synchronises."""
        device = self.dist.device
        for group in self.optimizer.param_groups:
            group["capturable"] = self.cuda_graph
            rate = float(group["lr"])
            group["lr"] = torch.tensor(rate, device=device) if self.cuda_graph else rate
            group.setdefault("initial_lr", self.recipe.optim.lr)
        self._lr_tensors = [group["lr"] for group in self.optimizer.param_groups] if self.cuda_graph else []
        for state in self.optimizer.state.values():
            if "step" in state:
                state["step"] = state["step"].to(device if self.cuda_graph else "cpu", torch.float32)

    @property
    def student(self) -> VisionMamba:
        return self.module.student

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _compute(self, images: torch.Tensor, labels: torch.Tensor | None, zero_grad: bool = True) -> StepResult:
        """Forward, backward, clipping and the AdamW update on batches already on the device."""
        device = self.dist.device
        autocast = {"dtype": torch.bfloat16, "enabled": self.amp, "cache_enabled": not self.cuda_graph}
        with torch.no_grad(), torch.autocast(device.type, **autocast):
            teacher_out = self.teacher.forward_all(images)
        with torch.autocast(device.type, **autocast):
            loss = self.model(images, teacher_out.logits, teacher_out.layer_tokens, labels, self._reduce)
        if zero_grad:
            self.optimizer.zero_grad(set_to_none=True)
        loss.total.backward()
        loss.total = loss.total.detach()  # a caller holding the result must not keep this step's autograd graph alive
        grad_norm = None
        if self.recipe.optim.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(self.module.parameters(), self.recipe.optim.grad_clip)
        self.optimizer.step()
        return StepResult(loss, grad_norm)

    def _graph_step(self, images: torch.Tensor, labels: torch.Tensor | None) -> StepResult:
        device = self.dist.device
        if self._graph is None and self._eager_steps < GRAPH_WARMUP_STEPS:
            side = torch.cuda.Stream(device)
            side.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(side):
                result = self._compute(images, labels)
            torch.cuda.current_stream(device).wait_stream(side)
            self._eager_steps += 1
            return result
        if self._graph is None:
            static_images = images.clone()
            static_labels = labels.clone() if labels is not None else None
            self.optimizer.zero_grad(set_to_none=True)  # the captured backward then writes (not adds) the grads
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, capture_error_mode="thread_local"):
                result = self._compute(static_images, static_labels, zero_grad=False)
            self._graph, self._static = graph, (static_images, static_labels, result)
        else:
            static_images, static_labels, result = self._static  # type: ignore[misc]
            static_images.copy_(images)
            if static_labels is not None and labels is not None:
                static_labels.copy_(labels)
        self._graph.replay()
        return result

    def train_step(self, images: torch.Tensor, labels: torch.Tensor | None) -> StepResult:
        device = self.dist.device
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True) if labels is not None else None
        result = self._graph_step(images, labels) if self.cuda_graph else self._compute(images, labels)
        self.scheduler.step()
        if self.cuda_graph:
            self._keep_lr_tensors()
        self.step += 1
        return result

    def _keep_lr_tensors(self) -> None:
        """The captured AdamW update reads each group's rate tensor; a scheduler that assigned a float instead (older
        PyTorch) would freeze the rate, so the float goes into the tensor."""
        for group, rate in zip(self.optimizer.param_groups, self._lr_tensors, strict=True):
            if group["lr"] is not rate:
                rate.fill_(float(group["lr"]))
                group["lr"] = rate

    # -- resumable state ------------------------------------------------------------------------------------------

    def _rng_state(self) -> dict[str, torch.Tensor | None]:
        device = self.dist.device
        cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
        return {"cpu": torch.get_rng_state(), "cuda": cuda}

    def state_dict(self) -> dict[str, Any]:
        """Everything to continue exactly (a collective under DDP: every rank's RNG state is gathered)."""
        return {
            "step": self.step,
            "student": {k: v.detach().cpu() for k, v in self.module.student.state_dict().items()},
            "projectors": {k: v.detach().cpu() for k, v in self.module.loss.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "rng": self.dist.gather(self._rng_state()),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.student.load_state_dict(state["student"], strict=True)
        self.module.loss.load_state_dict(state["projectors"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self._place_optimizer_state()
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        rng = state["rng"][self.dist.rank]
        torch.set_rng_state(rng["cpu"])
        if rng.get("cuda") is not None and self.dist.device.type == "cuda":
            torch.cuda.set_rng_state(rng["cuda"], self.dist.device)


# ---------------------------------------------------------------------------------------------------------------
# Files of a run


def save_checkpoint(path: Path, state: dict[str, Any], fingerprint: str, parts: dict[str, Any]) -> None:
    """Atomically replace the run's checkpoint."""
    payload = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, "fingerprint": fingerprint,
               "fingerprint_parts": json.dumps(parts, sort_keys=True), **state}  # fmt: skip
    handle = AtomicFile(path, overwrite=True)
    try:
        torch.save(payload, handle.file)
        handle.commit()
    finally:
        if not handle.committed:
            handle.discard()


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
    handle = AtomicFile(path, overwrite=True)
    try:
        handle.file.write(text.encode())
        handle.commit()
    finally:
        if not handle.committed:
            handle.discard()


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


def _metadata_value(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, separators=(",", ":"))


def student_metadata(prepared: PreparedRun, step: int, final: dict[str, Any]) -> dict[str, str]:
    """The input student's metadata (layer plan, index sets, mapping, source, ...) plus what distillation did.

    Timings stay in metrics.jsonl only, so the same run always writes the same bytes."""
    cfg = prepared.student_config
    base = {k: v for k, v in prepared.student_metadata.items() if k != "distill"}
    base.update({
        "format": "tmconvert",
        "tmconvert_version": __version__,
        "family": "vim",
        "target": base.get("target", prepared.student_origin),
        "target_config": config_json(cfg),
        "input": prepared.input_spec.to_json(),
    })
    base.setdefault("layer_plan", [{"layer": j, "block": None} for j in range(cfg.depth)])
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
    return {k: _metadata_value(v) for k, v in sorted(base.items())}


def write_student(paths: RunPaths, student: VisionMamba, cfg: VimConfig, metadata: dict[str, str]) -> None:
    """The distilled student (fp32, the target's key order; no projectors) and its sidecar, atomically, then a
    strict reload check."""
    order = list(state_dict_shapes(cfg))
    state = student.state_dict()
    tensors = [(name, state[name].detach().float().cpu().contiguous()) for name in order]
    specs = [TensorSpec(name, tuple(t.shape), "float32") for name, t in tensors]
    sidecar = {}
    for key, value in metadata.items():
        try:
            sidecar[key] = json.loads(value) if value[:1] in "{[" else value
        except json.JSONDecodeError:
            sidecar[key] = value
    with atomic_files([paths.student, paths.sidecar], overwrite=True) as files:
        write_safetensors_stream(files[paths.student].file, specs, iter(tensors), metadata)
        write_json(files[paths.sidecar].file, sidecar)
    _, reloaded, _ = load_converted(paths.student)
    VisionMamba(cfg, device="meta").load_state_dict(reloaded, strict=True, assign=True)


# ---------------------------------------------------------------------------------------------------------------
# The run


@dataclass
class StepReport:
    """What rank 0 tells the progress display at a log step."""

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

    def to_json(self) -> dict[str, Any]:
        return {
            "step": self.step, "lr": self.lr, "loss": self.loss, **self.parts,
            "similarities": self.similarities, "weights": self.weights, "grad_norm": self.grad_norm,
            "images_per_second": round(self.images_per_second, 1), "elapsed": round(self.elapsed, 2),
        }  # fmt: skip


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

    def to_json(self) -> dict[str, Any]:
        return {"out": str(self.paths.folder), "student": str(self.paths.student) if self.finished else None,
                "step": self.step, "steps": self.total, "finished": self.finished, "fingerprint": self.fingerprint,
                "final": self.final, "seconds": round(self.seconds, 2), "notes": self.notes}  # fmt: skip


def _run_record(prepared: PreparedRun, dist: DistContext, trainer: Trainer) -> dict[str, Any]:
    request = prepared.request
    return {
        "fingerprint": prepared.fingerprint,
        "fingerprint_parts": prepared.fingerprint_parts,
        "teacher": str(request.teacher),
        "teacher_config": config_json(prepared.teacher.config),
        "student": request.student,
        "student_config": config_json(prepared.student_config),
        "data": request.data,
        "input": prepared.input_spec.to_json(),
        "labelled": prepared.labelled,
        "pairs": [list(p) for p in prepared.pairs],
        "recipe_source": request.recipe.source,
        "recipe_sha256": request.recipe.sha256,
        "overrides": list(request.recipe.overrides),
        "world": dist.world,
        "device": str(dist.device),
        "amp_bf16": trainer.amp,
        "cuda_graph": trainer.cuda_graph,
        "notes": prepared.notes,
        "tmconvert_version": __version__,
        "torch_version": torch.__version__,
    }


def _log_values(out: LossOutput, dist: DistContext) -> tuple[float, dict[str, float]]:
    """Total and parts averaged over ranks (one collective)."""
    names = sorted(out.parts)
    stacked = torch.stack([out.total.detach().float(), *(out.parts[n].float() for n in names)])
    values = dist.mean(stacked).tolist()
    return values[0], dict(zip(names, values[1:], strict=True))


def run_distillation(
    prepared: PreparedRun,
    *,
    on_report: Callable[[StepReport], None] | None = None,
    on_note: Callable[[str], None] | None = None,
) -> DistillResult:
    """Train (fresh or resumed) until the recipe's steps are done or a stop condition hits; write the outputs.

    Trains on the device and processes `prepare_run` was given (`prepared.dist`)."""
    dist = prepared.dist
    start_time = time.perf_counter()
    recipe, request, paths = prepared.recipe, prepared.request, prepared.paths
    state, prepared.resume_state = prepared.resume_state, None
    torch.manual_seed(recipe.seed)  # projectors: the same on every rank
    loss = build_loss(recipe, prepared.student, prepared.teacher.config, prepared.pairs)
    trainer = Trainer(prepared.teacher.model, prepared.student, loss, recipe, dist, labelled=prepared.labelled)
    torch.manual_seed(recipe.seed + dist.rank)  # drop-path draws: one stream per rank
    if state is not None:
        trainer.load_state_dict(state)
        del state
    elif dist.is_main:
        paths.folder.mkdir(parents=True, exist_ok=True)
        for stale in (paths.checkpoint, paths.student, paths.sidecar):
            stale.unlink(missing_ok=True)  # --force: a new run must not leave the old one's results around
        write_text_atomic(paths.run, json.dumps(_run_record(prepared, dist, trainer), indent=2) + "\n")
        write_text_atomic(paths.recipe, recipe.to_yaml())
    dist.barrier()
    metrics = MetricsLog(paths.metrics, enabled=dist.is_main, resume_step=trainer.step if request.resume else None)
    notes = list(prepared.notes)
    for note in notes:
        if on_note is not None and dist.is_main:
            on_note(note)

    preprocess = Preprocess(prepared.input_spec, train=True, augment=recipe.data.augment, hflip=recipe.data.hflip,
                            scale=recipe.data.scale, pad=recipe.data.pad)  # fmt: skip
    dataset = ImageDataset(prepared.source, preprocess, seed=recipe.seed)
    batches: Iterator[tuple[torch.Tensor, torch.Tensor]] = train_batches(
        dataset,
        batch_per_rank=recipe.batch_size // dist.world,
        world=dist.world,
        rank=dist.rank,
        seed=recipe.seed,
        workers=min(recipe.data.workers, len(os.sched_getaffinity(0))),  # never more loaders than usable CPUs
        start_step=trainer.step,
        pin_memory=dist.device.type == "cuda",
    )
    total = recipe.steps
    loop_start = time.perf_counter()
    first_step, window_step, window_time = trainer.step, trainer.step, loop_start
    stopped = False

    def checkpoint() -> None:
        snapshot = trainer.state_dict()  # collective
        if dist.is_main:
            save_checkpoint(paths.checkpoint, snapshot, prepared.fingerprint, prepared.fingerprint_parts)
        dist.barrier()

    while trainer.step < total:
        images, labels = next(batches)
        result = trainer.train_step(images, labels if prepared.labelled else None)
        step = trainer.step
        stop_requested = request.stop_after is not None and step >= request.stop_after
        if step % recipe.run.log_every == 0 or step == total or stop_requested:
            loss_value, parts = _log_values(result.loss, dist)
            now = time.perf_counter()
            rate = (step - window_step) * recipe.batch_size / max(now - window_time, 1e-9)
            elapsed = now - start_time
            steps_per_s = (step - first_step) / max(now - loop_start, 1e-9)
            report = StepReport(
                step=step,
                total=total,
                lr=trainer.lr,
                loss=loss_value,
                parts=parts,
                similarities={k: [round(x, 5) for x in v.tolist()] for k, v in result.loss.similarities.items()},
                weights={k: [round(x, 4) for x in v.tolist()] for k, v in result.loss.weights.items()},
                grad_norm=float(result.grad_norm) if result.grad_norm is not None else None,
                images_per_second=rate,
                elapsed=elapsed,
                eta=(total - step) / steps_per_s if steps_per_s > 0 else math.inf,
            )
            window_step, window_time = step, now
            if dist.is_main:
                metrics.append(report.to_json())
                if on_report is not None:
                    on_report(report)
            if request.time_limit is not None:
                stop_requested = dist.any(stop_requested or elapsed >= request.time_limit)
        every = recipe.run.checkpoint_every
        if step == total or stop_requested or (every and step % every == 0):
            checkpoint()
        if stop_requested and step < total:
            stopped = True
            break

    finished = not stopped and trainer.step >= total
    final = metrics.last
    if finished and dist.is_main:
        cfg = prepared.student_config
        write_student(paths, trainer.student, cfg, student_metadata(prepared, trainer.step, final))
        metrics.append({"event": "done", "step": trainer.step, "student": str(paths.student)})
    dist.barrier()
    return DistillResult(paths, trainer.step, total, finished, prepared.fingerprint, final,
                         time.perf_counter() - start_time, notes)  # fmt: skip
