"""`faceset`'s training commands: registered through the faceset.commands entry point, run as typed commands."""
from __future__ import annotations

import subprocess
import sys
from importlib.metadata import entry_points

import numpy as np
import pytest
import typer
from PIL import Image
from typer.testing import CliRunner

from service.cli import PLUGIN_GROUP, build_app
from training.cli import app

TRAINING_COMMANDS = {"train", "eval", "export", "add-style-output", "data", "convert", "caface"}


def test_faceset_help_lists_serve_and_the_installed_training_commands():
    if not any(ep.value == "training.cli:app" for ep in entry_points(group=PLUGIN_GROUP)):
        pytest.fail("faceset-train is not installed (pip install -e training): its commands cannot be registered")
    faceset = build_app()
    assert set(typer.main.get_command(faceset).commands) == {"serve", "model"} | TRAINING_COMMANDS
    result = CliRunner().invoke(faceset, ["--help"])
    assert result.exit_code == 0 and all(f"│ {name} " in result.output for name in {"serve", "model"} | TRAINING_COMMANDS)


def test_registering_the_commands_loads_no_torch():
    code = ("import sys; from service.cli import build_app; from typer.testing import CliRunner; "
            "r = CliRunner().invoke(build_app(), ['caface', '--help']); assert r.exit_code == 0, r.output; "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'torch'))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr[-2000:]


def test_data_split_as_a_command(tmp_path):
    for name, count in [("ann", 2), ("bob", 3), ("cid", 2), ("dee", 1)]:
        for i in range(count):
            (tmp_path / "src" / name).mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "src" / name / f"{i}.png")
    result = CliRunner().invoke(app, ["data", "split", str(tmp_path / "src"), "--train", str(tmp_path / "train"),
                                      "--holdout", str(tmp_path / "hold"), "--every", "2"])
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in (tmp_path / "hold").iterdir()) == ["ann", "cid"]  # every 2nd with 2+ images
    assert sorted(p.name for p in (tmp_path / "train").iterdir()) == ["bob", "dee"]
    assert result.output.strip().startswith("2 training identities")


def test_a_subset_without_its_identities_file_is_a_usage_error(tmp_path):
    result = CliRunner().invoke(app, ["caface", "evaluate", str(tmp_path), "--subset", "features.npz"])
    assert result.exit_code == 2 and "FEATURES.npz:IDENTITIES.txt" in result.output
