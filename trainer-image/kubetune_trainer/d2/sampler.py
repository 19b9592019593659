"""The training order of a Detectron2 job, resumable at any image (Detectron2's own sampler
always starts from the beginning)."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Sampler


class ResumableStream(Sampler[int]):
    """Detectron2's TrainingSampler order (one endless stream of per-epoch permutations, position
    i going to rank i mod world), able to start at any position of this rank's share.

    A run resumed after each rank took `n` images continues with image n + 1 of the same stream.
    """

    def __init__(self, size: int, rank: int, world: int, seed: int, start: int = 0) -> None:
        if size < 1:
            raise ValueError("ResumableStream needs a non-empty dataset")
        self.size, self.rank, self.world, self.seed, self.start = size, rank, world, seed, start

    def __iter__(self) -> Iterator[int]:
        epoch, offset = divmod(self.start * self.world + self.rank, self.size)
        while True:
            generator = torch.Generator().manual_seed(self.seed + epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
            while offset < self.size:
                yield order[offset]
                offset += self.world
            epoch, offset = epoch + 1, offset - self.size
