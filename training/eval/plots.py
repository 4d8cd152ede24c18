"""ROC and error-versus-reject plots, written to PNG atomically.

matplotlib is imported inside the functions and drawn on an explicit Agg canvas (a bare
``Figure``, not pyplot): importing this module costs nothing, no global backend is switched under
whoever else uses matplotlib in the process, and no display is needed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Mapping

import numpy as np

from engines.atomic import atomic_write


def _new_figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4.5), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(True, which="both", alpha=0.3)
    return fig, ax


def save_png_atomic(fig, path: str | Path) -> Path:
    """Render to a temp file in the target folder, fsync, then os.replace: readers never see half a PNG."""
    return atomic_write(path, lambda f: fig.savefig(f, format="png"))


def plot_roc(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path, title: str = "ROC") -> Path:
    """TAR against FAR (log axis) for each named (far, tar) curve; FAR = 0 points cannot sit on a log axis and are left out."""
    fig, ax = _new_figure(title, "FAR", "TAR")
    for label, (far, tar) in curves.items():
        far, tar = np.asarray(far, dtype=np.float64), np.asarray(tar, dtype=np.float64)
        keep = far > 0
        ax.step(far[keep], tar[keep], where="post", label=label)
    ax.set_xscale("log")
    ax.set_ylim(0.0, 1.005)
    ax.legend(loc="lower right")
    return save_png_atomic(fig, path)


def plot_erc(
    curves: Mapping[str, tuple[np.ndarray, np.ndarray]], path: str | Path, fmr: float = 1e-3, title: str | None = None
) -> Path:
    """FNMR at a fixed FMR against the fraction of lowest-quality pairs rejected, for each named (reject, fnmr) curve."""
    fig, ax = _new_figure(title or f"Error versus reject, FNMR at FMR {fmr:g}", "fraction of pairs rejected", "FNMR")
    for label, (reject, fnmr) in curves.items():
        ax.plot(np.asarray(reject, dtype=np.float64), np.asarray(fnmr, dtype=np.float64), marker=".", label=label)
    ax.set_xlim(0.0, 1.0)
    ax.set_ylim(bottom=0.0)
    ax.legend(loc="upper right")
    return save_png_atomic(fig, path)
