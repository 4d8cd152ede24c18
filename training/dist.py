"""Distributed helpers with exact gradient semantics for sharded classifiers.

Convention (see docs in heads/partial_fc.py): every rank computes the *same* loss value L over
the global batch. Sharded partial results are combined with ``sum_shards`` (identity backward,
since the downstream graph is replicated on every rank), gathered embeddings go through
``gather_with_grad`` (backward sums the per-rank contributions and returns the local slice),
and terms computed on gathered tensors outside a shard go through ``replicated`` (gradient
scaled by 1/world so that the sum over ranks counts them once). The backbone's DDP wrapper
sums (not averages) gradients, so a world-size-W run equals one process with the same global batch.
"""
from __future__ import annotations

import torch
import torch.distributed as dist


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def rank() -> int:
    return dist.get_rank() if is_dist() else 0


class _GatherWithGrad(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.n = x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, 0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        start = rank() * ctx.n
        return grad[start : start + ctx.n]


class _SumShards(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        return grad


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather along dim 0, differentiable. Identity on one process."""
    return _GatherWithGrad.apply(x) if is_dist() else x


def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    if not is_dist():
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, 0)


def sum_shards(x: torch.Tensor) -> torch.Tensor:
    """Sum a per-shard partial result over ranks; identity backward (downstream is replicated)."""
    return _SumShards.apply(x) if is_dist() else x


def max_shards(x: torch.Tensor) -> torch.Tensor:
    """Elementwise max over ranks, no gradient (used for numerically stable log-sum-exp)."""
    x = x.detach().clone()
    if is_dist():
        dist.all_reduce(x, op=dist.ReduceOp.MAX)
    return x


def mean_ranks(x: torch.Tensor) -> torch.Tensor:
    """Average a no-grad statistic (running buffers) over ranks."""
    x = x.detach().clone()
    if is_dist():
        dist.all_reduce(x)
        x /= world_size()
    return x


def replicated(x: torch.Tensor) -> torch.Tensor:
    """Same value; gradient scaled by 1/world, for terms every rank computes on gathered data."""
    w = world_size()
    if w == 1:
        return x
    return x / w + (x - x / w).detach()


def sum_gradients_hook(state, bucket):
    """DDP comm hook: sum gradients over ranks instead of averaging (see module docstring)."""
    fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
    return fut.then(lambda f: f.value()[0])
