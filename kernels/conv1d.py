"""Depthwise causal (or anti-causal) 1-D convolution, the short conv in front of every Mamba selective scan.

Matches the `causal_conv1d_fn` contract of the `causal-conv1d` package and `nn.Conv1d(padding=K-1)[..., :L]` in
mamba-ssm's slow path. `reverse=True` gives the backward branch of a bidirectional mixer its conv in the original
token order, so callers need not flip the sequence in and out.

The conv follows the selective-scan backend (`dispatch.resolve_backend`): under `cuda`, the mamba-ssm stack, it runs
the `causal-conv1d` package's compiled `causal_conv1d_fn` when that is installed, so a model on `cuda` is the model
on upstream's kernels; every other backend (and `cuda` without the package) uses PyTorch's conv here.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from tmconvert.kernels.dispatch import resolve_backend

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
    if x.device.type == "cuda" and x.dtype != torch.float64 and resolve_backend(x.device) == "cuda":
        compiled = _load_causal_conv1d()
        if compiled is not None:
            return _run_compiled(compiled, x, weight, bias, activation, reverse)
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


@functools.cache
def _load_causal_conv1d() -> Callable[..., torch.Tensor] | None:
    """The `causal-conv1d` package's `causal_conv1d_fn`, or None when it (or its compiled extension) is missing."""
    try:
        from causal_conv1d import causal_conv1d_fn
    except (ImportError, OSError):
        return None
    return causal_conv1d_fn


def _run_compiled(
    conv_fn: Callable[..., torch.Tensor],
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str | None,
    reverse: bool,
) -> torch.Tensor:
    """`causal_conv1d_fn` with the weights in x's dtype (what autocast gives PyTorch's conv); it has no anti-causal
    mode, so `reverse` flips the sequence in and out."""
    weight = weight.to(x.dtype)
    bias = bias.to(x.dtype) if bias is not None else None
    if reverse:
        return conv_fn(x.flip(-1), weight, bias, activation=activation).flip(-1)
    return conv_fn(x, weight, bias, activation=activation)
