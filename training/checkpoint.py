"""Atomic, resumable checkpoints for (possibly sharded) training.

A checkpoint is a directory ``step-XXXXXXXX/`` holding ``model.pt`` (backbone, loss buffers,
progress, config; written by rank 0) and ``shard-R-of-W.pt`` per rank (its classifier shard and
optimizer state). Ranks write into a hidden temporary directory; rank 0 renames it into place and
then replaces the ``latest`` pointer file, so a crash at any moment leaves the previous
checkpoint intact and ``latest`` always names a complete one.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from engines.atomic import atomic_write, atomic_write_bytes
from training import dist


def atomic_torch_save(obj, path: Path) -> None:
    """torch.save to a temp file beside `path`, fsync, then os.replace."""
    atomic_write(path, lambda f: torch.save(obj, f))


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def _barrier() -> None:
    if dist.is_dist():
        torch.distributed.barrier()


def save_checkpoint(run_dir: Path, step: int, replicated: dict, shard: dict | None = None, keep: int = 2) -> Path:
    """Collective: every rank calls it (`shard` None: nothing per rank). Returns the final checkpoint directory."""
    name = f"step-{step:08d}"
    final = run_dir / name
    tmp = run_dir / f".{name}.tmp"
    if dist.rank() == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    if shard is not None:
        atomic_torch_save(shard, tmp / f"shard-{dist.rank()}-of-{dist.world_size()}.pt")
    if dist.rank() == 0:
        atomic_torch_save(replicated, tmp / "model.pt")
    _barrier()
    if dist.rank() == 0:
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        atomic_write_text(run_dir / "latest", name + "\n")
        _prune(run_dir, keep)
    _barrier()
    return final


def _prune(run_dir: Path, keep: int) -> None:
    ckpts = sorted(p for p in run_dir.glob("step-*") if p.is_dir())
    for old in ckpts[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = Path(run_dir) / "latest"
    if not pointer.exists():
        return None
    path = Path(run_dir) / pointer.read_text().strip()
    return path if (path / "model.pt").exists() else None


def load_state(path: str | Path) -> dict:
    """Any checkpoint faceset writes, on the CPU. Weights only: tensors, dicts, lists, tuples, numbers
    and strings load, any other pickled object is refused (a checkpoint file runs no code)."""
    return torch.load(Path(path), map_location="cpu", weights_only=True)


def load_checkpoint(path: Path) -> tuple[dict, dict | None]:
    """(replicated state, this rank's shard or None when the world size changed)."""
    shard_file = path / f"shard-{dist.rank()}-of-{dist.world_size()}.pt"
    return load_state(path / "model.pt"), load_state(shard_file) if shard_file.exists() else None


def load_full_head_weight(path: Path) -> torch.Tensor:
    """Concatenate every shard's classifier weight (to reshard after a world-size change)."""
    shards = sorted(path.glob("shard-*-of-*.pt"), key=lambda p: int(p.name.split("-")[1]))
    return torch.cat([load_state(p)["head"]["weight"] for p in shards], 0)
