"""Selective scan (Mamba-1's S6 recurrence) in Triton, forward and backward, no compile step: the `triton` backend.

Same contract as mamba-ssm's `selective_scan_fn` plus `reverse` (scan right to left; `last_state` is then the state
after t = 0); `tmconvert.kernels.selective_scan_ref.selective_scan_naive` is the definition it is tested against.
Kernels: `selective_scan_triton_fwd` / `_bwd` (shared pieces in `_common`); this module picks block sizes, lays out
inputs and wraps both in a `torch.autograd.Function`. Design, measurements and history: docs/kernels.md.

- One program per (batch, block of channels[, segment of the sequence]): each thread owns one channel's N states in
  registers and walks the sequence, so the scan over L and the sum over N need no cross-thread work.
- The backward recomputes instead of storing (batch, dim, L, N) states: the forward saves the state entering every
  chunk of `chunk_len` steps ((batch, dim, L / chunk_len, N) fp32), the backward re-enters each chunk from it.
- Unlike mamba-ssm, the gradient of `last_state` is propagated (it seeds the adjoint recurrence, so it is free).
- fp64 inputs are rejected (the kernels compute in fp32); the reference backend serves them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from tmconvert.kernels.selective_scan_ref import validate_scan_args
from tmconvert.kernels.selective_scan_triton_bwd import selective_scan_bwd_kernel
from tmconvert.kernels.selective_scan_triton_fwd import selective_scan_fwd_kernel

_SUPPORTED_INPUT_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@dataclass(frozen=True)
class LaunchConfig:
    """Block sizes of one call (see the kernels' docstrings). The forward saves the state entering every chunk of
    `chunk_len` steps for the backward; `*_segments` > 1 splits the sequence over that many programs per channel
    block (plus a launch computing each segment's transfer map)."""

    chunk_len: int
    fwd_tile_l: int
    fwd_block_l: int
    fwd_block_d: int
    fwd_warps: int
    fwd_segments: int
    bwd_tile_l: int
    bwd_block_l: int
    bwd_block_d: int
    bwd_warps: int
    bwd_segments: int


def _channel_block(channels_per_group: int, target: int) -> int:
    """The largest power of two <= target dividing channels_per_group, so a block never straddles two B/C groups."""
    block = 1
    while block * 2 <= target and channels_per_group % (block * 2) == 0:
        block *= 2
    return block


def _multiprocessors(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _segments(programs: int, n_chunks: int, device: torch.device, per_multiprocessor: int) -> int:
    """Split the sequence until there are `per_multiprocessor` one-warp programs per multiprocessor (latency
    hiding), at most 16 segments and whole chunks per segment."""
    segments = 1
    while programs * segments < per_multiprocessor * _multiprocessors(device) and segments * 2 <= min(n_chunks, 16):
        segments *= 2
    return segments


def launch_config(batch: int, dim: int, groups: int, dstate: int, seqlen: int, device: torch.device) -> LaunchConfig:
    """One-warp programs, chosen by the H200 sweeps in docs/kernels.md (benchmarks/scan.py --sweep).

    Forward: 16 channels per program (faster than 8-256 channels and 2-8 warps at the ViM shapes), 8-step tiles,
    single-step sub-tiles, fewer channels for N > 32 so a thread holds at most 16 states. When there are fewer than
    16 programs per multiprocessor (long sequences, small batches) the sequence is split into segments until there
    are, with 32 channels per program for N >= 8 (VideoMamba 8 frames: 0.42 ms against 0.63 ms for 16 channels and
    4 segments). Backward: 4-step register blocks of 8 channels, fewer for N > 16 so a thread holds at most 16 of
    each of its ~6 live state arrays, segments only below 2 programs per multiprocessor (ViM-S 2.10 ms, VideoMamba
    1.56 ms, VMamba stage 1 1.61 ms forward+backward, against 2.78, 2.57 and 3.82 ms for the 1-2-step, 16-32-channel
    programs before)."""
    channels = dim // groups
    block_n = triton.next_power_of_2(dstate)
    chunk_len = min(triton.next_power_of_2(seqlen), 64)
    n_chunks = triton.cdiv(seqlen, chunk_len)
    few_programs = batch * dim // _channel_block(channels, 16) < 16 * _multiprocessors(device)
    fwd_width = 32 if few_programs and block_n >= 8 else 16
    fwd_block_d = _channel_block(channels, max(1, min(fwd_width, 512 // block_n)))
    bwd_block_d = _channel_block(channels, max(1, min(8, 128 // block_n)))
    bwd_tile_l = min(chunk_len, 4)
    return LaunchConfig(
        chunk_len=chunk_len,
        fwd_tile_l=min(chunk_len, 8),
        fwd_block_l=1,
        fwd_block_d=fwd_block_d,
        fwd_warps=1,
        fwd_segments=_segments(batch * dim // fwd_block_d, n_chunks, device, per_multiprocessor=16),
        bwd_tile_l=bwd_tile_l,
        bwd_block_l=bwd_tile_l,
        bwd_block_d=bwd_block_d,
        bwd_warps=1,
        bwd_segments=_segments(batch * dim // bwd_block_d, n_chunks, device, per_multiprocessor=2),
    )


def _segment_len(seqlen: int, chunk_len: int, segments: int) -> tuple[int, int]:
    """(segment length, number of non-empty segments): whole chunks per segment."""
    segment_len = triton.cdiv(triton.cdiv(seqlen, chunk_len), segments) * chunk_len
    return segment_len, triton.cdiv(seqlen, segment_len)


def _check_config(cfg: LaunchConfig, channels_per_group: int) -> None:
    """Block sizes the kernels rely on: channel blocks inside one B/C group, tiles that split chunks evenly."""
    ok = (
        channels_per_group % cfg.fwd_block_d == 0
        and channels_per_group % cfg.bwd_block_d == 0
        and cfg.chunk_len % cfg.fwd_tile_l == 0
        and cfg.fwd_tile_l % cfg.fwd_block_l == 0
        and cfg.chunk_len % cfg.bwd_tile_l == 0
        and cfg.bwd_tile_l % cfg.bwd_block_l == 0
        and min(cfg.fwd_segments, cfg.bwd_segments) >= 1
    )
    if not ok:
        raise ValueError(f"selective_scan_triton: invalid {cfg} for {channels_per_group} channels per B/C group")


def _new_output(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Uninitialised buffer for a kernel to fill completely (tests replace this with a NaN-filled one)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _unit_stride_l(t: torch.Tensor) -> torch.Tensor:
    """Views are fine as long as the sequence axis is contiguous; only then copy (as mamba-ssm does)."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _state_major_fp32(t: torch.Tensor) -> torch.Tensor:
    """(batch, G, N, L) fp32 with the state axis contiguous. Every thread of the forward reads the whole (steps, N)
    tile of B and C: 16-byte loads and no per-thread bf16 unpacking. B and C are small (N/dim of u's bytes)."""
    if t.dtype == torch.float32 and t.stride(-2) == 1:
        return t
    return t.transpose(-1, -2).to(torch.float32, memory_format=torch.contiguous_format).transpose(-1, -2)


@dataclass(frozen=True)
class _ScanInputs:
    """Kernel-ready inputs: L-contiguous activations, grouped (batch, G, N, L) B/C (any strides), fp32 contiguous
    parameters."""

    u: torch.Tensor
    delta: torch.Tensor
    A: torch.Tensor
    B: torch.Tensor
    C: torch.Tensor
    D: torch.Tensor | None
    z: torch.Tensor | None
    delta_bias: torch.Tensor | None

    @staticmethod
    def of(u, delta, A, B, C, D, z, delta_bias) -> _ScanInputs:  # type: ignore[no-untyped-def]
        def param(p: torch.Tensor | None) -> torch.Tensor | None:
            return None if p is None else p.detach().float().contiguous()

        def grouped(t: torch.Tensor) -> torch.Tensor:
            return t.detach() if t.dim() == 4 else t.detach().unsqueeze(1)

        return _ScanInputs(
            u=_unit_stride_l(u.detach()),
            delta=_unit_stride_l(delta.detach()),
            A=param(A),
            B=grouped(B),
            C=grouped(C),
            D=param(D),
            z=None if z is None else _unit_stride_l(z.detach()),
            delta_bias=param(delta_bias),
        )


def _forward(
    x: _ScanInputs, softplus: bool, reverse: bool, keep_chunk_states: bool, keep_last_state: bool
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None, LaunchConfig]:
    """Launch the forward kernel: out, last_state (if kept), chunk-entry states (if kept), the config used."""
    batch, dim, seqlen = x.u.shape
    groups, dstate = x.B.shape[1], x.A.shape[1]
    block_n = triton.next_power_of_2(dstate)
    device = x.u.device
    cfg = launch_config(batch, dim, groups, dstate, seqlen, device)
    _check_config(cfg, dim // groups)
    segment_len, segments = _segment_len(seqlen, cfg.chunk_len, cfg.fwd_segments)
    n_chunks = triton.cdiv(seqlen, cfg.chunk_len)
    out = _new_output((batch, dim, seqlen), x.u.dtype, device)
    last_state = _new_output((batch, dim, dstate), torch.float32, device) if keep_last_state else None
    chunk_states = _new_output((batch, dim, n_chunks, dstate), torch.float32, device) if keep_chunk_states else None
    transfer = _new_output((batch, segments, 2, block_n, dim), torch.float32, device) if segments > 1 else out
    B, C = _state_major_fp32(x.B), _state_major_fp32(x.C)
    z = x.z if x.z is not None else x.u  # never read when absent; any pointer keeps the signature fixed

    def launch(transfer_only: bool) -> None:
        selective_scan_fwd_kernel[(batch * dim // cfg.fwd_block_d * segments,)](
            x.u,
            x.delta,
            x.A,
            B,
            C,
            x.D if x.D is not None else x.A,
            z,
            x.delta_bias if x.delta_bias is not None else x.A,
            out,
            chunk_states if chunk_states is not None else out,
            last_state if last_state is not None else out,
            transfer,
            dim,
            seqlen,
            dstate,
            dim // groups,
            cfg.chunk_len,
            segments,
            segment_len,
            1,
            x.u.stride(0),
            x.u.stride(1),
            x.delta.stride(0),
            x.delta.stride(1),
            z.stride(0),
            z.stride(1),
            *B.stride(),
            *C.stride(),
            HAS_D=x.D is not None,
            HAS_Z=x.z is not None,
            HAS_BIAS=x.delta_bias is not None,
            SOFTPLUS=softplus,
            REVERSE=reverse,
            STORE_CHUNK_STATES=keep_chunk_states and not transfer_only,
            STORE_LAST_STATE=keep_last_state and not transfer_only,
            TRANSFER_ONLY=transfer_only,
            BLOCK_D=cfg.fwd_block_d,
            BLOCK_N=block_n,
            BLOCK_L=cfg.fwd_block_l,
            TILE_L=cfg.fwd_tile_l,
            num_warps=cfg.fwd_warps,
        )

    if segments > 1:
        launch(transfer_only=True)
    launch(transfer_only=False)
    return out, last_state, chunk_states, cfg


def _backward(
    x: _ScanInputs,
    chunk_states: torch.Tensor,
    cfg: LaunchConfig,
    dout: torch.Tensor,
    dlast: torch.Tensor | None,
    softplus: bool,
    reverse: bool,
) -> tuple[torch.Tensor, ...]:
    """Launch the backward kernel; returns du, ddelta, dA, dB, dC (grouped, fp32), dD, dz, d(delta_bias)."""
    batch, dim, seqlen = x.u.shape
    groups, dstate = x.B.shape[1], x.A.shape[1]
    block_n = triton.next_power_of_2(dstate)
    device = x.u.device
    segment_len, segments = _segment_len(seqlen, cfg.chunk_len, cfg.bwd_segments)
    n_programs = batch * dim // cfg.bwd_block_d * segments
    dout = _unit_stride_l(dout)
    du = _new_output((batch, dim, seqlen), x.u.dtype, device)
    ddelta = _new_output((batch, dim, seqlen), x.delta.dtype, device)
    dz = _new_output((batch, dim, seqlen), x.z.dtype, device) if x.z is not None else None
    dB = torch.zeros((batch, groups, dstate, seqlen), dtype=torch.float32, device=device)  # atomically accumulated
    dC = torch.zeros_like(dB)
    dA_rows = _new_output((batch, segments, dim, dstate), torch.float32, device)
    dD_rows = _new_output((batch, segments, dim), torch.float32, device) if x.D is not None else None
    dbias_rows = _new_output((batch, segments, dim), torch.float32, device) if x.delta_bias is not None else None
    dlast = None if dlast is None else dlast.float().contiguous()
    scratch = _new_output(
        (n_programs, cfg.chunk_len // cfg.bwd_block_l, block_n, cfg.bwd_block_d), torch.float32, device
    )
    transfer = _new_output((batch, segments, 2, block_n, dim), torch.float32, device) if segments > 1 else scratch
    B, C = _state_major_fp32(x.B), _state_major_fp32(x.C)
    z = x.z if x.z is not None else x.u

    def launch(transfer_only: bool) -> None:
        selective_scan_bwd_kernel[(n_programs,)](
            x.u,
            x.delta,
            x.A,
            B,
            C,
            x.D if x.D is not None else x.A,
            z,
            x.delta_bias if x.delta_bias is not None else x.A,
            dout,
            chunk_states,
            dlast if dlast is not None else chunk_states,
            scratch,
            transfer,
            du,
            ddelta,
            dz if dz is not None else du,
            dB,
            dC,
            dA_rows,
            dD_rows if dD_rows is not None else dA_rows,
            dbias_rows if dbias_rows is not None else dA_rows,
            dim,
            seqlen,
            dstate,
            dim // groups,
            cfg.chunk_len,
            segments,
            segment_len,
            1,
            x.u.stride(0),
            x.u.stride(1),
            x.delta.stride(0),
            x.delta.stride(1),
            z.stride(0),
            z.stride(1),
            dout.stride(0),
            dout.stride(1),
            *B.stride(),
            *C.stride(),
            *dB.stride()[:3],
            HAS_D=x.D is not None,
            HAS_Z=x.z is not None,
            HAS_BIAS=x.delta_bias is not None,
            SOFTPLUS=softplus,
            REVERSE=reverse,
            HAS_DLAST=dlast is not None,
            TRANSFER_ONLY=transfer_only,
            BLOCK_D=cfg.bwd_block_d,
            BLOCK_N=block_n,
            BLOCK_L=cfg.bwd_block_l,
            TILE_L=cfg.bwd_tile_l,
            num_warps=cfg.bwd_warps,
        )

    if segments > 1:
        launch(transfer_only=True)
    launch(transfer_only=False)
    dD = dD_rows.sum((0, 1)) if dD_rows is not None else None
    dbias = dbias_rows.sum((0, 1)) if dbias_rows is not None else None
    return du, ddelta, dA_rows.sum((0, 1)), dB, dC, dD, dz, dbias


class _SelectiveScanTritonFn(torch.autograd.Function):
    """out, last_state = scan(...); saves the inputs and the chunk-entry states, recomputes the rest in backward."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, D, z, delta_bias, softplus: bool, reverse: bool):  # type: ignore[override]
        x = _ScanInputs.of(u, delta, A, B, C, D, z, delta_bias)
        out, last_state, chunk_states, cfg = _forward(
            x, softplus, reverse, keep_chunk_states=True, keep_last_state=True
        )
        ctx.save_for_backward(x.u, x.delta, x.A, x.B, x.C, x.D, x.z, x.delta_bias, chunk_states)
        ctx.cfg, ctx.softplus, ctx.reverse = cfg, softplus, reverse
        ctx.grad_dtypes = tuple(None if t is None else t.dtype for t in (A, B, C, D, delta_bias))
        ctx.B_shape, ctx.C_shape = B.shape, C.shape
        ctx.set_materialize_grads(False)  # an unused output arrives as None, not as a zero tensor
        return out, last_state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlast):  # type: ignore[override]
        u, delta, A, B, C, D, z, delta_bias, chunk_states = ctx.saved_tensors
        x = _ScanInputs(u, delta, A, B, C, D, z, delta_bias)
        if dout is None:
            dout = torch.zeros_like(u)
        du, ddelta, dA, dB, dC, dD, dz, dbias = _backward(
            x, chunk_states, ctx.cfg, dout, dlast, ctx.softplus, ctx.reverse
        )
        A_dtype, B_dtype, C_dtype, D_dtype, bias_dtype = ctx.grad_dtypes
        dB = dB.to(B_dtype).reshape(ctx.B_shape)
        dC = dC.to(C_dtype).reshape(ctx.C_shape)
        dA = dA.to(A_dtype)
        dD = dD.to(D_dtype) if dD is not None else None
        dbias = dbias.to(bias_dtype) if dbias is not None else None
        return du, ddelta, dA, dB, dC, dD, dz, dbias, None, None


def selective_scan_triton(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    return_last_state: bool = False,
    reverse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """mamba-ssm's `selective_scan_fn` (plus `reverse`) in Triton; differentiable in every tensor argument.

    u, delta, z: (batch, dim, L) fp32/bf16/fp16; A (dim, N); B, C (batch, N, L) or grouped (batch, G, N, L); D and
    delta_bias (dim,). State and accumulation are fp32; the output has u's dtype, last_state (batch, dim, N) fp32.
    """
    validate_scan_args(u, delta, A, B, C, D, z, delta_bias)
    for name, t in (("u", u), ("delta", delta), ("B", B), ("C", C), ("z", z)):
        if t is not None and t.dtype not in _SUPPORTED_INPUT_DTYPES:
            raise ValueError(f"selective_scan_triton: {name} must be fp32/bf16/fp16, got {t.dtype} (use the reference)")
    tensors = (u, delta, A, B, C, D, z, delta_bias)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        out, last_state = _SelectiveScanTritonFn.apply(*tensors, delta_softplus, reverse)
    else:
        x = _ScanInputs.of(*tensors)
        out, last_state, _, _ = _forward(
            x, delta_softplus, reverse, keep_chunk_states=False, keep_last_state=return_last_state
        )
    return (out, last_state) if return_last_state else out
