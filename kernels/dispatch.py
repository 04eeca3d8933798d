"""Backend choice for `selective_scan`: one entry point, three implementations of the same contract.

- `reference`: `selective_scan_ref`, pure PyTorch, any device (the CPU default).
- `triton`: `tmconvert.kernels.selective_scan_triton.selective_scan_triton`; needs triton and CUDA tensors, or CPU
  tensors under the Triton interpreter (env `TRITON_INTERPRET=1`, used by the tests).
- `cuda`: mamba-ssm's compiled `selective_scan_fn` (CUDA tensors only, N <= 256, its dtype rules). It has no
  `reverse`, so reverse calls flip the sequence axis in and out here.

Selection: explicit `backend=` argument > a `use_backend(...)` block > env `TMCONVERT_SCAN_BACKEND` > automatic
(CPU → reference; CUDA → cuda if importable and it supports the call, else triton if importable, else reference).
Optional dependencies are imported on first use only, so importing `tmconvert.kernels` never pulls in triton or
mamba-ssm.
"""

from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Callable, Iterator
from contextvars import ContextVar

import torch

from tmconvert.kernels.selective_scan_ref import selective_scan_ref, validate_scan_args


class BackendError(ValueError):
    """A requested scan backend is unknown, or cannot run here or on this call."""


BACKENDS = ("reference", "triton", "cuda")
ENV_VAR = "TMCONVERT_SCAN_BACKEND"
_AUTOMATIC = ("", "auto")
_CUDA_MAX_STATE = 256
_CUDA_INPUT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

ScanFn = Callable[..., torch.Tensor | tuple[torch.Tensor, torch.Tensor]]

