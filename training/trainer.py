"""The training loop: one process or `torchrun` DDP (gloo on CPU, nccl on GPU).

Every rank runs the same global-batch loss (see training/dist.py), the backbone's DDP sums
gradients over ranks, the classifier is sharded (Partial FC) and BN statistics are global
(training/sync_bn.py), so a W-process run follows the loss curve of one process with the same
global batch (exactly in float64; float32 differs by summation order, which a freshly
initialised network's BN backward amplifies to ~0.5% on some gradients).
"""
from __future__ import annotations

import dataclasses
import logging
import math
import os
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as tdist
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from torch.utils.data import DataLoader

from training import dist
from training.checkpoint import (
    atomic_torch_save,
    latest_checkpoint,
    load_checkpoint,
    load_full_head_weight,
    load_state,
    save_checkpoint,
)
from training.config import TrainConfig
from training.data.build import build_train_dataset, prepare_aligned
from training.heads import HEADS
from training.embedder import Embedder, EmbedderModule
from training.losses import build_loss
from training.metrics_log import MetricsLog
from training.models import build_backbone
from training.sampling import ShardedEpochSampler
from training.scheduler import lr_lambda
from training.settings import TrainingSettings, get_settings
from training.sync_bn import convert_sync_bn

log = logging.getLogger("faceset.train")


def process_group_options(device: torch.device, timeout_s: float) -> dict:
    """init_process_group's arguments: nccl bound to this rank's GPU (device_id), gloo on CPU; both with an
    explicit timeout, since ranks wait on rank 0's data alignment and evaluation longer than NCCL's default."""
    options = {"backend": "gloo", "timeout": timedelta(seconds=timeout_s)}
    if device.type == "cuda":
        options.update(backend="nccl", device_id=device)
    return options


