"""Train the CAFace fusion network on precomputed features (the recognition model stays frozen).

    faceset caface train celeba-caface [--set steps=200 …]

Reads the features of training.caface.features, keeps every `features.eval_every`-th multi-image
CelebA-299 identity out (written to runs/NAME/eval_identities.txt for training.caface.evaluate;
the calibration hold-out is a separate file and never read here), fixes the class centres W_y
from the clean crops and the style normalisation from every training frame, then runs AdamW
(REFERENCE.md: lr 1e-3, weight decay 5e-4; linear warm-up, cosine decay) on random sets
(training.caface.sets.SetSampler). Each step also fuses every set a second time from two chunks
of its frames in another order, assigned in separate batches, for the sequential loss term.

The schedule (training.scheduler, "cosine" with warm-up in steps), checkpoints (training.checkpoint:
runs/NAME/step-N/ with model, optimiser, step and sampler state, written atomically every
`checkpoint_every` steps and picked up by a rerun) and scalars (training.metrics_log:
runs/NAME/metrics.jsonl) are the backbone trainer's. The result is runs/NAME/caface.pt, what
training.caface.export reads.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from engines.model_card import ModelCard
from training.caface.config import CAFaceConfig
from training.caface.loss import caface_loss, centre_loss, class_centres, frame_quality_targets
from training.caface.model import CAFace
from training.caface.sets import Features, SetSampler, split_identities
from training.checkpoint import atomic_torch_save, latest_checkpoint, load_checkpoint, save_checkpoint
from training.config import ScheduleConfig
from training.metrics_log import MetricsLog
from training.scheduler import lr_lambda
from training.settings import get_settings

log = logging.getLogger("faceset.caface.train")

VALIDATION_SETS = 512


def resolve(path: str, base: Path) -> Path:
    return Path(path) if Path(path).is_absolute() else base / path


def training_split(cfg: CAFaceConfig, features: Features) -> tuple[Features, Features]:
    """(fusion training identities, fusion evaluation identities) of the training tree's features."""
    if cfg.features.eval_protected:
        folder = get_settings().aligned_dir / cfg.features.eval_protected
        protected = {p.name for p in folder.iterdir() if p.is_dir() and len(list(p.iterdir())) >= 2}
    else:  # an identity with one image makes no evaluation set
        counts = np.bincount(features.labels, minlength=len(features.identities))
        protected = {str(name) for name, n in zip(features.identities, counts) if n >= 2}
    held = split_identities(features.identities, cfg.features.eval_every, protected)
    return features.subset(~held), features.subset(held)


def magnitude_range(cfg: CAFaceConfig, card: ModelCard) -> tuple[float, float]:
    """(low, high) normalising magnitudes: the config's, else the recognition card's quality range."""
    if cfg.magnitude_range is not None:
        return cfg.magnitude_range
    if card.quality is None or card.quality.method != "magface_linear":
        raise ValueError(f"{card.name}: the card has no magnitude range to normalise magnitudes; set magnitude_range")
    return card.quality.low, card.quality.high


def build_model(cfg: CAFaceConfig, card: ModelCard, train: Features) -> CAFace:
    sizes = train.embedding.shape[-1], train.style.shape[-1]
    if sizes != (cfg.arch.embedding_size, cfg.arch.style_size):
        raise ValueError(f"the features have embeddings of {sizes[0]} and style of {sizes[1]}; the config's arch "
                         f"says {cfg.arch.embedding_size} and {cfg.arch.style_size}")
    torch.manual_seed(cfg.seed)
    model = CAFace(cfg.arch, *magnitude_range(cfg, card))
    style = train.style.reshape(-1, train.style.shape[-1]).astype(np.float64)  # (N·V, S)
    model.set_style_normalisation(torch.from_numpy(style.mean(0)).float(), torch.from_numpy(style.std(0)).float())
    return model


def batch_tensors(features: Features, rows: np.ndarray, variants: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.from_numpy(features.embedding[rows, variants]).float(),
            torch.from_numpy(features.style[rows, variants]).float())  # (F, D), (F, S)


def sequential_fusion(model: CAFace, raw, style, index: torch.Tensor, num_sets: int, generator: torch.Generator):
    """The sets fused from two chunks of their frames (random order, each chunk assigned on its own), memories added."""
    order = torch.randperm(len(raw), generator=generator)
    memories = []
    for chunk in order.tensor_split(2):
        memories.append(model.memory(*model.assign(raw[chunk], style[chunk]), index[chunk], num_sets))
    sums, style_sums, counts = (a + b for a, b in zip(*memories))
    return model.aggregate(sums, style_sums, counts)[0]


