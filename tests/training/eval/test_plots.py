from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from training.eval.plots import plot_erc, plot_roc, save_png_atomic

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plot_roc_writes_png_atomically(tmp_path):
    target = tmp_path / "roc.png"
    target.write_bytes(b"old")  # replaced whole
    far = np.array([0.0, 1e-3, 1e-2, 0.1, 1.0])
    tar = np.array([0.0, 0.5, 0.8, 0.95, 1.0])
    assert plot_roc({"a": (far, tar), "b": (far, tar**2)}, target) == target
    assert target.read_bytes()[:8] == PNG_SIGNATURE
    assert [p.name for p in tmp_path.iterdir()] == ["roc.png"]


def test_plot_erc_writes_png(tmp_path):
    target = tmp_path / "sub" / "erc.png"
    reject = np.arange(20) * 0.05
    plot_erc({"magface": (reject, 0.2 * (1 - reject)), "random": (reject, np.full(20, 0.2))}, target)
    assert target.read_bytes()[:8] == PNG_SIGNATURE
    assert [p.name for p in target.parent.iterdir()] == ["erc.png"]


class _Broken:
    def savefig(self, f, format):
        f.write(b"half a png")
        raise RuntimeError("render failed")


def test_failed_save_leaves_old_file_and_no_temp(tmp_path):
    target = tmp_path / "roc.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        save_png_atomic(_Broken(), target)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["roc.png"]


def test_import_pulls_in_neither_torch_nor_matplotlib():
    code = (
        "import sys, training.eval\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'matplotlib'))\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
