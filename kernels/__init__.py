"""Selective scan and depthwise causal conv1d, the two sequence kernels every Mamba mixer needs.

`selective_scan` follows mamba-ssm's `selective_scan_fn` contract (plus `reverse`) and picks a backend per call:
`reference` (pure PyTorch, any device), `triton`, or `cuda` (mamba-ssm's compiled kernel). Heavy or optional
dependencies (triton, mamba-ssm) are imported only when a backend that needs them is first used.

The pure-PyTorch implementations live in `tmconvert.kernels.selective_scan_ref` (`selective_scan_ref`, and the
per-timestep definition `selective_scan_naive`); they are not re-exported here so that the submodule name is never
shadowed by its function of the same name.
"""

from tmconvert.kernels.conv1d import causal_conv1d
from tmconvert.kernels.dispatch import (
    BACKENDS,
    ENV_VAR,
    BackendError,
    available_backends,
    resolve_backend,
    selective_scan,
    use_backend,
)

__all__ = [
    "BACKENDS",
    "ENV_VAR",
    "BackendError",
    "available_backends",
    "causal_conv1d",
    "resolve_backend",
    "selective_scan",
    "use_backend",
]
