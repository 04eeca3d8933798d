"""How a student family's sequence meets an image teacher's tokens: where each student token's teacher token is, the
scan orders of the sequence the student reads, and the teacher's targets for images or clips.

Images (ViM, PlainMamba, VideoMamba as a one-frame clip): the teacher runs on the batch; its tokens line up with the
student's through the two token layouts (`TokenLayout.positions_in`: patches by raster position, cls with cls, a
student cls the teacher lacks left out — PlainMamba has no cls, so every one of its tokens is a patch).

Clips (VideoMamba only): the image teacher runs on every frame (B·T images). KD compares with its logits averaged
over the frames. Its per-block tokens become one *teacher clip sequence* (B, T'·N [+ 1], D): the frames' token
sequences one after the other (T' time steps of N teacher tokens; with a tubelet of k frames per time step, the mean
of those k frames' tokens), then, when the teacher has a cls, the frames' mean cls. Student token (time step t, patch
p), at `frame_patch_indices()[t, p]`, pairs with teacher position t·N + (the teacher's index of patch p); the
student's cls (at 0) pairs with the frames' mean cls: the clip-level summary the student's head reads, and for one
frame exactly the image pairing. Teacher dist and register tokens are unused, as for images.

Hierarchical students (VMamba; a config with `block_stages()`): blocks are numbered over all stages (`layer_tokens`
and `directions` are per block), so a pair is (student block, teacher block) and `even` spreads the teacher's blocks
over all the student's blocks in order, exactly as for a plain stack (VMamba-T's 2+2+8+2 blocks against 12: blocks
0-4, 6-11 and 13). Each block's four cross-scans sit on its stage's grid at its stage's width: a pair gets its own
projector (E_s → D) and a common grid with the teacher's patch tokens (`grids.py`, `loss.grid`); the teacher's cls
has no counterpart.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tmconvert.converter.distill.errors import RunError
from tmconvert.converter.distill.grids import common_grid
from tmconvert.converter.distill.loss import FeatureAlignment, GridFeatureAlignment, PairedAlignment, token_alignment
from tmconvert.converter.distill.recipe import LossRecipe
from tmconvert.models import ModelConfigError, ViTConfig, config_type, families, family_of


def reads_clips(cfg: Any) -> bool:
    """Whether a model of this config reads (B, C, T, H, W) clips: its config class says so (`reads_clips`)."""
    return bool(getattr(type(cfg), "reads_clips", False))


def clip_families() -> list[str]:
    """The registered families whose models read clips (for messages)."""
    return [name for name in families() if getattr(config_type(name), "reads_clips", False)]


def time_steps(student_cfg: Any, frames: int | None, option: str) -> int:
    """Temporal tokens of the student's sequence: 1 for images, frames // tubelet for clips (RunError naming `option`
    when the student reads no clips, or the frames — one for an image — do not fill its tubelets)."""
    if not reads_clips(student_cfg):
        if frames is not None:
            raise RunError(
                f"{option}: clips need a video student ({', '.join(clip_families())}), "
                f"this one is a {family_of(student_cfg)}"
            )
        return 1
    try:
        return student_cfg.time_steps(frames or 1)  # images are one-frame clips
    except ModelConfigError as exc:
        raise RunError(f"{option}: {exc}") from None


def is_hierarchical(cfg: Any) -> bool:
    """Whether the student's blocks sit on stages of different grids and widths (its config has `block_stages()`)."""
    return callable(getattr(cfg, "block_stages", None))


def student_depth(cfg: Any) -> int:
    """The student's pairable layers: its blocks over all stages for a hierarchical student, else its layers."""
    return len(cfg.block_stages()) if is_hierarchical(cfg) else cfg.depth


def pair_table(
    student_cfg: Any, teacher_cfg: ViTConfig, pairs: list[tuple[int, int]], grid: str
) -> list[dict[str, Any]]:
    """Per pair of a hierarchical student: its stage, the stage grid and width, the teacher grid and width, and the
    common grid the tokens meet on (`grids.common_grid`; a `GridError` naming `loss.grid` when they cannot)."""
    stages, grids = student_cfg.block_stages(), student_cfg.stage_grids()
    teacher_grid = tuple(teacher_cfg.token_layout().grid)
    rows = []
    for layer, block in pairs:
        stage = stages[layer]
        rows.append(
            {
                "layer": layer,
                "block": block,
                "stage": stage,
                "student_grid": list(grids[stage]),
                "student_width": student_cfg.d_inner(stage),
                "teacher_grid": list(teacher_grid),
                "teacher_width": teacher_cfg.embed_dim,
                "common_grid": list(common_grid(tuple(grids[stage]), teacher_grid, grid)),
            }
        )
    return rows


def check_feature_pairs(
    student_cfg: Any, teacher_cfg: ViTConfig, pairs: list[tuple[int, int]], frames: int | None, grid: str
) -> list[dict[str, Any]] | None:
    """Whether the feature loss can pair these tokens (before anything is written): single-grid students need the
    teacher's patch grid; a hierarchical student's pairs need a common grid. Returns the pair table of a
    hierarchical student (None for the others)."""
    if is_hierarchical(student_cfg):
        return pair_table(student_cfg, teacher_cfg, pairs, grid)
    student_token_alignment(student_cfg, teacher_cfg, frames)
    return None


