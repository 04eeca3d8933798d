"""Layer-wise alignment ("stage 1.5", MOHAWK's hidden-state alignment): before distillation, every inherited student
layer learns, all of them in parallel, to do the work of the teacher sub-layer it replaces, on the teacher's stream.

What a layer replaces comes from the converted file's `layer_plan` (`layer_pairings`): `block` (teacher block b;
input the stream entering b, target b's output), `attn` (b's attention sub-layer; input the stream entering b,
target `mid`, the stream after attention) or `mlp` (b's MLP sub-layer; input `mid`, target b's output). A missing
`sublayer` is `block` (files written before interleaved plans); a layer whose block is null is not aligned.

Each step runs the frozen teacher once (no_grad; nothing is cached across steps), puts its streams in the student's
token order (`loss.token_alignment`: ViM's cls in the middle, register and dist tokens dropped) and keeps the
student's residual channels (the file's `residual` index set), feeds each layer the teacher's input x and compares
updates: loss_j = ||Δs − Δt||² / ||Δt||² with Δs = layer_j(x) − x and Δt = target − x, summed over an image's tokens
and channels and averaged over images (a per-token ratio would let tokens whose teacher update is near zero
dominate); the loss is the mean over the aligned layers. Only the aligned layers train, with their own AdamW and
warm-up + cosine, in eval mode (no drop path: a dropped sample has no update to compare). The layers are called
outside any DDP wrapper, so under torchrun their gradients are averaged over the ranks explicitly. Steps are eager
(no CUDA graphs).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from tmconvert.converter.distill.errors import RunError
from tmconvert.converter.distill.loss import masked_token_cosine, token_alignment
from tmconvert.converter.distill.processes import DistContext
from tmconvert.converter.distill.recipe import Recipe
from tmconvert.converter.distill.trainer import resolve_amp, warmup_cosine
from tmconvert.models import VisionMamba, VisionTransformer, ViTConfig, ViTOutput

SUBLAYERS = ("block", "attn", "mlp")
RESIDUAL_SET = "residual"  # the converted file's index set of kept residual channels


@dataclass(frozen=True)
class LayerPairing:
    """Student layer `layer` does the work of teacher block `block`'s `sublayer` (block, attn or mlp)."""

    layer: int
    block: int
    sublayer: str = "block"

    def to_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "block": self.block, "sublayer": self.sublayer}


def layer_pairings(metadata: Mapping[str, Any]) -> list[LayerPairing]:
    """The layer plan's entries that have a teacher block, in plan order; a missing `sublayer` means `block`."""
    plan = metadata.get("layer_plan") or []
    if not isinstance(plan, list):
        raise RunError("the student's layer_plan is not a list of {layer, block, sublayer} entries")
    pairings = []
    for entry in plan:
        if not isinstance(entry, dict):
            raise RunError(f"the student's layer plan: entry {entry!r} is not a {{layer, block, sublayer}} object")
        if entry.get("block") is None:
            continue
        layer, block, sublayer = entry.get("layer"), entry["block"], entry.get("sublayer", "block")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (layer, block)):
            raise RunError(f"the student's layer plan: entry {entry!r}: layer and block must be integers")
        if sublayer not in SUBLAYERS:
            raise RunError(
                f"the student's layer plan: layer {layer}: sublayer {sublayer!r} is not one of {', '.join(SUBLAYERS)}"
            )
        pairings.append(LayerPairing(layer, block, sublayer))
    return pairings


def teacher_streams(teacher: ViTOutput, pairing: LayerPairing) -> tuple[torch.Tensor, torch.Tensor]:
    """(input, target) of the paired teacher sub-layer, in the teacher's token order and width."""
    b = pairing.block
    entering = teacher.embed_tokens if b == 0 else teacher.layer_tokens[b - 1]
    if pairing.sublayer == "attn":
        return entering, teacher.mid_tokens[b]
    if pairing.sublayer == "mlp":
        return teacher.mid_tokens[b], teacher.layer_tokens[b]
    return entering, teacher.layer_tokens[b]


def kept_channels(metadata: Mapping[str, Any], student_width: int, teacher_width: int, option: str) -> list[int] | None:
    """The teacher residual channels the student kept (the `residual` index set); None for the same width without one.

    Without it a narrower student's stream has no known relation to the teacher's, and alignment is impossible."""
    index_sets = metadata.get("index_sets")
    residual = index_sets.get(RESIDUAL_SET) if isinstance(index_sets, dict) else None
    if residual is None:
        if student_width == teacher_width:
            return None
        raise RunError(
            f"{option}: the student's residual width {student_width} differs from the teacher's {teacher_width} and "
            f"its file names no kept channels (index set '{RESIDUAL_SET}'), so its layers cannot read the teacher's "
            "stream; set align.steps=0"
        )
    indices = residual.get("indices", {}).get("None") if isinstance(residual, dict) else None
    if (
        not isinstance(indices, list)
        or len(indices) != student_width
        or not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i < teacher_width for i in indices)
    ):
        raise RunError(
            f"{option}: the student's index set '{RESIDUAL_SET}' does not list {student_width} teacher channels "
            f"(0..{teacher_width - 1})"
        )
    return indices


