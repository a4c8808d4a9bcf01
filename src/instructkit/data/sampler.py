"""The order examples are seen in: a pure function of (seed, epoch), so a resumed run sees exactly the
batches an uninterrupted run would have seen, starting mid-epoch without replaying earlier batches."""

from __future__ import annotations

import math
from typing import Iterator


class ResumableSampler:
    """Indices of one epoch, shuffled by seed + epoch; this process's share when there are several.

    Every process gets the same number of indices (the permutation wraps around), so no process
    runs out of batches before the others.
    """

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1):
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int = 0) -> None:
        """Begin at `epoch`, skipping the first `start` indices of this process's share."""
        self.epoch, self.start = epoch, start

    def per_process(self) -> int:
        return math.ceil(self.size / self.world)

    def order(self) -> list[int]:
        import torch

        perm = torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + self.epoch)).tolist()
        total = self.per_process() * self.world
        perm += perm[: total - len(perm)]
        return perm[self.rank::self.world]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start:])

    def __len__(self) -> int:
        return self.per_process() - self.start
