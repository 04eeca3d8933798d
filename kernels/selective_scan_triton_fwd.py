"""Forward kernel of the Triton selective scan (launched by `tmconvert.kernels.selective_scan_triton`)."""

from __future__ import annotations

import triton
import triton.language as tl

import tmconvert.kernels.selective_scan_triton_common as common


@triton.jit(do_not_specialize=["unit_stride"])
def selective_scan_fwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    out_ptr,
    chunk_states_ptr,
    last_state_ptr,
    transfer_ptr,
    dim,
    seqlen,
    dstate,
    channels_per_group,
    chunk_len,
    n_segments,
    segment_len,
    unit_stride,
    stride_u_b,
    stride_u_d,
    stride_delta_b,
    stride_delta_d,
    stride_z_b,
    stride_z_d,
    stride_B_b,
    stride_B_g,
    stride_B_n,
    stride_B_l,
    stride_C_b,
    stride_C_g,
    stride_C_n,
    stride_C_l,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr,
    STORE_CHUNK_STATES: tl.constexpr,
    STORE_LAST_STATE: tl.constexpr,
    TRANSFER_ONLY: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    TILE_L: tl.constexpr,
):
    """One program per (batch, block of BLOCK_D channels, segment of the sequence).

    The program walks its segment in scan order in tiles of TILE_L steps: u/delta/z/out move as [TILE_L, BLOCK_D]
    tiles (coalesced along L, transposed through shared memory by the compiler's layout conversion) and each tile
    is scanned in sub-tiles of BLOCK_L steps held as [BLOCK_L, BLOCK_N, BLOCK_D] register blocks (one channel's
    states per thread). With n_segments > 1 (long sequences, too few (batch, channel) blocks to fill the GPU) a
    first launch with TRANSFER_ONLY stores each segment's map h -> P h + q (P: product of its decays, q: its end
    state from h = 0) and the second launch enters each segment with the maps of the segments before it."""
    n_dblocks = dim // BLOCK_D
    pid = tl.program_id(0)
    segment = pid % n_segments
    batch = (pid // n_segments // n_dblocks).to(tl.int64)
    d0 = (pid // n_segments % n_dblocks) * BLOCK_D
    group = d0 // channels_per_group  # BLOCK_D divides channels_per_group: one group per program
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    offs_tile = tl.arange(0, TILE_L)
    mask_n = offs_n < dstate

    A2 = tl.load(A_ptr + offs_d[None, :] * dstate + offs_n[:, None], mask=mask_n[:, None], other=0.0) * common.LOG2E
    u_rows = u_ptr + batch * stride_u_b + offs_d * stride_u_d
    delta_rows = delta_ptr + batch * stride_delta_b + offs_d * stride_delta_d
    z_rows = z_ptr + batch * stride_z_b + offs_d * stride_z_d
    B_cols = B_ptr + batch * stride_B_b + group * stride_B_g + offs_n * stride_B_n
    C_cols = C_ptr + batch * stride_C_b + group * stride_C_g + offs_n * stride_C_n
    out_rows = out_ptr + (batch * dim + offs_d) * seqlen
    bias = tl.load(bias_ptr + offs_d) if HAS_BIAS else None
    skip = tl.load(D_ptr + offs_d) if HAS_D else None
    # Segment maps: (batch, n_segments, 2, BLOCK_N, dim) fp32, this program's [BLOCK_N, BLOCK_D] block of each.
    # unit_stride is 1 but unknown to the compiler: without provable contiguity these accesses get the compute layout
    # (a channel per lane) instead of a vectorised one that would drag a layout conversion into the loop.
    transfer_offs = batch * n_segments * 2 * BLOCK_N * dim + offs_n[:, None] * dim + offs_d[None, :] * unit_stride
    N_SUB: tl.constexpr = TILE_L // BLOCK_L

    n_tiles = tl.cdiv(seqlen, TILE_L)
    n_chunks = tl.cdiv(seqlen, chunk_len)
    first_tile = segment * (segment_len // TILE_L)
    n_segment_tiles = tl.minimum(segment_len // TILE_L, n_tiles - first_tile)
    state = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    if TRANSFER_ONLY:
        decay_prod = tl.full([BLOCK_N, BLOCK_D], 1.0, tl.float32)
    elif REVERSE:  # enter from the segments after this one, the nearest last
        state = common.fold_transfers(
            state, transfer_ptr, transfer_offs, n_segments - 1, n_segments - 1 - segment, -1, 2 * BLOCK_N * dim
        )
    else:
        state = common.fold_transfers(state, transfer_ptr, transfer_offs, 0, segment, 1, 2 * BLOCK_N * dim)

    for step in range(n_segment_tiles):
        tile = first_tile + (n_segment_tiles - 1 - step if REVERSE else step)
        if STORE_CHUNK_STATES:
            # The state entering each chunk of chunk_len steps (in scan order), for the backward's recompute.
            if REVERSE:
                enters_chunk = (tile == n_tiles - 1) | ((tile + 1) * TILE_L % chunk_len == 0)
            else:
                enters_chunk = tile * TILE_L % chunk_len == 0
            if enters_chunk:
                chunk = tile * TILE_L // chunk_len
                chunk_offs = ((batch * dim + offs_d[None, :]) * n_chunks + chunk) * dstate + offs_n[:, None]
                tl.store(chunk_states_ptr + chunk_offs, state, mask=mask_n[:, None])
        t_tile = tile * TILE_L + offs_tile
        mask_tile = t_tile < seqlen
        u_tile = tl.load(u_rows[None, :] + t_tile[:, None], mask=mask_tile[:, None], other=0.0).to(tl.float32)
        dt_tile, _ = common.load_dt(delta_rows, t_tile, mask_tile, bias, HAS_BIAS, SOFTPLUS)
        y_tile = tl.zeros([TILE_L, BLOCK_D], dtype=tl.float32)

        for s in tl.static_range(N_SUB):
            sub = N_SUB - 1 - s if REVERSE else s
            if N_SUB == 1:
                u, dt = u_tile, dt_tile
            else:
                u = common.take_rows(u_tile, offs_tile, sub * BLOCK_L, BLOCK_L)
                dt = common.take_rows(dt_tile, offs_tile, sub * BLOCK_L, BLOCK_L)
            t = tile * TILE_L + sub * BLOCK_L + offs_l
            mask_ln = (t < seqlen)[:, None] & mask_n[None, :]
            B_sub = tl.load(B_cols[None, :] + t[:, None] * stride_B_l, mask=mask_ln, other=0.0).to(tl.float32)
            if not TRANSFER_ONLY:
                C_sub = tl.load(C_cols[None, :] + t[:, None] * stride_C_l, mask=mask_ln, other=0.0).to(tl.float32)
            decay = common.exp2(dt[:, None, :] * A2[None, :, :])
            drive = (dt * u)[:, None, :] * B_sub[:, :, None]
            h, state = common.scan(decay, drive, state, offs_l, BLOCK_L, REVERSE)
            if TRANSFER_ONLY:
                decay_prod *= common.product_over_steps(decay, offs_l, BLOCK_L)
            else:
                y = tl.sum(h * C_sub[:, :, None], axis=1)
                y_tile = y if N_SUB == 1 else common.put_rows(y_tile, y, offs_tile, sub * BLOCK_L, BLOCK_L)

        if not TRANSFER_ONLY:
            if HAS_D:
                y_tile += skip[None, :] * u_tile
            if HAS_Z:
                z = tl.load(z_rows[None, :] + t_tile[:, None], mask=mask_tile[:, None], other=0.0).to(tl.float32)
                y_tile *= z * tl.sigmoid(z)
            out = y_tile.to(out_ptr.dtype.element_ty)
            tl.store(out_rows[None, :] + t_tile[:, None], out, mask=mask_tile[:, None])

    if TRANSFER_ONLY:
        rows = transfer_ptr + transfer_offs + segment * 2 * BLOCK_N * dim
        tl.store(rows, decay_prod)
        tl.store(rows + BLOCK_N * dim, state)
    elif STORE_LAST_STATE:
        last_segment = (segment == 0) if REVERSE else (segment == n_segments - 1)
        if last_segment:  # a branch, not a mask term: a scalar in a mask breaks Triton 3.9's interpreter
            state_offs = (batch * dim + offs_d[None, :]) * dstate + offs_n[:, None]
            tl.store(last_state_ptr + state_offs, state, mask=mask_n[:, None])
