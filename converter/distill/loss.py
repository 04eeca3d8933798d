"""The stage-2 loss: task cross-entropy, logit KD, and adaptive multi-directional feature alignment.

Feature alignment (TransMamba; docs/method.md, "Stage 2"): for every paired (student layer i, teacher block b) and
every scan direction m, the direction's branch output (B, L, E), in its own scan order, goes through a projector to
the teacher width and is compared token by token, by cosine similarity, with the teacher's block-b output tokens put in
the same scan order. Token order is generic: teacher positions are first mapped to the student's layout (teacher cls
at 0, ViM cls in the middle; patches by raster position), then permuted by the direction's `scan_orders()` entry,
so ViM's forward/reversed pair or PlainMamba's zig-zags need no code here (`FeatureAlignment`). A hierarchical
student (VMamba: four stages on grids 56/28/14/7 at 224 px) pairs each block's four cross-scans with the teacher's
patch tokens on a common grid, pooled or interpolated (`GridFeatureAlignment`, `grids.py`).

Layer-wise adaptive weights: with c_i the mean cosine of pair i (detached, clamped to `min_similarity` so a layer
at or below zero similarity gets the largest weight instead of a negative or infinite one),
w_i = (Σ_j c_j) / c_i, normalised to mean 1 over the pairs — lower similarity, larger weight; no gradient flows
through the weights. Uniform weights (all 1) when adaptive is off. Per direction m:
L_m = mean_i w_i (1 − c_i); the feature loss is the mean of L_m over the directions aligned (the paper sums them;
the mean keeps the feature weight's meaning when a family has four directions, or one when directions are off).

Total: task · CE(label smoothing) + kd · T² · KL(teacher_T ‖ student_T) + feature · mean_m L_m.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from tmconvert.converter.distill.errors import RunError
from tmconvert.converter.distill.grids import GridMatch, common_grid
from tmconvert.models import TokenLayout

PROJECTOR_KINDS = ("auto", "identity", "pad", "linear", "mlp")
Reduce = Callable[[torch.Tensor], torch.Tensor]


# ---------------------------------------------------------------------------------------------------------------
# Pieces


def adaptive_weights(similarities: torch.Tensor, min_similarity: float = 0.05) -> torch.Tensor:
    """w_i = (Σ_j c_j) / c_i over the last axis, normalised to mean 1; c clamped to [min_similarity, 1]; detached."""
    c = similarities.detach().float().clamp(min=min_similarity, max=1.0)
    raw = c.sum(dim=-1, keepdim=True) / c
    return raw * (c.shape[-1] / raw.sum(dim=-1, keepdim=True))


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """T² · KL(softmax(teacher / T) ‖ softmax(student / T)), mean over the batch, in fp32."""
    t = temperature
    log_p_student = F.log_softmax(student_logits.float() / t, dim=-1)
    log_p_teacher = F.log_softmax(teacher_logits.float() / t, dim=-1)
    return F.kl_div(log_p_student, log_p_teacher, reduction="batchmean", log_target=True) * (t * t)


def token_alignment(student: TokenLayout, teacher: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
    """For each student sequence position, the teacher position holding the same token, and whether one exists
    (`TokenLayout.positions_in`). A student cls without a teacher cls (an average-pooled teacher) is left out of the
    loss; a teacher's dist token is unused."""
    try:
        return student.positions_in(teacher)
    except ValueError:
        raise RunError(
            f"student patch grid {student.grid[0]}x{student.grid[1]} differs from the teacher's "
            f"{teacher.grid[0]}x{teacher.grid[1]}: token features cannot be paired (same image and patch size needed)"
        ) from None


