"""Entry point for one training process: `python -m training.train CONFIG [--set k=v ...]`.

Launched directly for one process, or by `torchrun --nproc_per_node N -m training.train ...`
(which `faceset train --nproc N` does for you).
"""
from __future__ import annotations

import argparse
import json
import logging
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


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="training.train")
    p.add_argument("config", help="a YAML path or the name of a shipped config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--run-dir", default=None)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run(args.config, args.overrides, args.run_dir)


if __name__ == "__main__":
    main()