def feature_alignment(
    student: nn.Module, teacher_cfg: ViTConfig, pairs: list[tuple[int, int]], frames: int | None, spec: LossRecipe
) -> PairedAlignment:
    """The recipe's feature alignment for this student (projectors drawn from torch's current RNG)."""
    options = {
        "projector": spec.projector,
        "adaptive": spec.adaptive,
        "multi_directional": spec.multi_directional,
        "min_similarity": spec.min_similarity,
    }
    cfg = student.cfg
    if is_hierarchical(cfg):
        teacher = teacher_cfg.token_layout()
        stages = cfg.block_stages()
        return GridFeatureAlignment(
            pairs,
            [stages[layer] for layer, _ in pairs],
            stage_grids=cfg.stage_grids(),
            stage_widths=[cfg.d_inner(s) for s in range(cfg.num_stages)],
            stage_orders=[student.scan_orders(s) for s in range(cfg.num_stages)],
            common_orders=lambda grid: student.scan_orders(grid=grid),
            teacher_grid=teacher.grid,
            teacher_patches=teacher.patch_indices,
            teacher_width=teacher_cfg.embed_dim,
            grid=spec.grid,
            **options,
        )
    index, valid = student_token_alignment(cfg, teacher_cfg, frames)
    return FeatureAlignment(
        pairs,
        student_scan_orders(student, frames),
        index,
        valid,
        student_width=cfg.d_inner,
        teacher_width=teacher_cfg.embed_dim,
        **options,
    )


def student_token_alignment(
    student_cfg: Any, teacher_cfg: ViTConfig, frames: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """For each position of the student's sequence, its token's position in the teacher sequence (images: the
    teacher's own; clips: the teacher clip sequence, see the module docstring), and whether it has one."""
    teacher = teacher_cfg.token_layout()
    if not reads_clips(student_cfg):
        return token_alignment(student_cfg.token_layout(), teacher)
    steps = time_steps(student_cfg, frames, "--data")
    one_step = token_alignment(student_cfg.token_layout(student_cfg.tubelet), teacher)  # checks the frame grid
    if frames is None:
        return one_step
    layout = student_cfg.token_layout(frames)
    index = torch.zeros(layout.seq_len, dtype=torch.long)
    valid = torch.zeros(layout.seq_len, dtype=torch.bool)
    patches = torch.tensor(teacher.patch_indices)
    for t, positions in enumerate(student_cfg.frame_patch_indices(frames)):
        index[positions], valid[positions] = t * teacher.seq_len + patches, True
    if layout.cls_index is not None and teacher.cls_index is not None:
        index[layout.cls_index], valid[layout.cls_index] = steps * teacher.seq_len, True
    return index, valid


def student_scan_orders(student: nn.Module, frames: int | None = None) -> dict[str, torch.Tensor]:
    """The student's {direction: token visited at each step} for the sequence it reads (a video student on images
    reads one-frame clips)."""
    if reads_clips(student.cfg):
        return student.scan_orders(frames or 1)
    return student.scan_orders()


class TeacherTargets:
    """The frozen image teacher's logits and per-block tokens for a batch of images (as they are) or clips (per
    frame, then as the teacher clip sequence the alignment indexes; see the module docstring)."""

    def __init__(self, teacher_cfg: ViTConfig, tubelet: int = 1):
        self.cls_index, self.tubelet = teacher_cfg.token_layout().cls_index, tubelet

    @classmethod
    def for_student(cls, teacher_cfg: ViTConfig, student_cfg: Any) -> TeacherTargets:
        """Targets a student of this config reads: a video student groups frames by its tubelet."""
        return cls(teacher_cfg, student_cfg.tubelet if reads_clips(student_cfg) else 1)

    def __call__(self, teacher: nn.Module, inputs: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if inputs.dim() == 4:
            out = teacher.forward_all(inputs)
            return out.logits, list(out.layer_tokens)
        batch, channels, frames, height, width = inputs.shape
        out = teacher.forward_all(inputs.transpose(1, 2).reshape(batch * frames, channels, height, width))
        logits = out.logits.view(batch, frames, -1).mean(dim=1)
        return logits, [self.clip_sequence(tokens, batch) for tokens in out.layer_tokens]

    def clip_sequence(self, tokens: torch.Tensor, batch: int) -> torch.Tensor:
        """(B·T, N, D) per-frame tokens → (B, T'·N [+ 1], D): time steps (tubelet means) in order, then the mean cls."""
        _, count, width = tokens.shape
        steps = tokens.reshape(batch, -1, self.tubelet, count, width).mean(dim=2)  # (B, T', N, D)
        sequence = steps.flatten(1, 2)
        if self.cls_index is None:
            return sequence
        return torch.cat([sequence, steps[:, :, self.cls_index].mean(dim=1, keepdim=True)], dim=1)
