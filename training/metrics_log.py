"""Scalars to TensorBoard event files and to metrics.jsonl (rank 0 only)."""
from __future__ import annotations

import json
from pathlib import Path

from training import dist


class MetricsLog:
    def __init__(self, run_dir: Path) -> None:
        self.enabled = dist.rank() == 0
        self._jsonl = None
        self._tb = None
        if self.enabled:
            run_dir.mkdir(parents=True, exist_ok=True)
            self._jsonl = open(run_dir / "metrics.jsonl", "a", buffering=1)
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError:  # tensorboard is in the train extra; jsonl still works without it
                SummaryWriter = None
            self._tb = SummaryWriter(str(run_dir / "tb")) if SummaryWriter else None

    def log(self, step: int, **scalars: float) -> None:
        if not self.enabled:
            return
        scalars = {k: float(v) for k, v in scalars.items()}
        self._jsonl.write(json.dumps({"step": step, **scalars}) + "\n")
        if self._tb is not None:
            for k, v in scalars.items():
                self._tb.add_scalar(k, v, step)

    def close(self) -> None:
        if self._jsonl:
            self._jsonl.close()
        if self._tb:
            self._tb.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
