"""Pure-PyTorch selective scan (Mamba's S6 recurrence) with mamba-ssm's `selective_scan_fn` semantics.

Recurrence per batch b, channel d, state n, over time t (right to left when `reverse=True`):

    delta = softplus(delta + delta_bias)                 (each step optional)
    h_t   = exp(delta_t * A[d, n]) * h_{t-1} + delta_t * B[g(d), n, t] * u_t
    y_t   = sum_n C[g(d), n, t] * h_t + D[d] * u_t,   out = y * silu(z)   (each term optional)

with g(d) = d // (dim / G) for grouped B/C of shape (batch, G, N, L). Everything accumulates in fp32 (fp64 for fp64
inputs) and the output is cast back to u's dtype, as in the CUDA kernel.

Two implementations:
- `selective_scan_naive`: the plain per-timestep loop written with autograd-tracked ops. It is the definition and
  the tests' oracle; slow (its autograd graph has a few nodes per timestep).
- `selective_scan_ref`: the default CPU backend. The scan itself is a `torch.autograd.Function` that runs the same
  recurrence in place, vectorised over (batch, dim, N), and back-propagates with the adjoint recurrence (a reverse
  scan) instead of an autograd graph; like mamba-ssm it saves only its inputs and recomputes the states in backward,
  so memory stays O(batch*dim*N*L) transient rather than per layer. The recurrence only multiplies by decays in
  (0, 1], so it cannot overflow for any delta >= 0 and A <= 0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_PARAM_DTYPES = (torch.float32, torch.float64)


def _shape(t: torch.Tensor) -> tuple[int, ...]:
    return tuple(t.shape)


def validate_scan_args(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    z: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
) -> int:
    """Check the mamba-ssm contract (shapes, dtypes, devices); return the number of B/C groups G.

    Violations are programming errors in the caller, hence `ValueError`, not a user-facing error type.
    """
    if u.dim() != 3:
        raise ValueError(f"selective_scan: u must be (batch, dim, seqlen), got shape {_shape(u)}")
    batch, dim, seqlen = u.shape
    if seqlen < 1:
        raise ValueError("selective_scan: seqlen must be >= 1")
    if u.dtype not in _INPUT_DTYPES:
        raise ValueError(f"selective_scan: u must be fp16/bf16/fp32/fp64, got {u.dtype}")
    if _shape(delta) != _shape(u) or delta.dtype != u.dtype:
        raise ValueError(f"selective_scan: delta must match u {_shape(u)} {u.dtype}, got {_shape(delta)} {delta.dtype}")
    if A.dim() != 2 or A.shape[0] != dim or A.dtype not in _PARAM_DTYPES:
        raise ValueError(f"selective_scan: A must be ({dim}, N) fp32, got {_shape(A)} {A.dtype}")
    dstate = A.shape[1]
    if B.dim() == 3:
        groups = 1
        expected = (batch, dstate, seqlen)
    elif B.dim() == 4:
        groups = B.shape[1]
        expected = (batch, groups, dstate, seqlen)
        if groups < 1 or dim % groups:
            raise ValueError(f"selective_scan: B/C groups G={groups} must divide dim={dim}")
    else:
        raise ValueError(
            f"selective_scan: B must be (batch, N, seqlen) or (batch, G, N, seqlen) = {(batch, dstate, seqlen)}, "
            f"got {_shape(B)}"
        )
    for name, t in (("B", B), ("C", C)):
        if _shape(t) != expected:
            raise ValueError(f"selective_scan: {name} must be {expected}, got {_shape(t)}")
        if t.dtype not in _INPUT_DTYPES:
            raise ValueError(f"selective_scan: {name} must be a floating tensor, got {t.dtype}")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None and (_shape(t) != (dim,) or t.dtype not in _PARAM_DTYPES):
            raise ValueError(f"selective_scan: {name} must be ({dim},) fp32, got {_shape(t)} {t.dtype}")
    if z is not None and (_shape(z) != _shape(u) or z.dtype not in _INPUT_DTYPES):
        raise ValueError(f"selective_scan: z must be {_shape(u)} floating, got {_shape(z)} {z.dtype}")
    tensors = [t for t in (u, delta, A, B, C, D, z, delta_bias) if t is not None]
    if any(t.device != u.device for t in tensors):
        raise ValueError(f"selective_scan: all tensors must be on {u.device}, got {[str(t.device) for t in tensors]}")
    return groups


def _compute_dtype(*tensors: torch.Tensor) -> torch.dtype:
    """fp32 accumulation whatever the input dtype; fp64 only when an input is fp64 (tests' exact checks)."""
    return torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32


def _delta_transform(
    delta: torch.Tensor, delta_bias: torch.Tensor | None, delta_softplus: bool, dtype: torch.dtype
) -> torch.Tensor:
    delta = delta.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        # F.softplus with threshold 20 is exactly the CUDA kernel's `x <= 20 ? log1p(exp(x)) : x`.
        delta = F.softplus(delta, beta=1.0, threshold=20.0)
    return delta


def _skip_and_gate(y: torch.Tensor, u: torch.Tensor, D: torch.Tensor | None, z: torch.Tensor | None) -> torch.Tensor:
    if D is not None:
        y = y + u * D.to(y.dtype)[:, None]
    if z is not None:
        y = y * F.silu(z.to(y.dtype))
    return y


def _grouped(t: torch.Tensor) -> torch.Tensor:
    """(batch, N, L) → (batch, 1, N, L): ungrouped B/C is the G = 1 case."""
    return t.unsqueeze(1) if t.dim() == 3 else t


def selective_scan_naive(
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
    """The definition: one autograd-tracked step per timestep. Slow; use as an oracle only."""
    groups = validate_scan_args(u, delta, A, B, C, D, z, delta_bias)
    dtype = _compute_dtype(u, delta, A, B, C)
    batch, dim, seqlen = u.shape
    uf = u.to(dtype)
    delta = _delta_transform(delta, delta_bias, delta_softplus, dtype)
    channel_group = torch.arange(dim, device=u.device) // (dim // groups)
    B_per_channel = _grouped(B).to(dtype)[:, channel_group]  # (batch, dim, N, L)
    C_per_channel = _grouped(C).to(dtype)[:, channel_group]
    A = A.to(dtype)
    state = torch.zeros(batch, dim, A.shape[1], dtype=dtype, device=u.device)
    outputs: list[torch.Tensor | None] = [None] * seqlen
    # One unbind per input, not an index per step: the backward of L indexings would write L full-size gradients.
    delta_t, u_t, B_t, C_t = delta.unbind(-1), uf.unbind(-1), B_per_channel.unbind(-1), C_per_channel.unbind(-1)
    for t in reversed(range(seqlen)) if reverse else range(seqlen):
        decay = torch.exp(delta_t[t][:, :, None] * A)
        state = decay * state + (delta_t[t] * u_t[t])[:, :, None] * B_t[t]
        outputs[t] = (state * C_t[t]).sum(-1)
    out = _skip_and_gate(torch.stack(outputs, dim=-1), uf, D, z).to(u.dtype)
    return (out, state) if return_last_state else out


def _scan_layout(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, groups: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Time-major views so each timestep is one contiguous (batch, G, dim/G, N) block.

    Returns (delta_t, u_t, A_g, B_t, decay): delta_t/u_t (L, b, G, dim/G, 1), A_g (G, dim/G, N),
    B_t (L, b, G, 1, N), decay = exp(delta*A) (L, b, G, dim/G, N).
    """
    batch, dim, seqlen = u.shape
    per_group = dim // groups
    delta_t = delta.permute(2, 0, 1).reshape(seqlen, batch, groups, per_group, 1).contiguous()
    u_t = u.permute(2, 0, 1).reshape(seqlen, batch, groups, per_group, 1).contiguous()
    A_g = A.reshape(groups, per_group, A.shape[1])
    B_t = B.permute(3, 0, 1, 2).unsqueeze(3).contiguous()
    return delta_t, u_t, A_g, B_t, torch.exp(delta_t * A_g)


def _run_recurrence(decay: torch.Tensor, drive: torch.Tensor, reverse: bool, adjoint: bool = False) -> torch.Tensor:
    """h_t = decay_t * h_prev + drive_t along the leading (time) axis, in place in `drive`; returns the states.

    `adjoint=True` runs the backward-pass recurrence g_t = drive_t + decay_prev * g_prev instead, where "prev" is the
    step visited before t (i.e. the step after t in the forward scan, whose decay carries h_t forward).
    """
    order = range(drive.shape[0] - 1, -1, -1) if reverse else range(drive.shape[0])
    previous = None
    for t in order:
        if previous is not None:
            drive[t].addcmul_(decay[previous if adjoint else t], drive[previous])
        previous = t
    return drive


def _log_decay_grad(
    grad_states: torch.Tensor, states: torch.Tensor, decay: torch.Tensor, reverse: bool
) -> torch.Tensor:
    """dL/d(delta*A) = g_t * decay_t * h_prev (zero at the first step, whose h_prev is the zero initial state)."""
    grad = torch.zeros_like(grad_states)
    head, tail = (slice(0, -1), slice(1, None)) if reverse else (slice(1, None), slice(0, -1))
    torch.mul(grad_states[head], states[tail], out=grad[head])
    return grad.mul_(decay)


class _SelectiveScanCore(torch.autograd.Function):
    """y, last_state = scan(u, delta, A, B, C) with delta already biased/softplussed and B/C grouped (b, G, N, L)."""

    @staticmethod
    def forward(ctx, u, delta, A, B, C, reverse: bool):  # type: ignore[override]
        batch, dim, seqlen = u.shape
        groups = B.shape[1]
        delta_t, u_t, _, B_t, decay = _scan_layout(u, delta, A, B, groups)
        states = _run_recurrence(decay, (delta_t * u_t) * B_t, reverse)
        C_t = C.permute(3, 0, 1, 2).unsqueeze(-1).contiguous()  # (L, b, G, N, 1)
        y = torch.matmul(states, C_t).reshape(seqlen, batch, dim).permute(1, 2, 0)
        last_state = states[0 if reverse else seqlen - 1].reshape(batch, dim, -1).clone()
        ctx.save_for_backward(u, delta, A, B, C)
        ctx.reverse = reverse
        ctx.set_materialize_grads(False)  # an unused output (usually last_state) arrives as None, not zeros
        return y, last_state

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y, grad_last):  # type: ignore[override]
        u, delta, A, B, C = ctx.saved_tensors
        reverse = ctx.reverse
        batch, dim, seqlen = u.shape
        groups, dstate = B.shape[1], A.shape[1]
        per_group = dim // groups
        delta_t, u_t, A_g, B_t, decay = _scan_layout(u, delta, A, B, groups)
        states = _run_recurrence(decay, (delta_t * u_t) * B_t, reverse)
        C_t = C.permute(3, 0, 1, 2).unsqueeze(3).contiguous()  # (L, b, G, 1, N)
        if grad_y is None:
            grad_y = torch.zeros_like(u)
        grad_y_t = grad_y.permute(2, 0, 1).reshape(seqlen, batch, groups, per_group, 1).contiguous()

        # Adjoint recurrence: g_t = dL/dh_t = C_t * grad_y_t + decay_{next} * g_{next}, run against the scan order.
        grad_states = grad_y_t * C_t
        last = 0 if reverse else seqlen - 1
        if grad_last is not None:
            grad_states[last] += grad_last.reshape(batch, groups, per_group, dstate)
        grad_states = _run_recurrence(decay, grad_states, not reverse, adjoint=True)

        # h_t = exp(delta_t A) h_prev + delta_t u_t B_t: chain rule through the log-decay delta*A and the drive.
        grad_log_decay = _log_decay_grad(grad_states, states, decay, reverse)  # (L, b, G, dg, N)
        grad_drive_B = torch.matmul(grad_states, B_t.transpose(-1, -2))  # sum_n g * B: (L, b, G, dg, 1)
        grad_delta = (grad_log_decay * A_g).sum(-1, keepdim=True) + grad_drive_B * u_t
        grad_u = grad_drive_B * delta_t
        grad_A = (grad_log_decay * delta_t).sum((0, 1)).reshape(dim, dstate)
        # Sums over the channels of a group as (1, dg) @ (dg, N) products: (L, b, G, 1, N) → (b, G, N, L).
        grad_B = torch.matmul((delta_t * u_t).transpose(-1, -2), grad_states).squeeze(3).permute(1, 2, 3, 0)
        grad_C = torch.matmul(grad_y_t.transpose(-1, -2), states).squeeze(3).permute(1, 2, 3, 0)

        def channel_first(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(seqlen, batch, dim).permute(1, 2, 0)

        return channel_first(grad_u), channel_first(grad_delta), grad_A, grad_B, grad_C, None


def selective_scan_ref(
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
    """Fast pure-PyTorch selective scan, numerically the same as `selective_scan_naive` (any device)."""
    validate_scan_args(u, delta, A, B, C, D, z, delta_bias)
    dtype = _compute_dtype(u, delta, A, B, C)
    uf = u.to(dtype)
    delta = _delta_transform(delta, delta_bias, delta_softplus, dtype)
    y, last_state = _SelectiveScanCore.apply(
        uf, delta, A.to(dtype), _grouped(B).to(dtype), _grouped(C).to(dtype), reverse
    )
    out = _skip_and_gate(y, uf, D, z).to(u.dtype)
    return (out, last_state) if return_last_state else out
