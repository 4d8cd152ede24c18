"""One training process: `faceset train CONFIG [--set k=v ...]` calls `run`.

`faceset train --nproc N` starts N of them under torchrun, each running `faceset train` again.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from training import dist
from training.config import load_config
from training.settings import get_settings


def run(config: str, overrides: list[str], run_dir: str | None = None) -> dict:
    settings = get_settings()
    if settings.num_threads:
        torch.set_num_threads(settings.num_threads)
    cfg = load_config(config, overrides)
    out = Path(run_dir) if run_dir else settings.runs_dir / cfg.name
    from training.evaluate import pair_evaluator
    from training.trainer import Trainer

    trainer = Trainer(cfg, out, settings)
    result = trainer.fit(evaluate=pair_evaluator(cfg.eval, cfg.data.size, settings, trainer.device))
    if dist.rank() == 0:
        print(json.dumps({"run_dir": str(out), "step": trainer.step, **result}))
    if dist.is_dist():
        torch.distributed.destroy_process_group()
    return result
