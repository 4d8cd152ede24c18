"""Cosine logits over the class centers this rank holds, with shard-aware reductions.

Every margin loss reads and writes logits through this object, so the same loss code runs on
one process or with the classifier sharded over ranks (Partial FC).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from training import dist


@dataclass
class ClassLogits:
    cos: torch.Tensor  # (B, C_local) cosine of every global-batch sample to this rank's sampled centers
    labels: torch.Tensor  # (B,) column of the target in `cos`, or -1 where the target is on another rank
    global_labels: torch.Tensor  # (B,) class ids over all ranks
    class_ids: torch.Tensor  # (C_local,) global class id of every column
    embeddings: torch.Tensor  # (B, D) the gathered, unnormalised embeddings `cos` was computed from

    @property
    def local_rows(self) -> torch.Tensor:
        return self.labels >= 0

    def target_local(self, x: torch.Tensor) -> torch.Tensor:
        """x[i, label_i] where the label is on this rank, else 0. Shape (B,)."""
        rows = self.local_rows
        out = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        idx = rows.nonzero(as_tuple=True)[0]
        return out.index_put((idx,), x[idx, self.labels[idx]])

    def target(self, x: torch.Tensor) -> torch.Tensor:
        """x[i, label_i] over all shards. Shape (B,)."""
        return dist.sum_shards(self.target_local(x))

    def with_target(self, x: torch.Tensor, new_target: torch.Tensor) -> torch.Tensor:
        """Copy of x with x[i, label_i] replaced by new_target[i] on the rows whose label is local."""
        idx = self.local_rows.nonzero(as_tuple=True)[0]
        return x.index_put((idx, self.labels[idx]), new_target[idx])

    def negative_mask(self) -> torch.Tensor:
        """(B, C_local) True where the column is not the sample's target."""
        mask = torch.ones_like(self.cos, dtype=torch.bool)
        idx = self.local_rows.nonzero(as_tuple=True)[0]
        mask[idx, self.labels[idx]] = False
        return mask

    def logsumexp(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """log Σ_j exp(x_ij) over all shards' columns (optionally only where mask). Shape (B,)."""
        if mask is not None:
            x = x.masked_fill(~mask, float("-inf"))
        m = dist.max_shards(x.max(dim=1).values)
        m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
        s = dist.sum_shards(torch.exp(x - m[:, None]).sum(dim=1))
        return torch.log(s) + m

    def cross_entropy(self, logits: torch.Tensor) -> torch.Tensor:
        """Mean softmax cross-entropy of the scaled logits over the classes of every shard."""
        return (self.logsumexp(logits) - self.target(logits)).mean()
