"""What `pip install .` and `pip install ./training` put on a machine, read from the wheels pip builds.

Built from a copy of the sources so that a stale build/ folder in the checkout cannot hide or add files.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from pathlib import Path

import pytest

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
    for name in ("service", "engines", "training"):
        shutil.copytree(REPO / name, root / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info", "build"))
    return root


def test_the_base_wheel_is_the_service_without_training_or_torch(sources, tmp_path):
    wheel = _wheel(sources, tmp_path)
    modules = {n for n in wheel.namelist() if n.endswith(".py")}
    assert {"service/app.py", "service/cli.py", "engines/onnx_runtime.py", "engines/batcher.py"} <= modules
    assert {n.split("/")[0] for n in modules} == {"service", "engines"}  # no training/, tests/ or benchmarks/
    requires = Parser().parsestr(_metadata(wheel, "METADATA")).get_all("Requires-Dist")
    assert not [r for r in requires if r.split(";")[0].strip().lower().startswith(("torch", "faceset"))]
    assert "faceset = service.cli:main" in _metadata(wheel, "entry_points.txt")


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
