"""The `faceset` command line: `serve` and `model …` from here, every other command from installed plugins.

A distribution adds commands by naming a `typer.Typer` in the `faceset.commands` entry-point group;
faceset-train (training/) adds `train`, `eval`, `export`, `data …`, `convert …`, `caface …`. A `typer.Typer`
in the `faceset.model` group adds its commands to `faceset model` (`service.model_cli.model_app`). A base
install has `serve` and `model import`. Commands import their modules when they run: `serve` never loads torch.
"""
from __future__ import annotations

from importlib.metadata import entry_points
from typing import Annotated

import typer

from service.model_cli import model_app

PLUGIN_GROUP = "faceset.commands"
MODEL_PLUGIN_GROUP = "faceset.model"

serving = typer.Typer()


@serving.command()
def serve(
    host: Annotated[str, typer.Option(help="interface to listen on (0.0.0.0 for every interface)")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port")] = 8000,
) -> None:
    """Run the HTTP service (settings from FACESET_* variables; see service/settings.py).

    Without FACESET_REDIS_URL it starts an embedded redis-server with its data in FACESET_STATE_DIR.
    One process per replica: the dynamic batcher shares inferences between its requests.
    """
    import logging
    import signal
    import sys

    import uvicorn

    from service.app import create_app
    from service.limits import server_options
    from service.settings import get_settings

    settings = get_settings()
    logging.basicConfig(level=settings.log_level_number, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # uvicorn re-raises SIGTERM once its graceful shutdown is done: without a handler every clean stop by an
    # orchestrator would end as "killed by SIGTERM" (exit 143), like a process killed mid-request
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    uvicorn.run(create_app(settings), host=host, port=port, log_level=settings.log_level, proxy_headers=True,
                server_header=False, timeout_graceful_shutdown=30, **server_options(settings))


def build_app() -> typer.Typer:
    """The `faceset` app: the serving commands plus those of every installed plugin."""
    app = typer.Typer(no_args_is_help=True, add_completion=False)

    @app.callback()
    def faceset() -> None:  # a callback keeps `faceset serve` a subcommand when serve is the only command
        """faceset: serve face recognition models (and train, evaluate and export them where faceset-train is installed)."""

    for commands in [serving, *(ep.load() for ep in entry_points(group=PLUGIN_GROUP))]:
        app.registered_commands += commands.registered_commands
        app.registered_groups += commands.registered_groups
    app.add_typer(model_group(), name="model")
    return app


def model_group() -> typer.Typer:
    """`faceset model`: the base install's commands and those of the `faceset.model` plugins (a fresh group each
    call, so building the app twice does not list a plugin's commands twice)."""
    group = typer.Typer(no_args_is_help=True, help=model_app.info.help)
    for commands in [model_app, *(ep.load() for ep in entry_points(group=MODEL_PLUGIN_GROUP))]:
        group.registered_commands += commands.registered_commands
    return group


def main() -> None:  # pragma: no cover - console entry point
    build_app()()


if __name__ == "__main__":  # pragma: no cover - `python -m service.cli` is `faceset` (torchrun workers use it)
    main()
