"""Triton building blocks shared by the selective-scan forward and backward kernels.

Every kernel works on [BLOCK_L, BLOCK_N, BLOCK_D] register blocks with the channel axis fastest: Triton's default
layout then puts channels on lanes and warps and keeps each channel's (steps, states) block in one thread's registers.
Selecting one step of such a block is a compile-time select, so the scans below are plain unrolled recurrences.
"""

from __future__ import annotations

import math
import os

import triton
import triton.language as tl

LOG2E = tl.constexpr(math.log2(math.e))
# Compiled kernels use the flush-to-zero hardware exp2 (one MUFU op, no denormal fix-up); the CPU interpreter cannot
# run inline PTX. Decays below 2^-126 flush to 0, far under fp32 resolution of any state they multiply.
_HW_EXP2 = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def at_step(tensor, offs_l, index: tl.constexpr):
    """tensor[index] of a [BLOCK_L, ...] register tensor.

    With the step axis in registers the select has a compile-time condition and the adds a -0.0 operand (the exact
    identity of fadd), so this compiles to nothing but register renaming."""
    return tl.sum(tl.where((offs_l == index)[:, None, None], tensor, -0.0), axis=0)


@triton.jit
def scan(decay, drive, state, offs_l, BLOCK_L: tl.constexpr, REVERSE: tl.constexpr):
    """h_l = decay_l * h_prev + drive_l over the BLOCK_L steps of a [BLOCK_L, BLOCK_N, BLOCK_D] block, in scan
    order, from `state`; returns all h and the final state.

    The step axis lives in each thread's registers, so an unrolled sequential recurrence is the cheapest scan (one
    FMA per element); `tl.associative_scan` adds shuffles, many of them for reverse=True."""
    h = tl.zeros_like(drive)
    for k in tl.static_range(BLOCK_L):
        index = BLOCK_L - 1 - k if REVERSE else k
        state = at_step(decay, offs_l, index) * state + at_step(drive, offs_l, index)
        h = tl.where((offs_l == index)[:, None, None], state[None, :, :], h)
    return h, state


@triton.jit
def scan_with_inputs(decay, drive, state, offs_l, BLOCK_L: tl.constexpr, REVERSE: tl.constexpr):
    """`scan`, also returning the state entering each step (h_prev), for gradients that need decay * h_prev
    exactly: as h - drive it would carry the rounding of drive's product where the compiler fuses it into an FMA
    (a whole rounding error where h_prev is exactly zero, at a sequence's first step)."""
    h = tl.zeros_like(drive)
    h_prev = tl.zeros_like(drive)
    for k in tl.static_range(BLOCK_L):
        index = BLOCK_L - 1 - k if REVERSE else k
        at_index = (offs_l == index)[:, None, None]
        h_prev = tl.where(at_index, state[None, :, :], h_prev)
        state = at_step(decay, offs_l, index) * state + at_step(drive, offs_l, index)
        h = tl.where(at_index, state[None, :, :], h)
    return h, h_prev, state


@triton.jit
def scan_adjoint(decay, dyC, carry, offs_l, BLOCK_L: tl.constexpr, REVERSE: tl.constexpr):
    """g_l = dyC_l + decay_{next(l)} g_{next(l)} against scan order, entered with carry = decay * g of the step
    after the block; returns all g and the carry out of the block, decay * g at its first step."""
    g = tl.zeros_like(dyC)
    for k in tl.static_range(BLOCK_L):
        index = k if REVERSE else BLOCK_L - 1 - k
        g_step = at_step(dyC, offs_l, index) + carry
        carry = at_step(decay, offs_l, index) * g_step
        g = tl.where((offs_l == index)[:, None, None], g_step[None, :, :], g)
    return g, carry


@triton.jit
def exp2(x):
    if _HW_EXP2:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=f,f", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.exp2(x)


@triton.jit
def softplus(x):
    """mamba-ssm's `x <= 20 ? log1p(exp(x)) : x` and its derivative sigmoid(x) (1 above the threshold).

    log1p(e) is computed as log(1 + e) * e / ((1 + e) - 1), exact to a few ulp even where 1 + e rounds to 1
    (delta + bias around -7 is common: a plain log(1 + e) would lose ~1e-4 relative there).
    """
    e = tl.exp(tl.minimum(x, 20.0))
    one_plus_e = 1.0 + e
    log1p_e = tl.where(one_plus_e == 1.0, e, tl.log(one_plus_e) * (e / (one_plus_e - 1.0)))
    below = x <= 20.0
    return tl.where(below, log1p_e, x), tl.where(below, e / one_plus_e, 1.0)


@triton.jit
def load_dt(delta_rows, t, mask_l, bias, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr):
    """The [len(t), BLOCK_D] step sizes softplus(delta + bias), 0 outside the sequence, and d(step)/d(delta)."""
    dt = tl.load(delta_rows[None, :] + t[:, None], mask=mask_l[:, None], other=0.0).to(tl.float32)
    if HAS_BIAS:
        dt += bias[None, :]
    if SOFTPLUS:
        dt, dt_grad = softplus(dt)
    else:
        dt_grad = tl.full(dt.shape, 1.0, tl.float32)
    # Steps outside the sequence become the identity map (decay 1, drive 0), so padding never moves the state.
    return tl.where(mask_l[:, None], dt, 0.0), dt_grad


@triton.jit
def take_rows(tile, offs_tile, start: tl.constexpr, BLOCK_L: tl.constexpr):
    """Rows start .. start + BLOCK_L - 1 of a [TILE_L, BLOCK_D] register tile as [BLOCK_L, BLOCK_D].

    With the step axis in registers every select below has a compile-time condition and every add a -0.0 operand
    (the exact identity of fadd), so this compiles to register moves."""
    offs = start + tl.arange(0, BLOCK_L)
    return tl.sum(tl.where(offs_tile[:, None, None] == offs[None, :, None], tile[:, None, :], -0.0), axis=0)


@triton.jit
def put_rows(tile, rows, offs_tile, start: tl.constexpr, BLOCK_L: tl.constexpr):
    """`tile` with rows start .. start + BLOCK_L - 1 replaced by `rows` (register moves, as in _take_rows)."""
    offs = tl.arange(0, BLOCK_L)
    for k in tl.static_range(BLOCK_L):
        row = tl.sum(tl.where(offs[:, None] == k, rows, -0.0), axis=0)
        tile = tl.where(offs_tile[:, None] == start + k, row[None, :], tile)
    return tile


@triton.jit
def product_over_steps(decay, offs_l, BLOCK_L: tl.constexpr):
    """prod_l decay[l] of a [BLOCK_L, BLOCK_N, BLOCK_D] block: the decay of a whole block of steps."""
    prod = at_step(decay, offs_l, 0)
    for k in tl.static_range(1, BLOCK_L):
        prod *= at_step(decay, offs_l, k)
    return prod


@triton.jit
def fold_transfers(value, transfer_ptr, transfer_offs, first, count, stride, segment_stride):
    """Apply count segment maps v -> P * v + q (P, q stored [2, BLOCK_N, BLOCK_D] per segment at
    transfer_offs + segment * segment_stride) to value, segments first, first + stride, ... in that order."""
    for k in range(count):
        rows = transfer_ptr + transfer_offs + (first + k * stride) * segment_stride
        value = tl.load(rows) * value + tl.load(rows + segment_stride // 2)
    return value
