"""Seeded initialisation: the same seed gives the same weights on every device."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch


def seeded_generator(seed: int | torch.Generator | None) -> torch.Generator | None:
    """A CPU generator from a seed; None keeps torch's global RNG."""
    if seed is None or isinstance(seed, torch.Generator):
        return seed
    return torch.Generator().manual_seed(seed)


@torch.no_grad()
def init_on_cpu_(
    param: torch.Tensor, init_fn: Callable[..., torch.Tensor], generator: torch.Generator | None, **kwargs: Any
) -> None:
    """Fill `param` with `init_fn` (an `nn.init` function) drawn on the CPU, where the generator lives.

    Drawing on the CPU and copying gives the same values on every device for a given seed.
    """
    values = torch.empty(param.shape, dtype=param.dtype)
    init_fn(values, generator=generator, **kwargs)
    param.copy_(values)
