"""Run a function on a few CPU processes joined by gloo, to compare sharded losses with one process."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(rank: int, world: int, out_dir: Path, worker: Callable[..., Any], args: tuple) -> None:
    torch.set_num_threads(1)
    # a file rendezvous: no port to race for with other test runs on the machine
    dist.init_process_group("gloo", init_method=f"file://{out_dir / 'rendezvous'}", rank=rank, world_size=world)
    try:
        torch.save(worker(rank, world, *args), out_dir / f"rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def run_sharded(worker: Callable[..., Any], world: int, out_dir: Path, *args) -> list[Any]:
    """worker(rank, world, *args) on `world` processes; returns each rank's result, rank order.

    `worker` must be a module-level function (spawned processes import it by name).
    """
    mp.spawn(_entry, args=(world, out_dir, worker, args), nprocs=world, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(world)]