@dataclass(frozen=True)
class AlignmentPlan:
    """What the phase aligns: the pairings, the kept teacher channels, and where each student token sits in the
    teacher's sequence (`token_alignment`)."""

    pairings: list[LayerPairing]
    channels: list[int] | None
    token_index: torch.Tensor
    token_valid: torch.Tensor


def plan_alignment(
    metadata: Mapping[str, Any], origin: str, student_cfg: Any, teacher_cfg: ViTConfig, steps: int
) -> AlignmentPlan:
    """Check before the run writes anything that the student's layers can be aligned; RunError naming align.steps."""
    option = f"align.steps={steps}"
    pairings = layer_pairings(metadata)
    if not pairings:
        raise RunError(
            f"{option}: the student {origin} has no layer plan pairing its layers with teacher blocks (a from-scratch "
            "student?); alignment needs a converted student, or set align.steps=0"
        )
    seen: set[int] = set()
    for p in pairings:
        if not 0 <= p.layer < student_cfg.depth or p.layer in seen:
            problem = "twice" if p.layer in seen else f"but the student has layers 0..{student_cfg.depth - 1}"
            raise RunError(f"{option}: the student's layer plan pairs layer {p.layer} {problem}")
        if not 0 <= p.block < teacher_cfg.depth:
            raise RunError(
                f"{option}: the student's layer plan pairs layer {p.layer} with teacher block {p.block}; "
                f"the teacher has blocks 0..{teacher_cfg.depth - 1}"
            )
        seen.add(p.layer)
    channels = kept_channels(metadata, student_cfg.embed_dim, teacher_cfg.embed_dim, option)
    index, valid = token_alignment(student_cfg.token_layout(), teacher_cfg.token_layout())
    return AlignmentPlan(pairings, channels, index, valid)