# Set by `use_backend`: applies to calls that pass no `backend=` (models), ahead of the environment variable.
_scoped_backend: ContextVar[str | None] = ContextVar("tmconvert_scan_backend", default=None)


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Run every `selective_scan` call inside the block on backend `name` (None or "auto": automatic choice).

    This is how callers that do not call the kernel themselves (a model's forward) pick a backend, e.g. to compare
    backends on the same model.
    """
    token = _scoped_backend.set(name if name is not None else "auto")
    try:
        yield
    finally:
        _scoped_backend.reset(token)


@functools.cache
def _load_triton() -> ScanFn | None:
    """The Triton scan, or None when triton or the kernel module cannot be imported."""
    try:
        from tmconvert.kernels.selective_scan_triton import selective_scan_triton
    except ImportError:
        return None
    return selective_scan_triton


@functools.cache
def _load_cuda() -> ScanFn | None:
    """mamba-ssm's `selective_scan_fn`, or None when mamba-ssm or its compiled extension is missing."""
    try:
        from mamba_ssm.ops.selective_scan_interface import selective_scan_fn
    except (ImportError, OSError):  # OSError: the extension exists but its shared libraries do not load
        return None
    return selective_scan_fn


def _triton_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def _unavailable_reason(backend: str, device: torch.device) -> str | None:
    """Why `backend` cannot run on `device`, or None when it can."""
    if backend == "reference":
        return None
    if backend == "triton":
        if _load_triton() is None:
            return "triton or tmconvert.kernels.selective_scan_triton cannot be imported"
        if device.type == "cuda" or (device.type == "cpu" and _triton_interpreter()):
            return None
        return f"it needs CUDA tensors (or CPU with TRITON_INTERPRET=1), got device {device}"
    if _load_cuda() is None:
        return "mamba-ssm's selective_scan_fn cannot be imported (install mamba-ssm with its CUDA build)"
    if device.type != "cuda":
        return f"it needs CUDA tensors, got device {device}"
    return None


def _available_on(device: torch.device) -> list[str]:
    return [name for name in BACKENDS if _unavailable_reason(name, device) is None]


def available_backends(device: torch.device | str | None = None) -> list[str]:
    """The backends usable for tensors on `device`, or (None) anywhere on this machine: its CPU, or its GPU when
    CUDA is present. In `BACKENDS` order."""
    if device is not None:
        return _available_on(torch.device(device))
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    usable = {name for device in devices for name in _available_on(device)}
    return [name for name in BACKENDS if name in usable]


def _requested_backend(requested: str | None) -> tuple[str | None, str]:
    """The explicitly asked-for backend (argument, then env var) or None for automatic, plus where it came from."""
    if requested is not None and requested.strip().lower() not in _AUTOMATIC:
        return requested.strip().lower(), "backend argument"
    if requested is None:
        scoped = _scoped_backend.get()
        if scoped is not None:
            scoped = scoped.strip().lower()
            return (None, "automatic") if scoped in _AUTOMATIC else (scoped, "use_backend()")
        from_env = os.environ.get(ENV_VAR, "").strip().lower()
        if from_env not in _AUTOMATIC:
            return from_env, f"env {ENV_VAR}"
    return None, "automatic"


def _automatic(device: torch.device) -> str:
    if device.type != "cuda":
        return "reference"
    for name in ("cuda", "triton"):
        if _unavailable_reason(name, device) is None:
            return name
    return "reference"


def resolve_backend(device: torch.device, requested: str | None = None) -> str:
    """The backend for tensors on `device`: `requested` > env `TMCONVERT_SCAN_BACKEND` > automatic.

    Raises BackendError when an explicitly requested backend is unknown or cannot run on `device`.
    """
    device = torch.device(device)
    name, source = _requested_backend(requested)
    if name is None:
        return _automatic(device)
    if name not in BACKENDS:
        raise BackendError(f"unknown selective-scan backend {name!r} ({source}); choose one of {', '.join(BACKENDS)}")
    reason = _unavailable_reason(name, device)
    if reason is not None:
        raise BackendError(
            f"selective-scan backend {name!r} ({source}) is not available: {reason}; "
            f"available on {device.type}: {', '.join(_available_on(device))}"
        )
    return name


def _cuda_unsupported_reason(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
) -> str | None:
    """Why mamba-ssm's kernel would reject this call (its csrc checks), or None when it accepts it."""
    if u.dtype not in _CUDA_INPUT_DTYPES:
        return f"inputs must be fp32/fp16/bf16, got {u.dtype}"
    if A.dtype != torch.float32:
        return f"A must be fp32, got {A.dtype}"
    if A.shape[1] > _CUDA_MAX_STATE:
        return f"state size N={A.shape[1]} exceeds {_CUDA_MAX_STATE}"
    if any(t.dtype != u.dtype for t in (B, C) + ((z,) if z is not None else ())):
        return f"B, C and z must have u's dtype {u.dtype}"
    if any(t is not None and t.dtype != torch.float32 for t in (D, delta_bias)):
        return "D and delta_bias must be fp32"
    return None


def _run_cuda(
    scan_fn: ScanFn,
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    z: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    return_last_state: bool,
    reverse: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Call mamba-ssm's forward-only kernel; a reverse scan is the forward scan of the time-flipped sequence."""
    if reverse:
        u, delta, B, C = (t.flip(-1) for t in (u, delta, B, C))
        z = z.flip(-1) if z is not None else None
    result = scan_fn(u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state)
    if not reverse:
        return result
    if return_last_state:
        out, last_state = result
        return out.flip(-1), last_state  # after the flipped scan's last step, i.e. original t = 0
    return result.flip(-1)


def _backend_for_call(
    device: torch.device, dtype: torch.dtype, requested: str | None, cuda_unsupported: Callable[[], str | None]
) -> str:
    """`resolve_backend`, then step down when the chosen kernel would reject this particular call.

    mamba-ssm's kernel has its own limits (`cuda_unsupported`); both compiled kernels take fp32/fp16/bf16 only, so an
    automatic choice sends float64 calls to `reference`. An explicitly requested `cuda` that cannot run the call is an
    error (the Triton kernel raises its own).
    """
    name = resolve_backend(device, requested)
    explicit, source = _requested_backend(requested)
    if explicit is None and dtype not in _CUDA_INPUT_DTYPES:
        return "reference"
    if name != "cuda":
        return name
    reason = cuda_unsupported()
    if reason is None:
        return name
    if explicit is not None:
        raise BackendError(f"selective-scan backend 'cuda' ({source}) cannot run this call: {reason}")
    return "triton" if _unavailable_reason("triton", device) is None else "reference"


def selective_scan(
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
    *,
    backend: str | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """mamba-ssm's `selective_scan_fn` (plus `reverse`) on the chosen backend; see the module docstring.

    Opaque to `torch.compile` (a graph break): the compiled model's other parts fuse around the scan, and neither
    compiled kernel is retraced (Inductor cannot recompile the Triton kernels, which read module-level constants).
    """
    if torch.compiler.is_compiling():  # TorchDynamo is tracing: call the scan as an opaque (disabled) function
        return _compile_opaque_scan()(
            u, delta, A, B, C, D, z, delta_bias, delta_softplus, return_last_state, reverse, backend=backend
        )
    validate_scan_args(u, delta, A, B, C, D, z, delta_bias)
    args = (u, delta, A, B, C, D, z, delta_bias)
    name = _backend_for_call(u.device, u.dtype, backend, lambda: _cuda_unsupported_reason(*args))
    if name == "cuda":
        return _run_cuda(_load_cuda(), *args, delta_softplus, return_last_state, reverse)
    scan_fn = _load_triton() if name == "triton" else selective_scan_ref
    return scan_fn(*args, delta_softplus=delta_softplus, return_last_state=return_last_state, reverse=reverse)


@functools.cache
def _compile_opaque_scan() -> ScanFn:
    """`selective_scan` behind `torch.compiler.disable`, made when first traced: the decorator imports TorchDynamo,
    and with it triton, which importing `tmconvert.kernels` must not."""
    return torch.compiler.disable(selective_scan)