def init_distributed(settings: TrainingSettings | None = None) -> torch.device:
    """Pick this rank's device, make it current, then join the torchrun process group (when launched by
    torchrun): NCCL binds its communicator to the current device, so the order matters."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    device = torch.device("cpu")
    if torch.cuda.is_available():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if world > 1 and not tdist.is_initialized():
        tdist.init_process_group(**process_group_options(device, (settings or get_settings()).dist_timeout_s))
    return device


def resolve(path: str | None, root: Path) -> Path | None:
    if path is None:
        return None
    p = Path(path).expanduser()
    return p if p.is_absolute() else root / p


class Trainer:
    def __init__(self, cfg: TrainConfig, run_dir: Path, settings: TrainingSettings | None = None, device: torch.device | None = None) -> None:
        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.settings = settings or get_settings()
        self.device = device or init_distributed(self.settings)
        torch.manual_seed(cfg.seed)
        self._prepare_data()
        self.dataset = build_train_dataset(cfg.data, self.settings.base_dir(cfg.data.base), seed=cfg.seed)
        self.sampler = ShardedEpochSampler(len(self.dataset), cfg.data.batch_size, cfg.seed, dist.rank(), dist.world_size())
        self.loader = DataLoader(
            self.dataset,
            batch_size=cfg.data.batch_size,
            sampler=self.sampler,
            drop_last=True,
            num_workers=cfg.data.num_workers,
            persistent_workers=False,
            pin_memory=self.device.type == "cuda",
        )
        self.steps_per_epoch = self.sampler.batches_per_epoch
        self.total_steps = cfg.max_steps or math.ceil(cfg.epochs * self.steps_per_epoch)
        self.model = self._build_model()
        self.dtype = next(self.backbone.parameters()).dtype  # float32, or float64 for exactness checks
        self.head = HEADS.build(cfg.head.name, embedding_size=cfg.model.embedding_size, num_classes=self.dataset.num_classes, sample_rate=cfg.head.sample_rate).to(self.device)
        self.loss = build_loss(cfg.loss.name, cfg.loss.kwargs, num_classes=self.dataset.num_classes, embedding_size=cfg.model.embedding_size).to(self.device)
        self.optimizer = self._build_optimizer()
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lr_lambda(cfg.schedule, self.total_steps, self.steps_per_epoch))
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.amp and self.device.type == "cuda")
        self.step = 0
        self.metrics = MetricsLog(self.run_dir)

    # ---- construction -------------------------------------------------------------------
    def _prepare_data(self) -> None:
        """Align raw photos the config names (rank 0; the others wait), before anything reads them."""
        todo = []
        d, e = self.cfg.data, self.cfg.eval
        if d.align_from:
            todo.append((self.settings.data_dir / d.align_from, self.settings.base_dir(d.base) / d.root, d.align_template, d.align_pick))
        if e.images_align_from and e.images:
            todo.append((self.settings.data_dir / e.images_align_from, self.settings.base_dir(e.images_base) / e.images, d.align_template, "central"))
        if todo and dist.rank() == 0:
            for src, dst, template, pick in todo:
                prepare_aligned(src, dst, template, pick)
        if todo and dist.is_dist():
            tdist.barrier()

    def _build_model(self) -> nn.Module:
        m = self.cfg.model
        model = build_backbone(m.backbone, embedding_size=m.embedding_size, dropout=m.dropout, **m.kwargs)
        if m.init:
            state = load_state(resolve(m.init, self.settings.runs_dir))
            model.load_state_dict(state.get("backbone", state.get("state_dict", state)))
        if m.trainable is not None:
            for name, p in model.named_parameters():
                p.requires_grad_(p.requires_grad and name.startswith(tuple(m.trainable)))
        if dist.is_dist() and self.cfg.sync_bn:
            model = convert_sync_bn(model, self.device)
        model.to(self.device)
        self.backbone = model  # the bare module: checkpoints and export use it
        module = EmbedderModule(model)
        if dist.is_dist():  # DDP also broadcasts rank 0's weights, so every rank starts identical
            module = DDP(module, device_ids=[self.device.index] if self.device.type == "cuda" else None, broadcast_buffers=False)
            module.register_comm_hook(None, dist.sum_gradients_hook)
        self.embedder = Embedder(module)
        return module

    def _build_optimizer(self) -> torch.optim.Optimizer:
        o = self.cfg.optim
        groups = [
            {"params": [p for p in self.backbone.parameters() if p.requires_grad], "lr": o.lr * o.backbone_lr_mult},
            {"params": list(self.head.parameters()), "lr": o.lr},
        ]
        loss_params = [p for p in self.loss.parameters() if p.requires_grad]
        if loss_params:
            groups.append({"params": loss_params, "lr": o.lr})
        if o.name == "sgd":
            return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
        return torch.optim.AdamW(groups, lr=o.lr, weight_decay=o.weight_decay)

    # ---- checkpoints --------------------------------------------------------------------
    def save(self) -> Path:
        replicated = {
            "backbone": self.backbone.state_dict(),
            "loss": self.loss.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "step": self.step,
            "world_size": dist.world_size(),
            "config": dataclasses.asdict(self.cfg),
            "num_classes": self.dataset.num_classes,
            "classes": list(self.dataset.classes),
        }
        shard = {"head": self.head.state_dict(), "optimizer": self.optimizer.state_dict()}
        return save_checkpoint(self.run_dir, self.step, replicated, shard, self.cfg.keep_checkpoints)

    def resume(self) -> bool:
        path = latest_checkpoint(self.run_dir)
        if path is None:
            return False
        replicated, shard = load_checkpoint(path)
        self.backbone.load_state_dict(replicated["backbone"])
        self.loss.load_state_dict(replicated["loss"])
        self.scheduler.load_state_dict(replicated["scheduler"])
        self.scaler.load_state_dict(replicated["scaler"])
        self.step = replicated["step"]
        if shard is not None:
            self.head.load_state_dict(shard["head"])
            self.optimizer.load_state_dict(shard["optimizer"])
        else:  # world size changed: reshard the class centers, restart optimizer moments
            full = load_full_head_weight(path)
            with torch.no_grad():
                self.head.weight.copy_(full[self.head.start : self.head.stop])
            log.warning("world size changed since %s: classifier resharded, optimizer state reset", path.name)
        log.info("resumed from %s at step %d", path, self.step)
        return True

    # ---- the loop -----------------------------------------------------------------------
    def _set_train_mode(self, epoch: int) -> None:
        self.model.train()
        self.head.train()
        self.loss.train()
        if self.cfg.model.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        if hasattr(self.loss, "set_epoch"):
            self.loss.set_epoch(epoch)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor):
        images = images.to(self.device, dtype=self.dtype, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.scaler.is_enabled()):
            out = self.loss.forward_batch(self.embedder, self.head, images, labels)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(out.loss).backward()
        if self.step < self.cfg.optim.head_warmup_steps:
            for p in self.backbone.parameters():
                p.grad = None  # skipped by the optimizer: no update, no momentum
        if self.cfg.grad_clip:
            self.scaler.unscale_(self.optimizer)
            nn.utils.clip_grad_norm_(self.backbone.parameters(), self.cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        self.step += 1
        return out

    def fit(self, evaluate=None, stop_at: int | None = None) -> dict:
        """Train to total_steps (resuming where a checkpoint exists). `evaluate(backbone) -> dict` runs at epoch ends.

        `stop_at` ends this run early after that step's checkpoint, as a preempted job would.
        """
        self.resume()
        last_eval: dict = {}
        t0, seen = time.time(), 0
        progress = _progress(self.total_steps, self.step)
        while self.step < self.total_steps:
            epoch, offset = divmod(self.step, self.steps_per_epoch)
            self.sampler.set_epoch(epoch, offset)
            self._set_train_mode(epoch)
            for images, labels in self.loader:
                out = self.train_step(images, labels)
                seen += images.shape[0] * dist.world_size()
                progress.update(1)
                if self.step % self.cfg.log_every == 0 or self.step == 1:
                    rate = seen / max(1e-9, time.time() - t0)
                    parts = {f"loss/{k}": v.item() for k, v in out.parts.items()}
                    self.metrics.log(self.step, loss=out.loss.item(), lr=self.scheduler.get_last_lr()[0], epoch=self.step / self.steps_per_epoch, samples_per_s=rate, **parts)
                    progress.set_postfix(loss=f"{out.loss.item():.3f}")
                if self.step % self.cfg.checkpoint_every == 0 or self.step == stop_at:
                    self.save()
                if self.step >= self.total_steps or self.step == stop_at:
                    break
            if self.step == stop_at and self.step < self.total_steps:
                self.metrics.close()
                return last_eval
            epoch_done = self.step % self.steps_per_epoch == 0 or self.step >= self.total_steps
            if epoch_done:
                self.save()
                if evaluate is not None and dist.rank() == 0 and (self.step // self.steps_per_epoch) % self.cfg.eval.every_epochs == 0:
                    last_eval = evaluate(self.backbone)
                    self.metrics.log(self.step, **{f"eval/{k}": v for k, v in last_eval.items() if isinstance(v, (int, float))})
        progress.close()
        self.export_final()
        self.metrics.close()
        return last_eval

    def export_final(self) -> Path | None:
        """The trained backbone alone (what `faceset export` and fine-tuning start from)."""
        if dist.rank() != 0:
            return None
        path = self.run_dir / "backbone.pt"
        cfg = self.cfg.model
        atomic_torch_save({"backbone": self.backbone.state_dict(), "arch": cfg.backbone, "embedding_size": cfg.embedding_size, "kwargs": dict(cfg.kwargs), "input_size": self.cfg.data.size, "step": self.step, "config": dataclasses.asdict(self.cfg)}, path)
        return path


def _progress(total: int, initial: int):
    from tqdm import tqdm

    return tqdm(total=total, initial=initial, disable=dist.rank() != 0, dynamic_ncols=True, desc="train")
