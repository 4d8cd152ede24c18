"""Classifier heads producing cosine logits against (possibly sharded, sampled) class centers."""
from engines.registry import Registry

HEADS: Registry = Registry("head")

from training.heads.logits import ClassLogits  # noqa: E402
from training.heads.partial_fc import PartialFC  # noqa: E402,F401

__all__ = ["HEADS", "ClassLogits", "PartialFC"]
