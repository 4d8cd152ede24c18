"""The `faceset` command line. Subcommands import their package lazily: `serve` never loads torch."""
from __future__ import annotations

import sys
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="faceset: train, evaluate, export and serve face recognition models.")


@app.command()
def train(
    config: Annotated[str, typer.Argument(help="YAML config path, or the name of a shipped config (training/configs/)")],
    set_: Annotated[list[str] | None, typer.Option("--set", help="override a config key, e.g. --set optim.lr=0.01")] = None,
    run_dir: Annotated[str | None, typer.Option(help="output folder (default FACESET_RUNS_DIR/<config name>); resumes if it holds a checkpoint")] = None,
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


@app.command("eval")
def eval_(
    model: Annotated[str, typer.Argument(help="a backbone.pt written by training, or untrained:<arch>[:<dim>]")],
    pairs: Annotated[str, typer.Option(help="LFW-style pairs file, or an insightface .bin verification set (relative to FACESET_DATA_DIR unless absolute)")] = "lfw-dev/pairs.txt",
    images: Annotated[str, typer.Option(help="folder of the pairs' images (relative to FACESET_DATA_DIR unless absolute)")] = "lfw-dev/images",
    crop: Annotated[str | None, typer.Option(help="fixed relative crop l,t,r,b applied before resizing (pre-aligned photos)")] = None,
    out: Annotated[str | None, typer.Option(help="folder for eval.json, roc.png and erc.png")] = None,
    flip: Annotated[bool, typer.Option(help="add the embedding of the mirrored image")] = False,
    degradations: Annotated[bool, typer.Option(help="also report magnitude against blur/low-res/occlusion/noise")] = True,
    record: Annotated[bool, typer.Option(help="write the accuracy into the model card (card MODELs only)")] = False,
) -> None:
    """Verification accuracy (10-fold), TAR@FAR and MagFace quality (error-versus-reject).

    MODEL is a model card (card.yaml or its folder): raw photos go through the serving pipeline
    (detect, align, ONNX engine). Or a torch checkpoint, fed pre-aligned or fixed-crop images.
    """
    import json
    from pathlib import Path

    from training.settings import get_settings

    root = get_settings().data_dir
    card = Path(model) / "card.yaml" if Path(model).is_dir() else Path(model)
    if card.suffix in (".yaml", ".yml"):
        from training.evaluate_pipeline import main as pipeline_eval

        result = pipeline_eval(card, _under(root, pairs), _under(root, images), Path(out) if out else None, record)
        typer.echo(json.dumps(result, indent=1))
        return
    import torch

    from training.evaluate import evaluate_checkpoint

    box = tuple(float(v) for v in crop.split(",")) if crop else None
    result = evaluate_checkpoint(model, _under(root, pairs), _under(root, images), box, Path(out) if out else None, torch.device("cpu"), flip, degradations)
    typer.echo(json.dumps(result, indent=1))


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def export(ctx: typer.Context) -> None:
    """Backbone checkpoint -> ONNX + model card after a torch vs ONNX Runtime parity check (see python -m training.export --help)."""
    from training.export import main

    main(ctx.args)


@app.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0 for every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
) -> None:
    """Run the HTTP service (settings from FACESET_* variables; see service/settings.py).

    Without FACESET_REDIS_URL it starts an embedded redis-server with its data in FACESET_DATA_DIR.
    One process per replica: the dynamic batcher shares inferences between its requests.
    """
    import logging

    import uvicorn

    from service.app import create_app
    from service.settings import get_settings

    settings = get_settings()
    logging.basicConfig(level=settings.log_level_number, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=host, port=port, log_level=settings.log_level, proxy_headers=True,
                server_header=False, timeout_graceful_shutdown=30)


def _under(root, path: str):
    from pathlib import Path

    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
