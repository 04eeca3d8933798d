"""Where tokens sit in a model's sequence, and how an absolute position grid is resampled.

Shared by every family: a distiller lines teacher tokens up with student tokens through two `TokenLayout`s, and
both the ViT forward (other image sizes) and the converter's `resample_grid` op resample position embeddings here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from tmconvert.models.errors import ModelConfigError


@dataclass(frozen=True)
class TokenLayout:
    """Positions of the special tokens and of the patch tokens inside a model's token sequence.

    `patch_indices[p]` is the sequence index of patch `p`, patches counted in raster order over `grid`; a distiller
    uses two layouts to line teacher tokens up with student tokens.
    """

    grid: tuple[int, int]
    cls_index: int | None
    patch_indices: tuple[int, ...]
    dist_index: int | None = None
    reg_indices: tuple[int, ...] = ()  # register tokens (DINOv2 with registers): never paired with anything

    @property
    def seq_len(self) -> int:
        specials = [i for i in (self.cls_index, self.dist_index) if i is not None]
        return len(self.patch_indices) + len(specials) + len(self.reg_indices)

    def positions_in(self, source: TokenLayout) -> tuple[torch.Tensor, torch.Tensor]:
        """For each position of this sequence, the position of the same token in `source`, and whether it exists.

        Patches pair by raster index (the grids must match, else ValueError); cls pairs with cls. A cls token that
        `source` lacks has no counterpart (valid False); dist and register tokens are never paired. This is how a
        student's tokens line up with a teacher's (ViM's middle cls against DeiT's cls at 0).
        """
        if tuple(self.grid) != tuple(source.grid):
            raise ValueError(f"patch grids differ: {self.grid[0]}x{self.grid[1]} vs {source.grid[0]}x{source.grid[1]}")
        index = torch.zeros(self.seq_len, dtype=torch.long)
        valid = torch.zeros(self.seq_len, dtype=torch.bool)
        for pos, src_pos in zip(self.patch_indices, source.patch_indices, strict=True):
            index[pos], valid[pos] = src_pos, True
        if self.cls_index is not None and source.cls_index is not None:
            index[self.cls_index], valid[self.cls_index] = source.cls_index, True
        return index, valid


def resample_abs_pos_embed(
    pos_embed: torch.Tensor,
    new_grid: tuple[int, int],
    old_grid: tuple[int, int] | None = None,
    num_prefix_tokens: int = 1,
    interpolation: str = "bicubic",
    antialias: bool = True,
) -> torch.Tensor:
    """Resample a (1, prefix + H*W, D) absolute position embedding to another patch grid, as timm does.

    The prefix tokens (cls / dist) are kept as they are; the grid part is interpolated in float32 (bicubic with
    antialias by default) and cast back. A square old grid is assumed when `old_grid` is not given.
    """
    num_grid_tokens = pos_embed.shape[1] - num_prefix_tokens
    if old_grid is None:
        side = math.isqrt(num_grid_tokens)
        if side * side != num_grid_tokens:
            raise ModelConfigError(f"pos_embed has {num_grid_tokens} grid tokens, not a square grid; pass old_grid")
        old_grid = (side, side)
    if old_grid[0] * old_grid[1] != num_grid_tokens:
        raise ModelConfigError(f"pos_embed has {num_grid_tokens} grid tokens, expected {old_grid[0]}x{old_grid[1]}")
    if tuple(old_grid) == tuple(new_grid):
        return pos_embed
    prefix, grid_part = pos_embed[:, :num_prefix_tokens], pos_embed[:, num_prefix_tokens:]
    dim = pos_embed.shape[-1]
    grid_part = grid_part.float().reshape(1, old_grid[0], old_grid[1], dim).permute(0, 3, 1, 2)
    grid_part = F.interpolate(grid_part, size=tuple(new_grid), mode=interpolation, antialias=antialias)
    grid_part = grid_part.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos_embed.dtype)
    return torch.cat([prefix, grid_part], dim=1)
