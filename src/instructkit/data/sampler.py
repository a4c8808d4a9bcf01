"""The order examples are seen in: a pure function of (seed, epoch), so a resumed run sees exactly the
batches an uninterrupted run would have seen, starting mid-epoch without replaying earlier batches."""

from __future__ import annotations

import math
from typing import Iterator, Sequence


class ResumableSampler:
    """Indices of one epoch, shuffled by seed + epoch; this process's share when there are several.

    Every process gets the same number of indices (the permutation wraps around), so no process
    runs out of batches before the others.
    """

    GROUP = 50  # batches whose examples are sorted by length together when grouping by length

    def __init__(self, size: int, seed: int, rank: int = 0, world: int = 1,
                 lengths: Sequence[int] | None = None, batch_size: int = 1):
        import numpy as np

        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.lengths = None if lengths is None else np.asarray(lengths, dtype=np.int64)
        self.batch_size = batch_size
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
        mine = perm[self.rank::self.world]
        return self._grouped(mine) if self.lengths is not None else mine

    def _grouped(self, order: list[int]) -> list[int]:
        """Batches of similar lengths (less padding): sort windows of GROUP batches by length, cut them
        into batches, and shuffle the batches, all seeded by (seed, epoch)."""
        import random

        import numpy as np

        window = self.GROUP * self.batch_size
        batches = []
        for start in range(0, len(order), window):
            part = np.asarray(order[start:start + window], dtype=np.int64)
            # longest first, ties in their shuffled order (a stable sort, as `sorted` with a key is)
            chunk = part[np.argsort(-self.lengths[part], kind="stable")].tolist()
            batches += [chunk[i:i + self.batch_size] for i in range(0, len(chunk), self.batch_size)]
        random.Random(self.seed * 1000003 + self.epoch).shuffle(batches)
        return [i for batch in batches for i in batch]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start:])

    def __len__(self) -> int:
        return self.per_process() - self.start
