"""Where a hierarchical student's stage tokens meet the teacher's patch tokens: two grids brought to one.

A VMamba reads 224 px images on stage grids 56, 28, 14 and 7 (patch 4, then a stride-2 merge per stage); a ViT/16
teacher has one 14x14 patch grid (8x8 for a /14 teacher at 112 px). A pair (student block of stage s, teacher block)
compares tokens on a *common grid*, chosen by the recipe's `loss.grid` (default `DEFAULT_GRID_MATCH`):

- `pool`: the finer grid is average-pooled down to the coarser one, each side by whole windows (a student token of
  stage 0 at 224 px is the mean of its 4x4 tokens under one teacher patch; at stage 3 a teacher token is the mean of the
  2x2 patches under one student token). Every side of the finer grid must be a multiple of the coarser one's, else the
  pair is refused (`GridError`): 28 px images give stage grids 7, 4, 2, 1 against a 7x7 teacher grid.
- `interpolate`: the coarser grid is resampled up to the finer one (bilinear, half-pixel centres, as
  `F.interpolate(..., align_corners=False)`): any pair of grids works.

Per axis the common side is the smaller (`pool`) or larger (`interpolate`) of the two; equal grids are left alone. A
student's projector (its width to the teacher's) runs on the coarser of its own grid and the common grid: after
pooling, before interpolating up (the same function for `identity`, `pad` and `linear` projectors, the cheap order
for the `mlp`).

Scan order on the common grid. Each of the student's four cross-scans k outputs (B, L_s, E) in its own order on its
stage grid (`scan_orders(grid)[k][j]` is the raster token of step j). A student side that is resampled is put back in
raster order, resampled, then put in scan k's order *on the common grid*; the teacher's patch tokens, resampled to
the common grid, are put in the same order. A student side already on the common grid is compared as it is, with the
teacher's tokens gathered into its scan order (exactly how single-grid students pair). The teacher's cls, dist and
register tokens have no student counterpart (VMamba has no cls; KD reads the head's logits).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from tmconvert.converter.distill.errors import RunError
from tmconvert.converter.distill.recipe import DEFAULT_GRID_MATCH, GRID_MATCHES

__all__ = ["DEFAULT_GRID_MATCH", "GRID_MATCHES", "GridError", "GridMatch", "common_grid", "resample"]
Grid = tuple[int, int]


class GridError(RunError):
    """A student stage grid and the teacher's patch grid that the chosen grid match cannot bring together."""


def common_grid(student: Grid, teacher: Grid, mode: str) -> Grid:
    """The grid a pair is compared on: per axis the smaller side (`pool`, which must then divide the larger one) or
    the larger (`interpolate`)."""
    if mode not in GRID_MATCHES:
        raise GridError(f"loss.grid {mode!r}: choose one of {', '.join(GRID_MATCHES)}")
    if mode == "interpolate":
        return (max(student[0], teacher[0]), max(student[1], teacher[1]))
    grid = (min(student[0], teacher[0]), min(student[1], teacher[1]))
    if any(max(s, t) % c for s, t, c in zip(student, teacher, grid, strict=True)):
        raise GridError(
            f"loss.grid pool: student grid {student[0]}x{student[1]} and teacher grid {teacher[0]}x{teacher[1]} "
            "are not whole multiples of one another (set loss.grid=interpolate)"
        )
    return grid


def resample(tokens: torch.Tensor, grid: Grid, to: Grid, mode: str) -> torch.Tensor:
    """(B, H·W, C) tokens in raster order on `grid` → (B, h·w, C) raster on `to`: whole-window average pooling
    (`pool`, sides must divide) or bilinear resampling (`interpolate`, half-pixel centres)."""
    if tuple(grid) == tuple(to):
        return tokens
    image = tokens.unflatten(1, tuple(grid)).permute(0, 3, 1, 2)  # (B, C, H, W)
    if mode == "pool":
        if grid[0] % to[0] or grid[1] % to[1]:
            raise GridError(f"cannot pool a {grid[0]}x{grid[1]} grid to {to[0]}x{to[1]} by whole windows")
        image = F.avg_pool2d(image, kernel_size=(grid[0] // to[0], grid[1] // to[1]))
    else:
        image = F.interpolate(image, size=tuple(to), mode="bilinear", align_corners=False)
    return image.flatten(2).transpose(1, 2)


class GridMatch(nn.Module):
    """One pair's geometry: the student stage grid, the teacher's patch positions and grid, the common grid, and
    per direction the permutations between raster and scan order (non-persistent buffers: nothing in checkpoints)."""

    def __init__(
        self,
        student_grid: Grid,
        student_orders: dict[str, torch.Tensor],
        teacher_grid: Grid,
        teacher_patches: torch.Tensor,
        common_orders: dict[str, torch.Tensor],
        mode: str,
    ):
        super().__init__()
        self.student_grid, self.teacher_grid = tuple(student_grid), tuple(teacher_grid)
        self.common = common_grid(self.student_grid, self.teacher_grid, mode)
        self.mode = mode
        self.resamples_student = self.common != self.student_grid
        self.resamples_teacher = self.common != self.teacher_grid
        self.pool_student_first = mode == "pool"  # the projector then sees the pooled tokens
        self.register_buffer("teacher_patches", teacher_patches.clone(), persistent=False)
        for name, order in student_orders.items():
            order = order.cpu()
            if self.resamples_student:
                # raster token p was visited at step inverse[p]
                self.register_buffer(f"to_raster_{name}", torch.argsort(order), persistent=False)
            common = common_orders[name].cpu()
            # direct gather from the teacher sequence when its grid is the common grid: step j <- patch common[j]
            gather = teacher_patches[common] if not self.resamples_teacher else common
            self.register_buffer(f"teacher_gather_{name}", gather.clone(), persistent=False)
            if self.resamples_student:
                self.register_buffer(f"student_gather_{name}", common.clone(), persistent=False)

    def teacher_common(self, tokens: torch.Tensor) -> torch.Tensor | None:
        """(B, T, D) teacher sequence → (B, L_c, D) patch tokens resampled to the common grid, raster order; None when
        the teacher's grid is the common grid (then `teacher_in_scan_order` gathers from the sequence directly)."""
        if not self.resamples_teacher:
            return None
        patches = tokens.index_select(1, self.teacher_patches)
        return resample(patches, self.teacher_grid, self.common, self.mode)

    def teacher_in_scan_order(self, tokens: torch.Tensor, common: torch.Tensor | None, direction: str) -> torch.Tensor:
        """Step j of `direction` on the common grid holds the teacher token there (`common` from `teacher_common`)."""
        source = tokens if common is None else common
        return source.index_select(1, getattr(self, f"teacher_gather_{direction}"))

    def student_in_scan_order(self, features: torch.Tensor, direction: str, project: nn.Module) -> torch.Tensor:
        """(B, L_s, E) outputs of scan `direction` on the stage grid → (B, L_c, D) projected, on the common grid, in
        that direction's scan order there."""
        if not self.resamples_student:
            return project(features)
        raster = features.index_select(1, getattr(self, f"to_raster_{direction}"))
        if self.pool_student_first:
            common = project(resample(raster, self.student_grid, self.common, self.mode))
        else:
            common = resample(project(raster), self.student_grid, self.common, self.mode)
        return common.index_select(1, getattr(self, f"student_gather_{direction}"))
