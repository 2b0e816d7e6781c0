"""This process's place in a `torch.distributed` process group, and the few collective calls the trainer makes.

Every rank draws the same global batch and computes its contiguous slice (`World.part`); after each optimizer step
the ranks agree on the loss, the clock and any stop request (`agree`).
"""

from __future__ import annotations

import signal
from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class World:
    """This process's place in a `torch.distributed` process group (rank 0 of 1 when there is none)."""

    rank: int = 0
    size: int = 1

    @property
    def distributed(self) -> bool:
        return self.size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def part(self, n: int) -> tuple[int, int]:
        """This rank's contiguous slice [lo, hi) of n examples (sizes differ by at most one across ranks)."""
        return n * self.rank // self.size, n * (self.rank + 1) // self.size


def current_world() -> World:
    """The initialised default process group's rank and size, or a single process."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return World(rank=dist.get_rank(), size=dist.get_world_size())
    return World()


def rank_seed(seed: int, rank: int, step: int) -> int:
    # Ranks > 0 only draw from the global RNG for dropout (DP noise is added on rank 0): give each its own stream.
    return int(np.random.SeedSequence([seed, rank, step]).generate_state(1, dtype=np.uint64)[0] >> 1)


def agree(
    world: World, device: torch.device, loss_sum: float, rows: int, elapsed_s: float, received: int | None
) -> tuple[float, int, float, int | None]:
    """One all-reduce after each optimizer step: the global loss sum and row count, rank 0's clock, and whether
    any rank was asked to stop (SIGTERM wins over SIGINT), so every rank takes the same stopping decision."""
    flags = [float(received == signal.SIGTERM), float(received == signal.SIGINT)]
    where_ = device if device.type == "cuda" else torch.device("cpu")  # NCCL reduces CUDA tensors only
    t = torch.tensor([loss_sum, rows, elapsed_s if world.main else 0.0, *flags], dtype=torch.float64, device=where_)
    torch.distributed.all_reduce(t)
    loss_sum, rows, elapsed_s, term, intr = t.tolist()
    got = signal.SIGTERM if term else signal.SIGINT if intr else None
    return loss_sum, int(rows), elapsed_s, got


def barrier(world: World) -> None:
    if world.distributed:
        torch.distributed.barrier()

