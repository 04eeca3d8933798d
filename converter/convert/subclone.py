"""Selective weight subcloning: rank the teacher's channels and choose which ones a narrower student keeps.

A mapping names its index sets (`residual`: which D_student of the D_teacher residual channels, one set for the whole
model so adjacent layers stay connected; `hidden`: which MLP hidden units, one set per teacher block) and says which
teacher signal ranks them. This module computes the scores and turns them into sorted index tensors:

- `activation` (Samragh et al. 2023): mean |activation| over calibration images and tokens. `residual`: every
  block's output tokens; `mlp_hidden`: GELU(fc1) outputs (a forward hook on `mlp.fc1`); `attn_value`: the value
  vectors of the attention.
- `magnitude` (no data, the default): weight norms of what reads and writes the channel. `residual` channel c:
  sum over blocks of |norm1.w[c]|*||qkv[:, c]|| + |norm2.w[c]|*||fc1[:, c]|| + ||proj[c, :]|| + ||fc2[c, :]||,
  plus ||patch_embed[c]||; hidden unit u: ||fc1[u, :]|| * ||fc2[:, u]||; value channel v: ||V[v, :]|| * ||proj[:, v]||
  (proj and fc2 times their LayerScale gammas, when the teacher has them).
- `uniform` (weight selection, Xu et al. 2024): evenly spaced indices, no scores at all.

Selection keeps the `keep` highest scores, ties broken by the lower index, and returns them sorted; keeping every
channel is the identity selection whatever the scores. Scores that are not finite (a teacher with NaN or inf weights
or activations) are refused, not ranked. Everything is deterministic for a given seed.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
import torch.nn.functional as F

from tmconvert.converter.checkpoint import CheckpointError
from tmconvert.converter.data.errors import DatasetError
from tmconvert.converter.errors import TmconvertError
from tmconvert.converter.plan.plan import IndexSetPlan
from tmconvert.models import VisionTransformer, ViTConfig

SCORE_METHODS = ("magnitude", "activation", "uniform")


Selection = dict[str, dict[int | None, torch.Tensor]]
TensorGetter = Callable[[str], torch.Tensor]


def top_k_sorted(scores: torch.Tensor, keep: int) -> torch.Tensor:
    """Indices of the `keep` largest scores (ties: lower index first), returned in increasing order."""
    if keep >= scores.numel():
        return torch.arange(scores.numel(), dtype=torch.long)
    order = torch.sort(scores.double(), descending=True, stable=True).indices
    return torch.sort(order[:keep]).values.to(torch.long)


def uniform_indices(full: int, keep: int) -> torch.Tensor:
    """Evenly spaced indices floor(i * full / keep), i < keep: distinct, sorted, spanning the whole axis."""
    return torch.div(torch.arange(keep, dtype=torch.long) * full, keep, rounding_mode="floor")


def _col_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.float().norm(dim=0)


def _row_norms(weight: torch.Tensor) -> torch.Tensor:
    return weight.float().norm(dim=1)


def _written(get: TensorGetter, cfg: ViTConfig, block: int, branch: str) -> torch.Tensor:
    """What a residual branch writes into the stream: `attn.proj` / `mlp.fc2`, times LayerScale where there is one
    (so a LayerScale teacher and the same network with its gammas folded in score alike)."""
    weight = get(f"blocks.{block}.{'attn.proj' if branch == 'attn' else 'mlp.fc2'}.weight").float()
    if cfg.layer_scale:
        weight = weight * get(f"blocks.{block}.{'ls1' if branch == 'attn' else 'ls2'}.gamma").float()[:, None]
    return weight


def magnitude_scores(index_set: IndexSetPlan, block: int | None, get: TensorGetter, cfg: ViTConfig) -> torch.Tensor:
    """Data-free importance of every entry of one set (see the module docstring for the formulas)."""
    d = cfg.embed_dim
    if index_set.score == "residual":
        score = _row_norms(get("patch_embed.proj.weight").reshape(d, -1))
        for b in range(cfg.depth):
            pre = f"blocks.{b}."
            score += get(pre + "norm1.weight").float().abs() * _col_norms(get(pre + "attn.qkv.weight"))
            score += get(pre + "norm2.weight").float().abs() * _col_norms(get(pre + "mlp.fc1.weight"))
            score += _row_norms(_written(get, cfg, b, "attn")) + _row_norms(_written(get, cfg, b, "mlp"))
        return score
    assert block is not None
    if index_set.score == "mlp_hidden":
        return _row_norms(get(f"blocks.{block}.mlp.fc1.weight")) * _col_norms(_written(get, cfg, block, "mlp"))
    if index_set.score == "attn_value":
        value_rows = get(f"blocks.{block}.attn.qkv.weight")[2 * d : 3 * d]
        return _row_norms(value_rows) * _col_norms(_written(get, cfg, block, "attn"))
    raise ValueError(f"unknown score signal {index_set.score!r}")


# ---------------------------------------------------------------------------------------------------------------
# Activation scores


@torch.no_grad()
def activation_scores(
    index_sets: Sequence[IndexSetPlan], teacher: VisionTransformer, batches: Iterator[torch.Tensor]
) -> dict[tuple[str, int | None], torch.Tensor]:
    """Mean |activation| per entry for every (set, block) requested, from one teacher pass per batch."""
    cfg = teacher.cfg
    want_hidden = {b for r in index_sets if r.score == "mlp_hidden" for b in r.blocks}
    want_value = any(r.score == "attn_value" for r in index_sets)
    sums: dict[tuple[str, int | None], torch.Tensor] = {}
    count = 0

    def accumulate(key: tuple[str, int | None], values: torch.Tensor) -> None:
        total = values.abs().double().sum(dim=tuple(range(values.dim() - 1)))
        sums[key] = sums[key] + total if key in sums else total

    hooks = []
    for b in sorted(x for x in want_hidden if x is not None):
        hooks.append(
            teacher.blocks[b].mlp.fc1.register_forward_hook(
                lambda _m, _i, out, b=b: accumulate(("mlp_hidden", b), F.gelu(out))
            )
        )
    try:
        teacher.eval()
        for images in batches:
            out = teacher.forward_all(images.float(), return_qkv=want_value)
            count += images.shape[0] * out.layer_tokens[0].shape[1]
            for tokens in out.layer_tokens:
                accumulate(("residual", None), tokens)
            if want_value:
                for b, (_q, _k, v) in enumerate(out.qkv):
                    accumulate(("attn_value", b), v.transpose(1, 2).reshape(v.shape[0], v.shape[2], -1))
    finally:
        for hook in hooks:
            hook.remove()
    if count == 0:
        raise DatasetError("calibration produced no images")
    scores = {key: (total / count).float() for key, total in sums.items()}
    scores[("residual", None)] = scores[("residual", None)] / cfg.depth
    return scores


def choose(
    index_sets: Sequence[IndexSetPlan],
    method: str,
    *,
    get: TensorGetter,
    cfg: ViTConfig,
    activations: dict[tuple[str, int | None], torch.Tensor] | None = None,
) -> Selection:
    """The index tensors of every requested set and block, by the given scoring method."""
    if method not in SCORE_METHODS:
        raise ValueError(f"unknown score method {method!r}")
    selection: Selection = {}
    for index_set in index_sets:
        per_block: dict[int | None, torch.Tensor] = {}
        for block in index_set.blocks:
            if index_set.keep >= index_set.full:
                per_block[block] = torch.arange(index_set.full, dtype=torch.long)
            elif method == "uniform":
                per_block[block] = uniform_indices(index_set.full, index_set.keep)
            else:
                if method == "activation":
                    assert activations is not None
                    scores = activations[(index_set.score, block)]
                else:
                    scores = magnitude_scores(index_set, block, get, cfg)
                if scores.numel() != index_set.full:
                    raise TmconvertError(
                        f"index set {index_set.name!r}: {scores.numel()} scores for {index_set.full} entries"
                    )
                if not bool(torch.isfinite(scores).all()):  # NaN would rank arbitrarily: refuse to choose
                    where = "" if block is None else f" of block {block}"
                    raise CheckpointError(
                        f"index set {index_set.name!r}{where}: {method} scores are not finite (NaN or inf): the "
                        f"teacher's {'weights' if method == 'magnitude' else 'activations'} hold non-finite values"
                    )
                per_block[block] = top_k_sorted(scores, index_set.keep)
        selection[index_set.name] = per_block
    return selection
