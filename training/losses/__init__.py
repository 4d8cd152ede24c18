"""Margin losses, one module per method, over the shared margin-softmax base."""
from engines.registry import Registry

LOSSES: Registry = Registry("loss")

from training.losses.base import LossOutput, MarginSoftmaxLoss  # noqa: E402
from training.losses import combined_margin  # noqa: E402,F401

__all__ = ["LOSSES", "LossOutput", "MarginSoftmaxLoss"]
