"""What `pip install .` and `pip install ./training` put on a machine, read from the wheels pip builds.

Built from a copy of the sources so that a stale build/ folder in the checkout cannot hide or add files.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow


def _wheel(project: Path, out: Path) -> zipfile.ZipFile:
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", str(project), "-w", str(out)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    (wheel,) = out.glob("*.whl")
    return zipfile.ZipFile(wheel)


def _metadata(wheel: zipfile.ZipFile, name: str) -> str:
    return wheel.read(next(n for n in wheel.namelist() if n.endswith(f".dist-info/{name}"))).decode()


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, root / name)
    for name in ("service", "engines", "training", "models"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    return root


@pytest.fixture(scope="module")
def base_wheel(sources, tmp_path_factory) -> zipfile.ZipFile:
    return _wheel(sources, tmp_path_factory.mktemp("base"))


def test_the_base_wheel_is_the_service_and_its_models_without_training_or_torch(base_wheel):
    wheel = base_wheel
    modules = {n for n in wheel.namelist() if n.endswith(".py")}
    shipped = {p.relative_to(REPO).as_posix() for room in ("service", "engines") for p in (REPO / room).rglob("*.py")
               if "__pycache__" not in p.parts}
    assert shipped <= modules, sorted(shipped - modules)  # pyproject.toml lists the packages one by one
    # no training/, tests/ or benchmarks/; faceset_models is the top-level models/ folder
    assert {n.split("/")[0] for n in modules} == {"service", "engines", "faceset_models"}
    for model in ("default", "detector", "caface"):  # what the settings' defaults serve, each file its card names
        card = yaml.safe_load((REPO / "models" / model / "card.yaml").read_text())
        files = {"card.yaml"} | {f["path"] for f in card["files"].values()}
        assert {f"faceset_models/{model}/{f}" for f in files} <= set(wheel.namelist()), model
    requires = Parser().parsestr(_metadata(wheel, "METADATA")).get_all("Requires-Dist")
    assert not [r for r in requires if r.split(";")[0].strip().lower().startswith(("torch", "faceset"))]
    assert "faceset = service.cli:main" in _metadata(wheel, "entry_points.txt")
    console = {p.relative_to(REPO).as_posix() for p in (REPO / "service" / "static").rglob("*") if p.is_file()}
    assert console and console <= set(wheel.namelist()), sorted(console - set(wheel.namelist()))  # GET / (package data)


def test_an_installed_base_wheel_serves_its_own_models_and_keeps_state_in_the_users_folder(base_wheel, tmp_path):
    """The settings' defaults from a non-editable install, run outside the checkout: every card loads and verifies."""
    site = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                           base_wheel.filename], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    script = ("from engines.detection.mtcnn import load_card; from engines.fusion import FusionCard\n"
              "from engines.model_card import ModelCard; from service.settings import Settings; s = Settings()\n"
              "ModelCard.load(s.model_card), load_card(s.detector_dir), FusionCard.load(s.fusion_card)\n"
              "print(s.model_card, s.detector_dir, s.fusion_card, s.state_dir, sep='\\n')")
    env = {k: v for k, v in os.environ.items() if not k.startswith("FACESET_")}
    env |= {"PYTHONPATH": str(site), "XDG_STATE_HOME": str(tmp_path / "state")}  # ahead of the checkout's editable
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    *models, state = [Path(line) for line in done.stdout.split()]
    assert models == [site / "faceset_models" / m for m in ("default", "detector", "caface")]
    assert state == tmp_path / "state" / "faceset"


def test_the_training_wheel_holds_every_training_module_and_registers_its_commands(sources, tmp_path):
    wheel = _wheel(sources / "training", tmp_path)
    names = set(wheel.namelist())
    shipped = {f"training/{p.relative_to(REPO / 'training').as_posix()}" for p in (REPO / "training").rglob("*")
               if p.suffix in (".py", ".yaml") and "__pycache__" not in p.parts and p.parent.name != "build"}
    assert shipped and shipped <= names, sorted(shipped - names)
    assert {n.split("/")[0] for n in names} == {"training", "faceset_train-0.1.0.dist-info"}
    metadata = Parser().parsestr(_metadata(wheel, "METADATA"))
    requires = metadata.get_all("Requires-Dist")
    assert "torch==2.13.0" in requires and "faceset==0.1.0" in requires  # exact: a looser torch pulls CUDA builds
    project = tomllib.loads((REPO / "training" / "pyproject.toml").read_text())["project"]
    assert metadata["Requires-Python"] == project["requires-python"]
    assert "[faceset.commands]\ntraining = training.cli:app" in _metadata(wheel, "entry_points.txt")


def test_both_distributions_refuse_python_3_10():
    """engines/batcher.py relies on asyncio.TimeoutError being TimeoutError, true from 3.11."""
    for path in (REPO / "pyproject.toml", REPO / "training" / "pyproject.toml"):
        assert tomllib.loads(path.read_text())["project"]["requires-python"] == ">=3.11"