def relative_update_error(
    student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """||Δs − Δt||² / ||Δt||² of (B, L, D) updates, sums over each image's valid tokens and channels, mean over
    images, in fp32."""
    error = (student.float() - teacher.float()).pow(2).sum(-1)  # (B, L)
    reference = teacher.float().pow(2).sum(-1)
    if valid is not None:
        mask = valid.to(error.dtype)
        error, reference = error * mask, reference * mask
    return (error.sum(1) / reference.sum(1).clamp_min(1e-12)).mean()


@dataclass
class AlignOutput:
    loss: torch.Tensor  # mean over the aligned layers
    layer_loss: torch.Tensor  # (layers,) detached
    update_cosine: torch.Tensor  # (layers,) mean token cosine of Δs and Δt
    output_cosine: torch.Tensor  # (layers,) mean token cosine of the layer's output and the target


class LayerAlignment(nn.Module):
    """The aligned student layers (shared with the student) and the phase's loss: everything that trains in it."""

    def __init__(self, student: VisionMamba, plan: AlignmentPlan):
        super().__init__()
        self.pairings = plan.pairings
        self.layers = nn.ModuleList(student.layers[p.layer] for p in plan.pairings)
        self._masked = not bool(plan.token_valid.all())
        self._select = plan.channels is not None
        self.register_buffer("token_index", plan.token_index.clone(), persistent=False)
        self.register_buffer("token_valid", plan.token_valid.clone(), persistent=False)
        self.register_buffer("channels", torch.tensor(plan.channels or [], dtype=torch.long), persistent=False)

    def student_view(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, T, D_teacher) teacher stream → (B, L, D_student) in fp32: the student's token order and channels; a
        student token without a teacher counterpart (a cls the teacher lacks) is zero."""
        x = tokens.index_select(1, self.token_index)
        if self._select:
            x = x.index_select(2, self.channels)
        x = x.float()
        return x * self.token_valid[:, None] if self._masked else x

    def forward(self, teacher: ViTOutput) -> AlignOutput:
        valid = self.token_valid if self._masked else None
        losses, update_cosine, output_cosine = [], [], []
        for layer, pairing in zip(self.layers, self.pairings, strict=True):
            source, target = (self.student_view(t) for t in teacher_streams(teacher, pairing))
            output, _ = layer(source)
            student_update, teacher_update = output - source, target - source
            losses.append(relative_update_error(student_update, teacher_update, valid))
            update_cosine.append(masked_token_cosine(student_update.detach(), teacher_update, valid))
            output_cosine.append(masked_token_cosine(output.detach(), target, valid))
        per_layer = torch.stack(losses)
        return AlignOutput(per_layer.mean(), per_layer.detach(), torch.stack(update_cosine), torch.stack(output_cosine))


@dataclass
class AlignStep:
    out: AlignOutput
    grad_norm: torch.Tensor | None


class AlignmentTrainer:
    """The phase's steps (global steps 0..align.steps) and resumable state: the aligned layers' AdamW and schedule,
    and the phase's first and latest measurements (its summary)."""

    def __init__(
        self,
        teacher: VisionTransformer,
        student: VisionMamba,
        plan: AlignmentPlan,
        recipe: Recipe,
        dist: DistContext | None = None,
    ):
        self.dist = dist or DistContext()
        device = self.dist.device
        spec = self.spec = recipe.align
        self.teacher = teacher.to(device).eval().requires_grad_(False)
        self.student = student.to(device)
        self.module = LayerAlignment(self.student, plan).to(device).eval()
        self.params = list(self.module.parameters())
        skip = {id(p) for name, p in student.named_parameters() if name in student.no_weight_decay()}
        decay = [p for p in self.params if p.ndim >= 2 and id(p) not in skip]
        no_decay = [p for p in self.params if p.ndim < 2 or id(p) in skip]
        self.optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": spec.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=spec.lr,
            betas=recipe.optim.betas,
            eps=recipe.optim.eps,
        )
        schedule = warmup_cosine(spec.steps, spec.lr, spec.warmup_fraction, spec.min_lr)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, schedule)
        self.amp = resolve_amp(recipe.run.amp, device)
        self.step = 0
        self.first: dict[str, Any] | None = None  # measured at step 1, before any update
        self.last: dict[str, Any] | None = None  # the latest measurement

    @property
    def pairings(self) -> list[LayerPairing]:
        return self.module.pairings

    @property
    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"])

    def train_step(self, images: torch.Tensor, labels: torch.Tensor | None = None) -> AlignStep:
        """One step on a batch; `labels` are not used (the targets are the teacher's streams)."""
        device = self.dist.device
        images = images.to(device, non_blocking=True)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=self.amp):
            with torch.no_grad():
                teacher_out = self.teacher.forward_all(images)
            out = self.module(teacher_out)
        self.optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        out.loss = out.loss.detach()
        if self.dist.distributed:
            self._average_gradients()
        grad_norm = None
        if self.spec.grad_clip > 0:
            grad_norm = nn.utils.clip_grad_norm_(self.params, self.spec.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        result = AlignStep(out, grad_norm)
        if self.step == 0:
            self.first = self.measure(result)
        self.step += 1
        return result

    def _average_gradients(self) -> None:
        """Every aligned parameter's gradient averaged over the ranks (one collective), as DDP would."""
        grads = [p.grad for p in self.params if p.grad is not None]
        flat = self.dist.mean(torch.cat([g.reshape(-1) for g in grads]))
        offset = 0
        for g in grads:
            g.copy_(flat[offset : offset + g.numel()].view_as(g))
            offset += g.numel()

    def measure(self, result: AlignStep) -> dict[str, Any]:
        """Loss and per-layer values averaged over ranks (a collective): what metrics and the summary record."""
        out = result.out
        stacked = torch.cat([out.loss.float().reshape(1), out.layer_loss, out.update_cosine, out.output_cosine])
        values = self.dist.mean(stacked.detach().float()).tolist()
        n = len(self.pairings)
        self.last = {
            "loss": values[0],
            "layer_loss": [round(x, 5) for x in values[1 : 1 + n]],
            "update_cosine": [round(x, 5) for x in values[1 + n : 1 + 2 * n]],
            "output_cosine": [round(x, 5) for x in values[1 + 2 * n :]],
        }
        return self.last

    def summary(self) -> dict[str, Any]:
        """What the phase did: steps, pairings, and the measurements at its first and last step."""
        return {
            "steps": self.step,
            "pairs": [p.to_json() for p in self.pairings],
            "first": self.first,
            "final": self.last,
        }

    def state_dict(self) -> dict[str, Any]:
        """A run checkpoint taken in this phase (no RNG state: the phase draws no random numbers)."""
        return {
            "phase": "align",
            "step": self.step,
            "student": {k: v.detach().cpu() for k, v in self.student.state_dict().items()},
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "first": self.first,
            "last": self.last,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.student.load_state_dict(state["student"], strict=True)
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.step = int(state["step"])
        self.first, self.last = state["first"], state["last"]
