"""Margin losses, one module per method, over the shared margin-softmax base."""
from engines.registry import Registry

LOSSES: Registry = Registry("loss")

from training.losses.base import LossOutput, MarginSoftmaxLoss  # noqa: E402
from training.losses import cluster_margin, combined_margin, coreface, gb_cosface, magface  # noqa: E402,F401

__all__ = ["LOSSES", "LossOutput", "MarginSoftmaxLoss"]


def build_loss(name: str, kwargs: dict | None = None, **context):
    """Build a registered loss; context (num_classes, embedding_size) is passed where the factory asks for it."""
    import inspect

    factory = LOSSES.get(name)
    kwargs = dict(kwargs or {})
    params = inspect.signature(factory).parameters
    kwargs.update({k: v for k, v in context.items() if k in params and k not in kwargs})
    return factory(**kwargs)
