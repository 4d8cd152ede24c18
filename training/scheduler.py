"""Learning-rate schedules as per-step multipliers: linear warmup, then poly / step / cosine / constant."""
from __future__ import annotations

import math
from typing import Callable

from engines.registry import Registry
from training.config import ScheduleConfig

SCHEDULES: Registry = Registry("schedule")


@SCHEDULES.register("poly")
def _poly(cfg: ScheduleConfig, progress: float, epoch: float) -> float:
    return (1.0 - progress) ** cfg.power


@SCHEDULES.register("step")
def _step(cfg: ScheduleConfig, progress: float, epoch: float) -> float:
    return cfg.gamma ** sum(epoch >= m for m in cfg.milestones)


@SCHEDULES.register("cosine")
def _cosine(cfg: ScheduleConfig, progress: float, epoch: float) -> float:
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@SCHEDULES.register("constant")
def _constant(cfg: ScheduleConfig, progress: float, epoch: float) -> float:
    return 1.0


def lr_lambda(cfg: ScheduleConfig, total_steps: int, steps_per_epoch: int) -> Callable[[int], float]:
    """Multiplier of the base lr at optimizer step `step` (0-based)."""
    decay = SCHEDULES.get(cfg.name)
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return decay(cfg, progress, step / steps_per_epoch)

    return f
