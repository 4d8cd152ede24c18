"""The training loop on tiny synthetic folders: smoke, resume, and DDP == one process."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from PIL import Image

from tests.helpers import free_port
from training.config import load_config
from training.metrics_log import read_metrics
from training.models import build_backbone
from training.settings import TrainingSettings

pytestmark = pytest.mark.slow


def make_folder_dataset(root: Path, classes: int = 6, per_class: int = 6, size: int = 112) -> Path:
    """Identities whose images share a per-class pattern plus noise, so the loss can fall."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        base = rng.integers(0, 256, (size // 8, size // 8, 3)).repeat(8, 0).repeat(8, 1)
        (root / f"id{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            img = np.clip(base + rng.normal(0, 20, base.shape), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / f"id{c:02d}" / f"{i}.png")
    return root


def tiny_config(data_root: Path, batch: int, steps: int, extra: tuple[str, ...] = ()):
    overrides = [
        f"data.root={data_root}",
        f"data.batch_size={batch}",
        "data.num_workers=0",
        "data.augment={hflip: 0.0}",
        "model.embedding_size=64",
        f"max_steps={steps}",
        "checkpoint_every=2",
        "log_every=1",
        "schedule.warmup_epochs=0",
        "grad_clip=null",
        *extra,
    ]
    return load_config("smoke", overrides)


def _settings(tmp: Path) -> TrainingSettings:
    return TrainingSettings(data_dir=tmp, runs_dir=tmp / "runs")


def _train(cfg, run_dir: Path, settings: TrainingSettings, stop_at: int | None = None, dtype=torch.float32) -> None:
    from training.trainer import Trainer

    torch.set_num_threads(1)
    torch.set_default_dtype(dtype)  # the model is built in this precision; the trainer follows it
    Trainer(cfg, run_dir, settings, device=torch.device("cpu")).fit(stop_at=stop_at)


def _losses(run_dir: Path) -> list[float]:
    return [m["loss"] for m in read_metrics(run_dir)]


def test_smoke_run_writes_checkpoints_and_backbone(tmp_path):
    data = make_folder_dataset(tmp_path / "data")
    cfg = tiny_config(data, batch=8, steps=4)
    _train(cfg, tmp_path / "run", _settings(tmp_path))
    run = tmp_path / "run"
    assert (run / "latest").read_text().strip() == "step-00000004"
    assert sorted(p.name for p in run.glob("step-*")) == ["step-00000002", "step-00000004"]
    assert not list(run.glob(".*tmp*")), "temporary checkpoint files left behind"
    losses = _losses(run)
    assert len(losses) == 4 and all(np.isfinite(losses))
    art = torch.load(run / "backbone.pt", weights_only=False)
    assert art["arch"] == "mobilefacenet" and art["embedding_size"] == 64 and art["step"] == 4


def test_resume_continues_exactly(tmp_path):
    """6 steps straight == stopped after 3 (mid-epoch, between checkpoints), then resumed (same losses, same weights)."""
    data = make_folder_dataset(tmp_path / "data")
    settings = _settings(tmp_path)
    _train(tiny_config(data, 8, 6), tmp_path / "straight", settings)
    _train(tiny_config(data, 8, 6), tmp_path / "resumed", settings, stop_at=3)
    assert len(_losses(tmp_path / "resumed")) == 3
    _train(tiny_config(data, 8, 6), tmp_path / "resumed", settings)
    assert np.allclose(_losses(tmp_path / "straight"), _losses(tmp_path / "resumed"), rtol=1e-5)
    a = torch.load(tmp_path / "straight" / "backbone.pt", weights_only=False)["backbone"]
    b = torch.load(tmp_path / "resumed" / "backbone.pt", weights_only=False)["backbone"]
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-5), k


def _ddp_worker(rank: int, world: int, port: int, cfg, run_dir: Path, settings, dtype) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        _train(cfg, run_dir, settings, dtype=dtype)
    finally:
        torch.distributed.destroy_process_group()