class MLPProjector(nn.Sequential):
    """Linear(E → D_t) → GELU → Linear(D_t → D_t). Zero-padding the input to D_t first (as the paper describes) would
    give the same function class, the padded columns never receiving gradient, so the padding is not materialised."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))


class ZeroPad(nn.Module):
    """Parameter-free: student features zero-padded to the teacher width (cosine against the first E channels)."""

    def __init__(self, out_dim: int):
        super().__init__()
        self.out_dim = out_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x, (0, self.out_dim - x.shape[-1]))


def make_projector(kind: str, in_dim: int, out_dim: int) -> nn.Module:
    """Student width → teacher width. `auto`: identity where the widths match, the MLP where they differ."""
    if kind not in PROJECTOR_KINDS:
        raise RunError(f"projector {kind!r}: choose one of {', '.join(PROJECTOR_KINDS)}")
    if kind == "auto":
        kind = "identity" if in_dim == out_dim else "mlp"
    if kind == "identity":
        if in_dim != out_dim:
            raise RunError(f"projector identity needs equal widths, student features are {in_dim}, teacher {out_dim}")
        return nn.Identity()
    if kind == "pad":
        if in_dim > out_dim:
            raise RunError(f"projector pad needs student width <= teacher width, got {in_dim} > {out_dim}")
        return ZeroPad(out_dim)
    if kind == "linear":
        return nn.Linear(in_dim, out_dim, bias=False)
    return MLPProjector(in_dim, out_dim)


def masked_token_cosine(student: torch.Tensor, teacher: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
    """Mean cosine similarity over the batch and the valid tokens of (B, L, D) features, in fp32."""
    cos = F.cosine_similarity(student.float(), teacher.float(), dim=-1, eps=1e-6)  # (B, L)
    if valid is None:
        return cos.mean()
    # a weighted mean rather than cos[:, valid]: boolean indexing would wait for the device (no CUDA-graph capture)
    mask = valid.to(cos.dtype)
    return (cos * mask).sum() / (mask.sum() * cos.shape[0])


# ---------------------------------------------------------------------------------------------------------------
# Feature alignment


@dataclass
class AlignmentOutput:
    loss: torch.Tensor
    similarities: dict[str, torch.Tensor]  # direction -> (pairs,) mean cosines (detached)
    weights: dict[str, torch.Tensor]  # direction -> (pairs,) the weights applied


class PairedAlignment(nn.Module):
    """What every student's alignment shares: the (student layer, teacher block) pairs, the directions aligned, one
    projector per pair (student width → teacher width, shared by the directions: they are branches of one mixer and
    are summed into the same `out_proj`, so they live in one space), and the adaptive weighting in `forward`.
    Subclasses say how a pair's tokens meet (`similarities`)."""

    def __init__(
        self,
        pairs: Sequence[tuple[int, int]],
        directions: Sequence[str],
        student_widths: Sequence[int],
        teacher_width: int,
        *,
        projector: str,
        adaptive: bool,
        multi_directional: bool,
        min_similarity: float,
    ):
        super().__init__()
        if not pairs:
            raise RunError("feature alignment needs at least one (student layer, teacher block) pair")
        self.pairs = [(int(s), int(t)) for s, t in pairs]
        names = list(directions)
        self.directions = names if multi_directional else names[:1]
        self.adaptive, self.min_similarity = adaptive, min_similarity
        self.projectors = nn.ModuleList(make_projector(projector, width, teacher_width) for width in student_widths)

    def similarities(
        self, student_directions: Sequence[Mapping[str, torch.Tensor]], teacher_layers: Sequence[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Per direction, the (pairs,) mean token cosines (with gradient)."""
        raise NotImplementedError

    def forward(
        self,
        student_directions: Sequence[Mapping[str, torch.Tensor]],
        teacher_layers: Sequence[torch.Tensor],
        reduce: Reduce | None = None,
    ) -> AlignmentOutput:
        """`student_directions[layer][name]`: (B, L, E) in scan order; `teacher_layers[block]`: (B, T, D).

        `reduce` averages the detached similarities over processes before the weights are computed, so every
        rank applies the same weights, the ones a single process would compute from the whole global batch.
        """
        losses, sims_out, weights_out = [], {}, {}
        for name, sims in self.similarities(student_directions, teacher_layers).items():
            observed = sims.detach()
            if reduce is not None:
                observed = reduce(observed)
            uniform = torch.ones_like(observed)
            weights = adaptive_weights(observed, self.min_similarity) if self.adaptive else uniform
            losses.append((weights * (1.0 - sims)).mean())
            sims_out[name], weights_out[name] = observed, weights
        return AlignmentOutput(torch.stack(losses).mean(), sims_out, weights_out)


class FeatureAlignment(PairedAlignment):
    """Adaptive multi-directional alignment of student branch outputs with teacher block outputs, for students whose
    every layer reads one token sequence (ViM, PlainMamba, VideoMamba).

    `pairs` are (student layer, teacher block); `scan_orders` is the student's {direction: (L,) token visited at
    each step}; `token_index` / `token_valid` come from `token_alignment`.
    """

    def __init__(
        self,
        pairs: Sequence[tuple[int, int]],
        scan_orders: Mapping[str, torch.Tensor],
        token_index: torch.Tensor,
        token_valid: torch.Tensor,
        *,
        student_width: int,
        teacher_width: int,
        projector: str = "auto",
        adaptive: bool = True,
        multi_directional: bool = True,
        min_similarity: float = 0.05,
    ):
        super().__init__(
            pairs,
            list(scan_orders),
            [student_width] * len(pairs),
            teacher_width,
            projector=projector,
            adaptive=adaptive,
            multi_directional=multi_directional,
            min_similarity=min_similarity,
        )
        all_valid = bool(token_valid.all())
        self._masked = not all_valid
        for name in self.directions:
            order = scan_orders[name].cpu()
            # step j of direction `name` visits student token order[j], held by teacher position token_index[order[j]]
            self.register_buffer(f"gather_{name}", token_index[order].clone(), persistent=False)
            self.register_buffer(f"valid_{name}", token_valid[order].clone(), persistent=False)

    def teacher_in_scan_order(self, teacher_tokens: torch.Tensor, direction: str) -> torch.Tensor:
        """(B, T, D) teacher tokens → (B, L, D): position j holds the teacher token the student visits at step j."""
        return teacher_tokens.index_select(1, getattr(self, f"gather_{direction}"))

    def similarities(
        self, student_directions: Sequence[Mapping[str, torch.Tensor]], teacher_layers: Sequence[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        """Per direction, the (pairs,) mean token cosines (with gradient)."""
        out = {}
        for name in self.directions:
            valid = getattr(self, f"valid_{name}") if self._masked else None
            out[name] = torch.stack(
                [
                    masked_token_cosine(
                        projector(student_directions[s_layer][name]),
                        self.teacher_in_scan_order(teacher_layers[t_block], name),
                        valid,
                    )
                    for projector, (s_layer, t_block) in zip(self.projectors, self.pairs, strict=True)
                ]
            )
        return out


class GridFeatureAlignment(PairedAlignment):
    """The same loss for a hierarchical student (VMamba): each pair's student block sits on its stage's grid and
    width, so each pair has its own projector width and its own `GridMatch` (`grids.py`: both grids brought to a
    common one by pooling or interpolation, tokens in each direction's scan order there).

    `stages[i]` is the stage of pair i's student block; `stage_grids[s]`, `stage_widths[s]` (its scan outputs'
    width E_s) and `stage_orders[s]` ({direction: (L_s,) raster token of each step}) describe stage s;
    `common_orders(grid)` gives the scan orders on any grid (the model's own `scan_orders`).
    """

    def __init__(
        self,
        pairs: Sequence[tuple[int, int]],
        stages: Sequence[int],
        *,
        stage_grids: Sequence[tuple[int, int]],
        stage_widths: Sequence[int],
        stage_orders: Sequence[Mapping[str, torch.Tensor]],
        common_orders: Callable[[tuple[int, int]], Mapping[str, torch.Tensor]],
        teacher_grid: tuple[int, int],
        teacher_patches: Sequence[int],
        teacher_width: int,
        grid: str,
        projector: str = "auto",
        adaptive: bool = True,
        multi_directional: bool = True,
        min_similarity: float = 0.05,
    ):
        stages = [int(stage) for stage in stages]
        super().__init__(
            pairs,
            list(stage_orders[0]),
            [stage_widths[stage] for stage in stages],
            teacher_width,
            projector=projector,
            adaptive=adaptive,
            multi_directional=multi_directional,
            min_similarity=min_similarity,
        )
        self.stages = stages
        patches = torch.tensor(list(teacher_patches), dtype=torch.long)
        matches = {}
        for stage in sorted(set(self.stages)):
            orders = {name: stage_orders[stage][name] for name in self.directions}
            common = common_grid(tuple(stage_grids[stage]), tuple(teacher_grid), grid)
            common_order = {name: common_orders(common)[name] for name in self.directions}
            matches[str(stage)] = GridMatch(stage_grids[stage], orders, teacher_grid, patches, common_order, grid)
        self.matches = nn.ModuleDict(matches)

    def teacher_in_scan_order(self, teacher_tokens: torch.Tensor, direction: str, stage: int = 0) -> torch.Tensor:
        """(B, T, D) teacher tokens → (B, L_c, D) on stage `stage`'s common grid, in `direction`'s scan order there."""
        match = self.matches[str(stage)]
        return match.teacher_in_scan_order(teacher_tokens, match.teacher_common(teacher_tokens), direction)

    def similarities(
        self, student_directions: Sequence[Mapping[str, torch.Tensor]], teacher_layers: Sequence[torch.Tensor]
    ) -> dict[str, torch.Tensor]:
        commons: dict[tuple[int, int], torch.Tensor | None] = {}  # a teacher block resampled once per stage
        for stage, (_, t_block) in zip(self.stages, self.pairs, strict=True):
            if (stage, t_block) not in commons:
                commons[stage, t_block] = self.matches[str(stage)].teacher_common(teacher_layers[t_block])
        out: dict[str, list[torch.Tensor]] = {name: [] for name in self.directions}
        for projector, stage, (s_layer, t_block) in zip(self.projectors, self.stages, self.pairs, strict=True):
            match = self.matches[str(stage)]
            for name in self.directions:
                student = match.student_in_scan_order(student_directions[s_layer][name], name, projector)
                teacher = match.teacher_in_scan_order(teacher_layers[t_block], commons[stage, t_block], name)
                out[name].append(masked_token_cosine(student, teacher, None))
        return {name: torch.stack(sims) for name, sims in out.items()}


# ---------------------------------------------------------------------------------------------------------------
# The whole loss


@dataclass
class LossOutput:
    total: torch.Tensor
    parts: dict[str, torch.Tensor] = field(default_factory=dict)  # task / kd / feature, detached, unweighted
    similarities: dict[str, torch.Tensor] = field(default_factory=dict)
    weights: dict[str, torch.Tensor] = field(default_factory=dict)


class DistillationLoss(nn.Module):
    """task · CE + kd · KD + feature · alignment; a piece with weight 0 is not computed (ablations)."""

    def __init__(
        self,
        *,
        task: float,
        kd: float,
        feature: float,
        label_smoothing: float = 0.1,
        temperature: float = 2.0,
        alignment: PairedAlignment | None = None,
    ):
        super().__init__()
        if feature > 0 and alignment is None:
            raise ValueError("a feature weight > 0 needs a feature alignment")
        self.task, self.kd, self.feature = task, kd, feature
        self.label_smoothing, self.temperature = label_smoothing, temperature
        self.alignment = alignment if feature > 0 else None

    @property
    def needs_directions(self) -> bool:
        return self.alignment is not None

    def forward(
        self,
        student_logits: torch.Tensor,
        student_directions: Sequence[Mapping[str, torch.Tensor]] | None,
        teacher_logits: torch.Tensor,
        teacher_layers: Sequence[torch.Tensor],
        labels: torch.Tensor | None,
        reduce: Reduce | None = None,
    ) -> LossOutput:
        """`labels` None (unlabelled data) turns the task loss off."""
        total = student_logits.new_zeros((), dtype=torch.float32)
        out = LossOutput(total)
        if self.task > 0 and labels is not None:
            ce = F.cross_entropy(student_logits.float(), labels, label_smoothing=self.label_smoothing)
            total = total + self.task * ce
            out.parts["task"] = ce.detach()
        if self.kd > 0:
            kd = kd_loss(student_logits, teacher_logits, self.temperature)
            total = total + self.kd * kd
            out.parts["kd"] = kd.detach()
        if self.alignment is not None:
            if student_directions is None:
                raise ValueError("feature alignment needs the student's per-direction branch outputs")
            aligned = self.alignment(student_directions, teacher_layers, reduce)
            total = total + self.feature * aligned.loss
            out.parts["feature"] = aligned.loss.detach()
            out.similarities, out.weights = aligned.similarities, aligned.weights
        out.total = total
        return out
