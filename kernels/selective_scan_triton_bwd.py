"""Backward kernel of the Triton selective scan (launched by `tmconvert.kernels.selective_scan_triton`).

Gradients of h_t = decay_t h_prev + dt_t u_t B_t (decay_t = exp(dt_t A)), y_t = C_t . h_t + D u_t, out = y silu(z):
with the adjoint g_t = dL/dh_t = C_t dy_t + decay_next g_next (next: the following step in scan order),
dB_t = sum_d g_t dt_t u_t, dC_t = sum_d dy_t h_t, du_t = dt_t (B_t . g_t) + D dy_t,
d(dt_t) = u_t (B_t . g_t) + A . (g_t decay_t h_prev), dA = sum_t dt_t g_t decay_t h_prev, with h_prev the state
entering each step, kept by the recompute (`scan_with_inputs`).
"""

from __future__ import annotations

import triton
import triton.language as tl

import tmconvert.kernels.selective_scan_triton_common as common


@triton.jit(do_not_specialize=["unit_stride"])
def selective_scan_bwd_kernel(
    u_ptr,
    delta_ptr,
    A_ptr,
    B_ptr,
    C_ptr,
    D_ptr,
    z_ptr,
    bias_ptr,
    dout_ptr,
    chunk_states_ptr,
    dlast_ptr,
    scratch_ptr,
    transfer_ptr,
    du_ptr,
    ddelta_ptr,
    dz_ptr,
    dB_ptr,
    dC_ptr,
    dA_rows_ptr,
    dD_rows_ptr,
    dbias_rows_ptr,
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
    stride_dout_b,
    stride_dout_d,
    stride_B_b,
    stride_B_g,
    stride_B_n,
    stride_B_l,
    stride_C_b,
    stride_C_g,
    stride_C_n,
    stride_C_l,
    stride_dBC_b,
    stride_dBC_g,
    stride_dBC_n,
    HAS_D: tl.constexpr,
    HAS_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SOFTPLUS: tl.constexpr,
    REVERSE: tl.constexpr,
    HAS_DLAST: tl.constexpr,
    TRANSFER_ONLY: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_L: tl.constexpr,
    TILE_L: tl.constexpr,
):
    """One program per (batch, block of BLOCK_D channels, segment), same register layout as the forward.

    The segment's chunks are visited against the scan direction; each chunk is entered from the state the forward
    saved and walked twice: in scan order, saving the state entering every BLOCK_L-step sub-tile to this program's
    scratch rows, then against it, recomputing each sub-tile's states from its saved entry and running the adjoint.
    The adjoint is carried between sub-tiles as r = decay * g at the first step of the sub-tile just done (the
    gradient of last_state to start with). With n_segments > 1 a first launch with TRANSFER_ONLY stores each
    segment's map r -> P r + q (P: product of its decays, q: its outgoing r from r = 0; dy does not depend on the
    states), and the main launch enters each segment with the maps of the segments after it."""
    n_dblocks = dim // BLOCK_D
    pid = tl.program_id(0)
    segment = pid % n_segments
    batch = (pid // n_segments // n_dblocks).to(tl.int64)
    d0 = (pid // n_segments % n_dblocks) * BLOCK_D
    group = d0 // channels_per_group
    offs_d = d0 + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    offs_l = tl.arange(0, BLOCK_L)
    offs_tile = tl.arange(0, TILE_L)
    mask_n = offs_n < dstate

    A = tl.load(A_ptr + offs_d[None, :] * dstate + offs_n[:, None], mask=mask_n[:, None], other=0.0)
    A2 = A * common.LOG2E
    u_rows = u_ptr + batch * stride_u_b + offs_d * stride_u_d
    delta_rows = delta_ptr + batch * stride_delta_b + offs_d * stride_delta_d
    z_rows = z_ptr + batch * stride_z_b + offs_d * stride_z_d
    dout_rows = dout_ptr + batch * stride_dout_b + offs_d * stride_dout_d
    B_cols = B_ptr + batch * stride_B_b + group * stride_B_g + offs_n * stride_B_n
    C_cols = C_ptr + batch * stride_C_b + group * stride_C_g + offs_n * stride_C_n
    dB_cols = dB_ptr + batch * stride_dBC_b + group * stride_dBC_g + offs_n * stride_dBC_n  # (batch, G, N, L) fp32
    dC_cols = dC_ptr + batch * stride_dBC_b + group * stride_dBC_g + offs_n * stride_dBC_n
    grad_rows = (batch * dim + offs_d) * seqlen  # du, ddelta, dz: contiguous (batch, dim, L)
    bias = tl.load(bias_ptr + offs_d) if HAS_BIAS else None
    skip = tl.load(D_ptr + offs_d) if HAS_D else None
    state_offs = (batch * dim + offs_d[None, :]) * dstate + offs_n[:, None]  # [BLOCK_N, BLOCK_D] in (batch, dim, N)
    # Segment maps: (batch, n_segments, 2, BLOCK_N, dim) fp32, this program's [BLOCK_N, BLOCK_D] block of each.
    # unit_stride is 1 but unknown to the compiler: without provable contiguity these and the scratch accesses get
    # the compute layout (a channel per lane) instead of a vectorised one needing an intra-warp transpose each time.
    transfer_offs = batch * n_segments * 2 * BLOCK_N * dim + offs_n[:, None] * dim + offs_d[None, :] * unit_stride
    N_SUB: tl.constexpr = TILE_L // BLOCK_L
    tiles_per_chunk = chunk_len // TILE_L
    n_chunks = tl.cdiv(seqlen, chunk_len)
    first_chunk = segment * (segment_len // chunk_len)
    n_segment_chunks = tl.minimum(segment_len // chunk_len, n_chunks - first_chunk)

    # carry: r entering the next sub-tile (against scan order); the gradient of last_state at the sequence's end.
    if HAS_DLAST and not TRANSFER_ONLY:
        carry = tl.load(dlast_ptr + state_offs, mask=mask_n[:, None], other=0.0)
    else:
        carry = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    if TRANSFER_ONLY:
        decay_prod = tl.full([BLOCK_N, BLOCK_D], 1.0, tl.float32)
        for chunk_step in range(n_segment_chunks):
            chunk = first_chunk + (chunk_step if REVERSE else n_segment_chunks - 1 - chunk_step)
            n_tiles = tl.minimum(tiles_per_chunk, tl.cdiv(seqlen - chunk * chunk_len, TILE_L))
            for k in range(n_tiles):
                tile_start = chunk * chunk_len + (k if REVERSE else n_tiles - 1 - k) * TILE_L
                t_tile = tile_start + offs_tile
                mask_tile = t_tile < seqlen
                dt_tile, _ = common.load_dt(delta_rows, t_tile, mask_tile, bias, HAS_BIAS, SOFTPLUS)
                dy_tile = tl.load(dout_rows[None, :] + t_tile[:, None], mask=mask_tile[:, None], other=0.0)
                dy_tile = dy_tile.to(tl.float32)
                if HAS_Z:
                    z_tile = tl.load(z_rows[None, :] + t_tile[:, None], mask=mask_tile[:, None], other=0.0)
                    z_tile = z_tile.to(tl.float32)
                    dy_tile *= z_tile * tl.sigmoid(z_tile)
                for s in tl.static_range(N_SUB):
                    sub = s if REVERSE else N_SUB - 1 - s
                    if N_SUB == 1:
                        dt, dy = dt_tile, dy_tile
                    else:
                        dt = common.take_rows(dt_tile, offs_tile, sub * BLOCK_L, BLOCK_L)
                        dy = common.take_rows(dy_tile, offs_tile, sub * BLOCK_L, BLOCK_L)
                    t = tile_start + sub * BLOCK_L + offs_l
                    mask_ln = (t < seqlen)[:, None] & mask_n[None, :]
                    C_sub = tl.load(C_cols[None, :] + t[:, None] * stride_C_l, mask=mask_ln, other=0.0)
                    decay = common.exp2(dt[:, None, :] * A2[None, :, :])
                    dyC = dy[:, None, :] * C_sub.to(tl.float32)[:, :, None]
                    _, carry = common.scan_adjoint(decay, dyC, carry, offs_l, BLOCK_L, REVERSE)
                    decay_prod *= common.product_over_steps(decay, offs_l, BLOCK_L)
        rows = transfer_ptr + transfer_offs + segment * 2 * BLOCK_N * dim
        tl.store(rows, decay_prod)
        tl.store(rows + BLOCK_N * dim, carry)
    else:
        # Enter from the segments after this one in scan order, the last one first.
        if REVERSE:
            carry = common.fold_transfers(carry, transfer_ptr, transfer_offs, 0, segment, 1, 2 * BLOCK_N * dim)
        else:
            carry = common.fold_transfers(
                carry, transfer_ptr, transfer_offs, n_segments - 1, n_segments - 1 - segment, -1, 2 * BLOCK_N * dim
            )
        # This program's scratch: one [BLOCK_N, BLOCK_D] state per sub-tile of a chunk.
        scratch_rows = scratch_ptr + pid.to(tl.int64) * (tiles_per_chunk * N_SUB * BLOCK_N * BLOCK_D)
        scratch_offs = offs_n[:, None] * BLOCK_D + tl.arange(0, BLOCK_D)[None, :] * unit_stride
        grad_A = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        grad_D = tl.zeros([BLOCK_D], dtype=tl.float32)
        grad_bias = tl.zeros([BLOCK_D], dtype=tl.float32)
        for chunk_step in range(n_segment_chunks):
            chunk = first_chunk + (chunk_step if REVERSE else n_segment_chunks - 1 - chunk_step)
            n_tiles = tl.minimum(tiles_per_chunk, tl.cdiv(seqlen - chunk * chunk_len, TILE_L))

            # Pass 1, in scan order: save the state entering each sub-tile.
            chunk_offs = ((batch * dim + offs_d[None, :]) * n_chunks + chunk) * dstate + offs_n[:, None]
            state = tl.load(chunk_states_ptr + chunk_offs, mask=mask_n[:, None], other=0.0)
            for k in range(n_tiles):
                tile_in_chunk = n_tiles - 1 - k if REVERSE else k
                tile_start = chunk * chunk_len + tile_in_chunk * TILE_L
                t_tile = tile_start + offs_tile
                mask_tile = t_tile < seqlen
                u_tile = tl.load(u_rows[None, :] + t_tile[:, None], mask=mask_tile[:, None], other=0.0)
                u_tile = u_tile.to(tl.float32)
                dt_tile, _ = common.load_dt(delta_rows, t_tile, mask_tile, bias, HAS_BIAS, SOFTPLUS)
                for s in tl.static_range(N_SUB):
                    sub = N_SUB - 1 - s if REVERSE else s
                    slot = tile_in_chunk * N_SUB + sub
                    tl.store(scratch_rows + slot * (BLOCK_N * BLOCK_D) + scratch_offs, state)
                    if N_SUB == 1:
                        u, dt = u_tile, dt_tile
                    else:
                        u = common.take_rows(u_tile, offs_tile, sub * BLOCK_L, BLOCK_L)
                        dt = common.take_rows(dt_tile, offs_tile, sub * BLOCK_L, BLOCK_L)
                    t = tile_start + sub * BLOCK_L + offs_l
                    mask_ln = (t < seqlen)[:, None] & mask_n[None, :]
                    B_sub = tl.load(B_cols[None, :] + t[:, None] * stride_B_l, mask=mask_ln, other=0.0)
                    decay = common.exp2(dt[:, None, :] * A2[None, :, :])
                    drive = (dt * u)[:, None, :] * B_sub.to(tl.float32)[:, :, None]
                    _, state = common.scan(decay, drive, state, offs_l, BLOCK_L, REVERSE)

            # Pass 2, against scan order: recompute each sub-tile's states, then its adjoint and gradients.
            for k in range(n_tiles):
                tile_in_chunk = k if REVERSE else n_tiles - 1 - k
                tile_start = chunk * chunk_len + tile_in_chunk * TILE_L
                t_tile = tile_start + offs_tile
                mask_tile = t_tile < seqlen
                u_tile = tl.load(u_rows[None, :] + t_tile[:, None], mask=mask_tile[:, None], other=0.0)
                u_tile = u_tile.to(tl.float32)
                dt_tile, dt_grad_tile = common.load_dt(delta_rows, t_tile, mask_tile, bias, HAS_BIAS, SOFTPLUS)
                dout_tile = tl.load(dout_rows[None, :] + t_tile[:, None], mask=mask_tile[:, None], other=0.0)
                dout_tile = dout_tile.to(tl.float32)
                if HAS_Z:
                    z_tile = tl.load(z_rows[None, :] + t_tile[:, None], mask=mask_tile[:, None], other=0.0)
                    z_tile = z_tile.to(tl.float32)
                    dz_tile = tl.zeros([TILE_L, BLOCK_D], dtype=tl.float32)
                du_tile = tl.zeros([TILE_L, BLOCK_D], dtype=tl.float32)
                ddt_tile = tl.zeros([TILE_L, BLOCK_D], dtype=tl.float32)
                for s in tl.static_range(N_SUB):
                    sub = s if REVERSE else N_SUB - 1 - s
                    slot = tile_in_chunk * N_SUB + sub
                    state_in = tl.load(scratch_rows + slot * (BLOCK_N * BLOCK_D) + scratch_offs)
                    if N_SUB == 1:
                        u, dt, dout = u_tile, dt_tile, dout_tile
                    else:
                        u = common.take_rows(u_tile, offs_tile, sub * BLOCK_L, BLOCK_L)
                        dt = common.take_rows(dt_tile, offs_tile, sub * BLOCK_L, BLOCK_L)
                        dout = common.take_rows(dout_tile, offs_tile, sub * BLOCK_L, BLOCK_L)
                    t = tile_start + sub * BLOCK_L + offs_l
                    mask_ln = (t < seqlen)[:, None] & mask_n[None, :]
                    B_sub = tl.load(B_cols[None, :] + t[:, None] * stride_B_l, mask=mask_ln, other=0.0)
                    B_sub = B_sub.to(tl.float32)
                    C_sub = tl.load(C_cols[None, :] + t[:, None] * stride_C_l, mask=mask_ln, other=0.0)
                    C_sub = C_sub.to(tl.float32)
                    dtu = dt * u
                    decay = common.exp2(dt[:, None, :] * A2[None, :, :])
                    drive = dtu[:, None, :] * B_sub[:, :, None]
                    h, h_prev, _ = common.scan_with_inputs(decay, drive, state_in, offs_l, BLOCK_L, REVERSE)

                    if HAS_Z:
                        z = z_tile if N_SUB == 1 else common.take_rows(z_tile, offs_tile, sub * BLOCK_L, BLOCK_L)
                        y = tl.sum(h * C_sub[:, :, None], axis=1)
                        if HAS_D:
                            y += skip[None, :] * u
                        sig_z = tl.sigmoid(z)
                        dz = dout * y * sig_z * (1.0 + z * (1.0 - sig_z))
                        dz_tile = dz if N_SUB == 1 else common.put_rows(dz_tile, dz, offs_tile, sub * BLOCK_L, BLOCK_L)
                        dy = dout * z * sig_z
                    else:
                        dy = dout
                    # Relaxed: an acq_rel atomic (Triton's default) fences and invalidates L1 on every call.
                    dC_sub = tl.sum(dy[:, None, :] * h, axis=2)
                    tl.atomic_add(dC_cols[None, :] + t[:, None], dC_sub, mask=mask_ln, sem="relaxed")

                    g, carry = common.scan_adjoint(
                        decay, dy[:, None, :] * C_sub[:, :, None], carry, offs_l, BLOCK_L, REVERSE
                    )
                    g_decayed = g * decay * h_prev
                    g_B = tl.sum(g * B_sub[:, :, None], axis=1)
                    ddt = u * g_B + tl.sum(g_decayed * A[None, :, :], axis=1)
                    grad_A += tl.sum(g_decayed * dt[:, None, :], axis=0)
                    dB_sub = tl.sum(g * dtu[:, None, :], axis=2)
                    tl.atomic_add(dB_cols[None, :] + t[:, None], dB_sub, mask=mask_ln, sem="relaxed")
                    du = dt * g_B
                    if HAS_D:
                        du += skip[None, :] * dy
                        grad_D += tl.sum(dy * u, axis=0)
                    du_tile = du if N_SUB == 1 else common.put_rows(du_tile, du, offs_tile, sub * BLOCK_L, BLOCK_L)
                    ddt_tile = ddt if N_SUB == 1 else common.put_rows(ddt_tile, ddt, offs_tile, sub * BLOCK_L, BLOCK_L)

                ddelta_tile = tl.where(mask_tile[:, None], ddt_tile * dt_grad_tile, 0.0)
                grad_bias += tl.sum(ddelta_tile, axis=0)
                tile_offs = grad_rows[None, :] + t_tile[:, None]
                tl.store(du_ptr + tile_offs, du_tile.to(du_ptr.dtype.element_ty), mask=mask_tile[:, None])
                ddelta_out = ddelta_tile.to(ddelta_ptr.dtype.element_ty)
                tl.store(ddelta_ptr + tile_offs, ddelta_out, mask=mask_tile[:, None])
                if HAS_Z:
                    tl.store(dz_ptr + tile_offs, dz_tile.to(dz_ptr.dtype.element_ty), mask=mask_tile[:, None])

        # Per-(batch, segment) partial sums, reduced by the caller: (batch, n_segments, dim, N) and (..., dim).
        row = batch * n_segments + segment
        tl.store(dA_rows_ptr + (row * dim + offs_d[None, :]) * dstate + offs_n[:, None], grad_A, mask=mask_n[:, None])
        if HAS_D:
            tl.store(dD_rows_ptr + row * dim + offs_d, grad_D)
        if HAS_BIAS:
            tl.store(dbias_rows_ptr + row * dim + offs_d, grad_bias)
