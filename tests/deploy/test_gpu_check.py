"""benchmarks/gpu_check.py, the GPU proof, where there is no GPU: its install table, then exit 3 saying so."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


@pytest.mark.skipif(gpu_check.gpu_count()[0] > 0, reason="a GPU is here: the proof itself runs (not a CI case)")
def test_without_a_gpu_the_proof_prints_the_install_check_and_exits_3(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu_check.py"), "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=300, cwd=REPO)
    assert done.returncode == gpu_check.NO_GPU == 3, done.stderr[-2000:]
    assert "## install checks" in done.stdout and "modules written by two distributions" in done.stdout
    assert done.stdout.strip().splitlines()[-1].startswith("no GPU: ")