@pytest.mark.parametrize("loss", ["arcface", "magface"])
def test_two_process_ddp_matches_one_process(tmp_path, loss):
    """gloo, 2 ranks × batch 8 follows 1 process × batch 16 (classifier sharded, global BN).

    In float64, so that the comparison shows the algorithm is exact: in float32 the different
    summation order alone moves some BN gradients of a fresh network by ~0.5%.
    """
    data = make_folder_dataset(tmp_path / "data")
    settings = _settings(tmp_path)
    extra = (f"loss.name={loss}", "loss.kwargs={}" if loss == "magface" else "loss.kwargs={scale: 32.0, margin: 0.3}")
    try:
        _train(tiny_config(data, 16, 3, extra), tmp_path / "single", settings, dtype=torch.float64)
    finally:
        torch.set_default_dtype(torch.float32)
    mp.spawn(_ddp_worker, args=(2, free_port(), tiny_config(data, 8, 3, extra), tmp_path / "ddp", settings, torch.float64), nprocs=2, join=True)
    single, ddp = _losses(tmp_path / "single"), _losses(tmp_path / "ddp")
    assert len(single) == len(ddp) == 3
    assert single[0] != single[-1], "training did not move"
    np.testing.assert_allclose(ddp, single, rtol=1e-9)
    a = torch.load(tmp_path / "single" / "backbone.pt", weights_only=False)["backbone"]
    b = torch.load(tmp_path / "ddp" / "backbone.pt", weights_only=False)["backbone"]
    worst = max((a[k] - b[k]).abs().max().item() for k in a if a[k].is_floating_point())
    assert worst < 1e-9


def _initial_backbone(cfg):
    torch.manual_seed(cfg.seed)
    return build_backbone(cfg.model.backbone, embedding_size=cfg.model.embedding_size).state_dict()


def test_head_warmup_and_trainable_prefixes_freeze_the_backbone(tmp_path):
    """During head warm-up no backbone weight moves; afterwards only the `trainable` prefixes do."""
    data = make_folder_dataset(tmp_path / "data")
    settings = _settings(tmp_path)
    cfg = tiny_config(data, 8, 2, ("optim.head_warmup_steps=2",))
    _train(cfg, tmp_path / "warm", settings)
    before = _initial_backbone(cfg)
    after = torch.load(tmp_path / "warm" / "backbone.pt", weights_only=False)["backbone"]
    params = {k for k, _ in build_backbone("mobilefacenet", embedding_size=64).named_parameters()}
    assert all(torch.equal(before[k], after[k]) for k in params)

    cfg = tiny_config(data, 8, 2, ("model.trainable=[features]",))
    _train(cfg, tmp_path / "partial", settings)
    after = torch.load(tmp_path / "partial" / "backbone.pt", weights_only=False)["backbone"]
    moved = {k for k in params if not torch.equal(before[k], after[k])}
    assert moved and all(k.startswith("features") for k in moved)


@pytest.mark.data
def test_raw_photos_are_aligned_before_training(tmp_path, data_dir):
    """A config naming raw photos (data.align_from) trains on MTCNN-aligned crops it makes itself."""
    raw = tmp_path / "data" / "raw"
    for ident in sorted(p for p in (data_dir / "celeba-299").iterdir() if p.is_dir())[:4]:
        (raw / ident.name).mkdir(parents=True)
        for photo in sorted(ident.glob("*.jpg"))[:4]:
            (raw / ident.name / photo.name).symlink_to(photo)
    settings = TrainingSettings(data_dir=tmp_path / "data", aligned_dir=tmp_path / "aligned", runs_dir=tmp_path / "runs")
    cfg = load_config("smoke", ["data.root=crops", "data.base=aligned", "data.align_from=raw", "data.batch_size=8",
                                "data.num_workers=0", "model.embedding_size=64", "max_steps=1"])
    _train(cfg, tmp_path / "run", settings)
    crops = sorted((tmp_path / "aligned" / "crops").glob("*/*.jpg"))
    assert len(crops) >= 15  # 16 photos; the detector may miss one
    assert all(Image.open(c).size == (112, 112) for c in crops)
    assert len(_losses(tmp_path / "run")) == 1


def test_process_group_options_bind_nccl_to_the_rank_gpu_with_an_explicit_timeout(monkeypatch):
    from datetime import timedelta

    from training.trainer import process_group_options

    monkeypatch.setenv("FACESET_DIST_TIMEOUT_S", "5400")
    timeout = TrainingSettings().dist_timeout_s
    assert timeout == 5400 and TrainingSettings(dist_timeout_s=7200).dist_timeout_s > 600  # NCCL's default: 10 min
    gpu = process_group_options(torch.device("cuda", 1), timeout)
    assert gpu == {"backend": "nccl", "device_id": torch.device("cuda", 1), "timeout": timedelta(seconds=5400)}
    cpu = process_group_options(torch.device("cpu"), timeout)
    assert cpu == {"backend": "gloo", "timeout": timedelta(seconds=5400)}
    # this torch's init_process_group takes them (gloo here; nccl needs GPUs)
    torch.distributed.init_process_group(**cpu, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        assert torch.distributed.get_backend() == "gloo"
    finally:
        torch.distributed.destroy_process_group()
