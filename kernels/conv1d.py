"""Depthwise causal (or anti-causal) 1-D convolution, the short conv in front of every Mamba selective scan.

Matches the `causal_conv1d_fn` contract of the `causal-conv1d` package and `nn.Conv1d(padding=K-1)[..., :L]` in
mamba-ssm's slow path. `reverse=True` gives the backward branch of a bidirectional mixer its conv in the original
token order, so callers need not flip the sequence in and out.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_ACTIVATIONS = (None, "silu")


def causal_conv1d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    activation: str | None = None,
    reverse: bool = False,
) -> torch.Tensor:
    """Depthwise conv over the last axis of `x` (B, D, L) with `weight` (D, K) or (D, 1, K).

    Causal: out[t] = sum_k weight[k] * x[t - (K-1) + k] (zero left-padding), the first L outputs are kept.
    `reverse=True` is anti-causal, out[t] = sum_k weight[k] * x[t + (K-1) - k], i.e. flip(conv(flip(x))).
    """
    if x.dim() != 3:
        raise ValueError(f"causal_conv1d: x must be (batch, dim, seqlen), got shape {tuple(x.shape)}")
    dim = x.shape[1]
    if weight.dim() == 3 and weight.shape[1] == 1:
        weight = weight[:, 0, :]
    if weight.dim() != 2 or weight.shape[0] != dim:
        raise ValueError(f"causal_conv1d: weight must be ({dim}, K) or ({dim}, 1, K), got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (dim,):
        raise ValueError(f"causal_conv1d: bias must be ({dim},), got {tuple(bias.shape)}")
    if activation not in _ACTIVATIONS:
        raise ValueError(f"causal_conv1d: activation must be one of {_ACTIVATIONS}, got {activation!r}")
    width = weight.shape[1]
    if reverse:
        # Anti-causal == causal conv of the flipped sequence, flipped back: pad on the right, mirror the taps.
        padded, taps = F.pad(x, (0, width - 1)), weight.flip(-1)
    else:
        padded, taps = F.pad(x, (width - 1, 0)), weight
    if x.device.type == "cpu":
        # PyTorch's CPU depthwise conv1d is very slow for these shapes (tens of ms even at tiny sizes); K shifted
        # multiply-adds compute the same sums and are two to three orders of magnitude faster.
        length = x.shape[-1]
        out = padded[..., 0:length] * taps[:, 0, None]
        for k in range(1, width):
            out = out + padded[..., k : k + length] * taps[:, k, None]
        if bias is not None:
            out = out + bias[:, None]
    else:
        out = F.conv1d(padded, taps.unsqueeze(1), bias, groups=dim)
    return F.silu(out) if activation == "silu" else out
