"""Batch norm with statistics over the global batch, on any device.

torch's SyncBatchNorm only runs on GPUs; on CPU (gloo) we compute the global mean and variance
with differentiable all-reduces, so a W-process run normalises exactly like one process with the
same global batch. On CUDA the trainer uses torch's own SyncBatchNorm instead.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dnn
from torch import nn


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 4):
            raise ValueError(f"expected 2D or 4D input, got {x.dim()}D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return super().forward(x)
        dims = [0] + list(range(2, x.dim()))  # every axis but channels
        count = torch.tensor([x.numel() / x.shape[1]], dtype=x.dtype, device=x.device)
        n = dnn.all_reduce(count)
        mean = dnn.all_reduce(x.sum(dims)) / n  # (C,)
        shape = [1, -1] + [1] * (x.dim() - 2)
        var = dnn.all_reduce(((x - mean.view(shape)) ** 2).sum(dims)) / n  # biased, as BN normalises
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach() * n / (n - 1).clamp(min=1))
        y = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor) -> None:
        self.num_batches_tracked += 1
        m = self.momentum if self.momentum is not None else 1.0 / float(self.num_batches_tracked)
        self.running_mean.mul_(1 - m).add_(m * mean)
        self.running_var.mul_(1 - m).add_(m * var)


def convert_sync_bn(module: nn.Module, device: torch.device) -> nn.Module:
    """Every BatchNorm1d/2d becomes global-batch BN (torch SyncBatchNorm on CUDA)."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return _replace(module)


def _replace(module: nn.Module) -> nn.Module:
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        new = GlobalBatchNorm(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats)
        new.load_state_dict(module.state_dict())
        if module.affine:  # keep frozen affines frozen (insightface's embedding BN)
            new.weight.requires_grad_(module.weight.requires_grad)
            new.bias.requires_grad_(module.bias.requires_grad)
        return new
    for name, child in module.named_children():
        setattr(module, name, _replace(child))
    return module