@torch.no_grad()
def validation_loss(model: CAFace, features: Features, centres: torch.Tensor, seed: int = 1) -> tuple[float, float]:
    """Centre loss on VALIDATION_SETS fixed random sets of identities never trained on: (CAFace, plain mean of f̂)."""
    model.eval()
    rows, variants, index, labels = SetSampler(features, seed=seed).sample(VALIDATION_SETS)
    raw, style = batch_tensors(features, rows, variants)
    index_t, targets = torch.from_numpy(index), centres[torch.from_numpy(labels)]
    fused = model(raw, style, index_t, VALIDATION_SETS)[0]
    unit = raw / raw.norm(dim=1, keepdim=True)
    mean = torch.zeros(VALIDATION_SETS, raw.shape[1]).index_add_(0, index_t, unit)  # (B, D)
    model.train()
    return float(centre_loss(fused, targets)), float(centre_loss(mean, targets))


def train(cfg: CAFaceConfig, run_dir: Path | None = None) -> Path:
    """Run (or resume) training; returns the path of caface.pt."""
    torch.set_num_threads(cfg.threads)
    runs = get_settings().runs_dir
    run_dir = run_dir or runs / cfg.name
    run_dir.mkdir(parents=True, exist_ok=True)
    card = ModelCard.load(resolve(cfg.recognition_card, Path.cwd()))
    train_set, eval_set = training_split(cfg, Features.load(resolve(cfg.features.train, runs)))
    (run_dir / "eval_identities.txt").write_text("\n".join(map(str, eval_set.identities)) + "\n")
    centres = torch.from_numpy(class_centres(train_set.embedding[:, 0], train_set.labels, len(train_set.identities)))
    eval_centres = torch.from_numpy(class_centres(eval_set.embedding[:, 0], eval_set.labels, len(eval_set.identities)))
    model = build_model(cfg, card, train_set)
    targets = frame_quality_targets(train_set.embedding, train_set.labels, len(train_set.identities),
                                    *cfg.arch.frame_quality_range)  # (N, V)
    optim = torch.optim.AdamW(model.parameters(), lr=cfg.optim.lr, weight_decay=cfg.optim.weight_decay)
    sampler = SetSampler(train_set, cfg.sets.min_size, cfg.sets.max_size, cfg.sets.max_images, seed=cfg.seed,
                         exclude_variants=cfg.sets.exclude_variants)
    generator = torch.Generator().manual_seed(cfg.seed)
    # warm-up counted in steps: one "epoch" per step
    schedule = lr_lambda(ScheduleConfig(name="cosine", warmup_epochs=cfg.optim.warmup_steps), cfg.steps, 1)
    step = 0
    checkpoint = latest_checkpoint(run_dir)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint)[0]
        model.load_state_dict(state["model"]), optim.load_state_dict(state["optim"])
        sampler.rng.bit_generator.state, step = state["sampler"], state["step"]
        generator.set_state(state["generator"])
        log.info("resumed from %s at step %d", checkpoint, step)
    metrics = MetricsLog(run_dir)
    model.train()
    t0 = time.time()
    while step < cfg.steps:
        for group in optim.param_groups:
            group["lr"] = cfg.optim.lr * schedule(step)
        rows, variants, index, labels = sampler.sample(cfg.batch_sets)
        raw, style = batch_tensors(train_set, rows, variants)
        index_t = torch.from_numpy(index)
        assignment, unit, stored = model.assign(raw, style)
        fused = model.aggregate(*model.memory(assignment, unit, stored, index_t, cfg.batch_sets))[0]
        sequential = sequential_fusion(model, raw, style, index_t, cfg.batch_sets, generator)
        loss, terms = caface_loss(fused, sequential, centres[torch.from_numpy(labels)], stored[:, -2],
                                  torch.from_numpy(targets[rows, variants]))
        optim.zero_grad(set_to_none=True)
        loss.backward()
        optim.step()
        step += 1
        if step % cfg.log_every == 0 or step == cfg.steps:
            metrics.log(step, loss=loss.item(), lr=optim.param_groups[0]["lr"], frames=len(rows), **terms)
            log.info("step %d/%d loss %.5f centre %.5f sequential %.2e frame quality %.4f (%.0f s)", step, cfg.steps,
                     loss.item(), terms["centre"], terms["sequential"], terms["frame_quality"], time.time() - t0)
        if step % cfg.checkpoint_every == 0 or step == cfg.steps:
            val, val_mean = validation_loss(model, eval_set, eval_centres)
            metrics.log(step, val_centre=val, val_centre_plain_mean=val_mean)
            log.info("step %d: validation centre loss %.5f (plain mean %.5f) on %d held-out identities", step, val,
                     val_mean, len(eval_set.identities))
            save_checkpoint(run_dir, step, {"model": model.state_dict(), "optim": optim.state_dict(), "step": step,
                                            "sampler": sampler.rng.bit_generator.state,
                                            "generator": generator.get_state()})
    metrics.close()
    out = run_dir / "caface.pt"
    atomic_torch_save({"state_dict": model.state_dict(), "arch": cfg.arch.model_dump(),
                       "quality_range": list(magnitude_range(cfg, card)), "config": cfg.model_dump(),
                       "recognition": {"name": card.name, "version": card.version, "sha256": card.files.onnx.sha256},
                       "features_model": train_set.model, "step": step,
                       "training_identities": len(train_set.identities)}, out)
    return out
