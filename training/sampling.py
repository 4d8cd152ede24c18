"""Deterministic, resumable, rank-sharded epoch sampling.

The global batch at step t is the same set of samples whatever the world size: the epoch's
permutation depends only on (seed, epoch), rank r takes every W-th index, and batches of B per
rank are cut in order. Resuming mid-epoch skips whole batches without loading them.
"""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ShardedEpochSampler(Sampler[int]):
    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world: int = 1) -> None:
        self.n, self.batch, self.seed, self.rank, self.world = num_samples, batch_size, seed, rank, world
        self.epoch, self.start_batch = 0, 0
        if self.batches_per_epoch == 0:
            raise ValueError(f"{num_samples} samples cannot fill one global batch of {batch_size}×{world}")

    @property
    def batches_per_epoch(self) -> int:
        return self.n // (self.batch * self.world)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, start_batch

    def __iter__(self) -> Iterator[int]:
        gen = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.n, generator=gen)[: self.batches_per_epoch * self.batch * self.world]
        mine = perm[self.rank :: self.world]
        return iter(mine[self.start_batch * self.batch :].tolist())

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch
