"""The processes of a run: one, or several under `torchrun` (DistributedDataParallel; NCCL on GPUs, gloo on CPUs).

The batch size is global; rank 0 logs and writes. Collectives used by the run (means, any-flags, gathers) are here so
a single process runs the same code with no communication.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as torch_dist

from tmconvert.converter.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """This process's place in the run: world size, rank, and the device it trains on."""

    world: int = 1
    rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of `tensor` over ranks (a copy; the input is left alone)."""
        if not self.distributed:
            return tensor
        out = tensor.detach().clone()
        torch_dist.all_reduce(out)
        return out / self.world

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any (a collective: every rank must call it)."""
        if not self.distributed:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        torch_dist.all_reduce(value, op=torch_dist.ReduceOp.MAX)
        return bool(value.item())

    def gather(self, obj: Any) -> list[Any]:
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world
        torch_dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.distributed:
            torch_dist.barrier()


def init_distributed(device: str | None = None) -> DistContext:
    """From torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK), or a single process.

    `device`: "cpu", "cuda", or None (CUDA when available). Multi-process runs use NCCL on GPUs, gloo on CPUs.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device not in (None, "cpu", "cuda"):
        raise ConfigError(f"--device {device}: choose cpu or cuda")
    use_cuda = torch.cuda.is_available() if device is None else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not torch_dist.is_initialized():
        torch_dist.init_process_group(backend="nccl" if use_cuda else "gloo", world_size=world, rank=rank)
    return DistContext(world=world, rank=rank, device=dev)
