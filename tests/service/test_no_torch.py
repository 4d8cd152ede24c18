"""The service process never imports torch (ROADMAP): building the whole pipeline loads none of it."""
from __future__ import annotations

import os
import subprocess
import sys

from typer.testing import CliRunner

CODE = """
import sys
from service.app import build_pipeline, create_app
from service.settings import Settings
settings = Settings()
create_app(settings)
build_pipeline(settings)
assert "torch" not in sys.modules, sorted(m for m in sys.modules if m.startswith("torch"))[:5]
print("ok")
"""


def test_service_does_not_import_torch():
    done = subprocess.run([sys.executable, "-c", CODE], check=False, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_torch_engine_cannot_be_served():
    """FACESET_ENGINE is a closed set of serving runtimes: torch would load torch and the training package."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACESET_")} | {"FACESET_ENGINE": "torch"}
    done = subprocess.run([sys.executable, "-m", "service.cli", "serve", "--port", "1"], env=env, check=False,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "FACESET_ENGINE must be one of onnxruntime, tensorrt, not 'torch'" in done.stderr


def test_a_base_install_has_the_serve_subcommand(monkeypatch):
    """No faceset.commands plugin installed (pip install . alone): `faceset serve` is still a subcommand."""
    import service.cli

    monkeypatch.setattr(service.cli, "entry_points", lambda group: [])
    result = CliRunner().invoke(service.cli.build_app(), ["serve", "--help"])
    assert result.exit_code == 0 and "--port" in result.output, result.output
