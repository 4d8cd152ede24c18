"""The `faceset` command line. Subcommands import their package lazily: `serve` never loads torch."""
from __future__ import annotations

import os
import sys
from typing import Annotated, Optional

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="faceset: train, evaluate, export and serve face recognition models.")


@app.command()
def train(
    config: Annotated[str, typer.Argument(help="YAML config path, or the name of a shipped config (training/configs/)")],
    set_: Annotated[Optional[list[str]], typer.Option("--set", help="override a config key, e.g. --set optim.lr=0.01")] = None,
    run_dir: Annotated[Optional[str], typer.Option(help="output folder (default FACESET_RUNS_DIR/<config name>); resumes if it holds a checkpoint")] = None,
    nproc: Annotated[int, typer.Option(help="processes on this machine (DDP via torchrun; gloo on CPU, nccl on GPU)")] = 1,
) -> None:
    """Train (or resume training) a backbone with a margin loss."""
    args = [config] + [f"--set={s}" for s in set_ or []] + ([f"--run-dir={run_dir}"] if run_dir else [])
    if nproc > 1:
        from torch.distributed.run import main as torchrun

        torchrun([f"--nproc_per_node={nproc}", "--standalone", "-m", "training.train", *args])
        return
    from training.train import main

    main(args)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
