"""Partial FC: class centers sharded over ranks, negatives sampled per step.

An et al., "Partial FC: Training 10 Million Identities on a Single Machine" (ICCV-W 2021).
Rank r holds the centers of classes [start_r, start_r + n_r). Each step the global batch's
embeddings are gathered (with gradient), every rank scores them against its own positives plus
a random sample of its other centers (``sample_rate``), and the margin loss combines the shards
through `ClassLogits` reductions. With sample_rate 1.0 and one rank this is a plain normalised
linear classifier.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from training import dist
from training.heads import HEADS
from training.heads.logits import ClassLogits


def shard_range(num_classes: int, rank: int, world: int) -> tuple[int, int]:
    """[start, stop) of the classes held by `rank`; the first `num_classes % world` ranks hold one more."""
    base, extra = divmod(num_classes, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


@HEADS.register("partial_fc", "linear")
class PartialFC(nn.Module):
    def __init__(self, embedding_size: int, num_classes: int, sample_rate: float = 1.0) -> None:
        super().__init__()
        if not 0.0 < sample_rate <= 1.0:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.num_classes = num_classes
        self.sample_rate = sample_rate
        self.start, self.stop = shard_range(num_classes, dist.rank(), dist.world_size())
        self.num_local = self.stop - self.start
        self.num_sample = max(1, math.ceil(sample_rate * self.num_local))
        self.weight = nn.Parameter(torch.empty(self.num_local, embedding_size))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Seeded per class id, so centers do not depend on how many ranks share them.
        gen = torch.Generator().manual_seed(1234)
        full = torch.randn(self.num_classes, self.weight.shape[1], generator=gen) * 0.01
        with torch.no_grad():
            self.weight.copy_(full[self.start : self.stop])

    def _sample(self, local: torch.Tensor) -> torch.Tensor:
        """Indices of local centers to score: every positive, plus random negatives up to num_sample."""
        if self.num_sample >= self.num_local or not self.training:
            return torch.arange(self.num_local, device=local.device)
        positives = torch.unique(local[local >= 0])
        score = torch.rand(self.num_local, device=local.device)
        score[positives] = 2.0  # positives always kept
        keep = max(self.num_sample, positives.numel())
        return torch.topk(score, keep).indices.sort().values

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> ClassLogits:
        emb = dist.gather_with_grad(embeddings)  # (B_global, D)
        global_labels = dist.gather_nograd(labels)  # (B_global,)
        in_shard = (global_labels >= self.start) & (global_labels < self.stop)
        local = torch.where(in_shard, global_labels - self.start, torch.full_like(global_labels, -1))
        index = self._sample(local)  # (C_s,)
        remap = torch.full((self.num_local,), -1, dtype=torch.long, device=emb.device)
        remap[index] = torch.arange(index.numel(), device=emb.device)
        cols = torch.where(local >= 0, remap[local.clamp(min=0)], local)
        cos = F.linear(F.normalize(emb), F.normalize(self.weight[index]))  # (B_global, C_s)
        return ClassLogits(cos.clamp(-1, 1), cols, global_labels, index + self.start, emb)
