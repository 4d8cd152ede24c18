"""service.command_line: a card's provenance command is the command as the user gave it, secrets masked."""
from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from typer.testing import CliRunner

from service.command_line import command_as_run, masked


def test_credentials_in_urls_are_masked():
    assert masked("https://bob:pw@host.org/a.onnx") == "https://***@host.org/a.onnx"
    assert masked("s3://KEY@bucket/m.onnx?x=1&Signature=zz&token=t") == "s3://***@bucket/m.onnx?x=1&Signature=***&token=***"
    assert masked("models/a b.onnx") == "models/a b.onnx"  # paths untouched


def test_only_what_was_given_is_recorded_in_declaration_order_and_quoted():
    app, seen = typer.Typer(), {}

    @app.command("calibrate")
    def calibrate(ctx: typer.Context, model: Path, dataset: Annotated[str | None, typer.Option()] = None,
                  aligned: Annotated[bool, typer.Option()] = False, threads: Annotated[int, typer.Option()] = 0) -> None:
        seen["command"] = command_as_run(ctx)

    @app.command("other")
    def other() -> None: ...

    done = CliRunner().invoke(app, ["calibrate", "--aligned", "./models/a", "--dataset", "my hold-out"])
    assert done.exit_code == 0, done.output
    # threads (a default) is left out; the path is as given, not resolved
    assert seen["command"] == "faceset model calibrate models/a --dataset 'my hold-out' --aligned"
