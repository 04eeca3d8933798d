"""One optimisation step of the student (and projectors) against a frozen teacher, and its resumable state.

AdamW with warm-up + cosine, gradient clipping, bf16 autocast on CUDA, DistributedDataParallel under torchrun, and
on a single CUDA process the whole step captured once and replayed as a CUDA graph.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from tmconvert.converter.distill.families import TeacherTargets, feature_alignment
from tmconvert.converter.distill.loss import DistillationLoss, LossOutput
from tmconvert.converter.distill.processes import DistContext
from tmconvert.converter.distill.recipe import Recipe
from tmconvert.converter.errors import ConfigError
from tmconvert.models import VisionTransformer, ViTConfig


class StudentWithLoss(nn.Module):
    """The trainable part (student + projectors) as one module, so DistributedDataParallel syncs both. The student
    is any Mamba family with `forward_all(inputs, return_directions=)` (ViM, PlainMamba, VideoMamba, VMamba)."""

    def __init__(self, student: nn.Module, loss: DistillationLoss):
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
    recipe: Recipe,
    student: nn.Module,
    teacher_cfg: ViTConfig,
    pairs: list[tuple[int, int]],
    frames: int | None = None,
) -> DistillationLoss:
    """The recipe's loss for this student/teacher pair on images (`frames` None) or clips of `frames` frames
    (projectors drawn from torch's current RNG)."""
    spec = recipe.loss
    alignment = feature_alignment(student, teacher_cfg, pairs, frames, spec) if spec.feature > 0 else None
    return DistillationLoss(
        task=spec.task,
        kd=spec.kd,
        feature=spec.feature,
        label_smoothing=spec.label_smoothing,
        temperature=spec.temperature,
        alignment=alignment,
    )


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
    """The distillation's LR factor per step (`optim`)."""
    opt = recipe.optim
    return warmup_cosine(recipe.steps, opt.lr, opt.warmup_fraction, opt.min_lr)


def warmup_cosine(total: int, lr: float, warmup_fraction: float, min_lr: float) -> Callable[[int], float]:
    """LR factor per step: linear warm-up over `warmup_fraction` of the steps, then cosine down to `min_lr`."""
    warmup = round(warmup_fraction * total)
    floor = min(min_lr / lr, 1.0)

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
        student: nn.Module,
        loss: DistillationLoss,
        recipe: Recipe,
        dist: DistContext | None = None,
        *,
        labelled: bool = True,
        start_step: int = 0,
        targets: TeacherTargets | None = None,
    ):
        self.dist = dist or DistContext()
        device = self.dist.device
        self.recipe = recipe
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.targets = targets or TeacherTargets(teacher.cfg)  # images as they are, clips frame by frame
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
        self.step = start_step  # global: a run that aligned its layers first distils from step align.steps on
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
    def student(self) -> nn.Module:
        return self.module.student

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def _compute(self, images: torch.Tensor, labels: torch.Tensor | None, zero_grad: bool = True) -> StepResult:
        """Forward, backward, clipping and the AdamW update on batches already on the device."""
        device = self.dist.device
        autocast = {"dtype": torch.bfloat16, "enabled": self.amp, "cache_enabled": not self.cuda_graph}
        with torch.no_grad(), torch.autocast(device.type, **autocast):
            teacher_logits, teacher_layers = self.targets(self.teacher, images)
        with torch.autocast(device.type, **autocast):
            loss = self.model(images, teacher_logits, teacher_layers, labels, self._reduce)
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
