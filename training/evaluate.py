"""Evaluate a torch backbone on an LFW-style pairs benchmark (training-time and `faceset eval --torch`)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from torch import nn

from training.config import EvalConfig
from training.data.transforms import Preprocess
from training.eval.pairs import evaluate_pairs, read_pairs


@torch.no_grad()
def embed_paths(model: nn.Module, paths: Sequence[Path], preprocess: Preprocess, device: torch.device, batch_size: int = 64, flip: bool = False) -> np.ndarray:
    """Raw (unnormalised) embeddings of image files, (N, D); with `flip`, the sum over the mirrored image too."""
    was_training = model.training
    model.eval()
    out = []
    for i in range(0, len(paths), batch_size):
        x = torch.stack([preprocess(p) for p in paths[i : i + batch_size]]).to(device)  # (B, 3, H, W)
        e = model(x).float()
        if flip:
            e = e + model(torch.flip(x, dims=[3])).float()
        out.append(e.cpu().numpy())
    model.train(was_training)
    return np.concatenate(out, 0)


@dataclass
class PairEmbeddings:
    a: np.ndarray  # (N, D) raw embeddings of each pair's first image (norm = MagFace magnitude)
    b: np.ndarray  # (N, D) second image
    issame: np.ndarray  # (N,) bool


def embed_pairs(model: nn.Module, pairs_file: Path, images_dir: Path, preprocess: Preprocess, device: torch.device, flip: bool = False) -> PairEmbeddings:
    """Embed every image of a pairs file once, and return both sides of every pair."""
    pairs = read_pairs(pairs_file, images_dir)
    unique = sorted({p for pair in pairs for p in (pair.path_a, pair.path_b)})
    index = {p: i for i, p in enumerate(unique)}
    emb = embed_paths(model, unique, preprocess, device, flip=flip)
    a = emb[[index[p.path_a] for p in pairs]]
    b = emb[[index[p.path_b] for p in pairs]]
    return PairEmbeddings(a, b, np.array([p.issame for p in pairs]))


def pair_summary(pe: PairEmbeddings, n_folds: int = 10) -> dict:
    s = evaluate_pairs(pe.a, pe.b, pe.issame, n_folds=n_folds).summary()
    return {"accuracy": s["accuracy_mean"], "accuracy_std": s["accuracy_std"], "best_threshold": s["best_threshold"], "pairs": int(pe.issame.size)}


def pair_evaluator(cfg: EvalConfig, size: int, data_dir: Path, device: torch.device) -> Callable[[nn.Module], dict] | None:
    """The epoch-end evaluation the config asks for, or None."""
    if not cfg.pairs:
        return None
    pairs_file = Path(cfg.pairs) if Path(cfg.pairs).is_absolute() else data_dir / cfg.pairs
    images = Path(cfg.images) if cfg.images and Path(cfg.images).is_absolute() else data_dir / (cfg.images or "")
    preprocess = Preprocess(size=size, crop=tuple(cfg.crop) if cfg.crop else None)

    def run(model: nn.Module) -> dict:
        return pair_summary(embed_pairs(model, pairs_file, images, preprocess, device), cfg.n_folds)

    return run
