"""A learned per-face quality for one recognition model: a small head on its style statistics and magnitude.

    faceset model quality-head models/mine --data training-photos/      (faceset model fuse trains one too)

A model not trained with MagFace has no quality in its embedding norm. What it does have, once tapped
(`faceset model style`), is a style output: per-channel mean and std of its intermediate maps, which carry how
blurred, dark, small or occluded a face is. The head learns, for this model, how recognisable a face is from
them (and its normalised magnitude), on training identities only, with a CR-FIQA target (Boutros et al., CVPR
2023) measured with the model's own embeddings:

    CR_i = CCS_i / (NNCCS_i + 1 + ε)
    CCS_i   = cos(f̂_i, c_{y_i})    c_y: the mean of the class's clean unit embeddings, face i's own photo left out
    NNCCS_i = max_{k ≠ y_i} cos(f̂_i, c_k)     (every other class's centre, all its clean photos)

for every frame of the features (each photo clean and as 4 poor frames: training.caface.features), so a face
close to its own people and far from everyone else scores high. Identities with one photo have no centre without
it and give no target. The head (standardised inputs, Linear-ReLU-Linear, MSE on the target) is checked on
held-out training identities (every `eval_every`-th), exported as ONNX with a parity check (written atomically
beside the card: inputs `style` (N, S), `magnitude` (N, 1), output `score` (N, 1)) and named in the card's
`quality_head`. It is a candidate only: `faceset model calibrate` runs its error-versus-reject check and the card's
quality uses it only if rejecting the faces it scores lowest lowers FNMR (engines.quality_sources).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

from engines.atomic import sha256_file
from engines.model_card import ModelCard, QualityHead
from engines.quality_sources import HEAD_INPUTS, HEAD_OUTPUT
from training.caface.sets import Features, split_identities
from training.export import OPSET, ParityError, export_traced, staged_files

log = logging.getLogger("faceset.caface.quality_head")

HEAD_FILE = "quality-head.onnx"
EPS = 1e-9
PARITY_MAX_ABS = 1e-4
CHUNK = 4096  # frames per block of the frames × classes cosine matrix


def cr_targets(embedding: np.ndarray, labels: np.ndarray, clean: int = 0) -> np.ndarray:
    """CR-FIQA targets (N, V) of every frame of features (N, V, D) with identity labels (N,); NaN where the
    identity has a single photo. Centres from the clean variant `clean` (module docstring)."""
    unit = embedding / np.linalg.norm(embedding, axis=-1, keepdims=True)  # (N, V, D)
    n, v, d = unit.shape
    c = int(labels.max()) + 1
    sums = np.zeros((c, d))
    np.add.at(sums, labels, unit[:, clean].astype(np.float64))  # (C, D)
    counts = np.bincount(labels, minlength=c)
    centres = sums / np.maximum(np.linalg.norm(sums, axis=1, keepdims=True), 1e-12)  # (C, D)
    own = sums[labels] - unit[:, clean]  # (N, D): the class without this photo
    own /= np.maximum(np.linalg.norm(own, axis=1, keepdims=True), 1e-12)
    ccs = np.einsum("nvd,nd->nv", unit, own)  # (N, V)
    nnccs = np.empty((n, v))
    flat, rows = unit.reshape(n * v, d), np.repeat(labels, v)
    for start in range(0, n * v, CHUNK):
        cos = flat[start : start + CHUNK] @ centres.T  # (chunk, C)
        cos[np.arange(len(cos)), rows[start : start + CHUNK]] = -np.inf  # other classes only
        nnccs.flat[start : start + CHUNK] = cos.max(1)
    cr = ccs / (nnccs + 1 + EPS)
    cr[counts[labels] < 2] = np.nan
    return cr


class QualityHeadNet(nn.Module):
    """score = MLP([(style − μ)/σ, (‖f‖ − m_low)/(m_high − m_low)]) · t_std + t_mean, in the target's units."""

    def __init__(self, style_size: int, hidden: int = 64) -> None:
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(style_size + 1, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        for name, size in (("style_mean", style_size), ("style_std", style_size), ("magnitude_range", 2),
                           ("target_scale", 2)):
            self.register_buffer(name, torch.zeros(size))

    def normalise(self, style: np.ndarray, magnitude: np.ndarray, target: np.ndarray) -> None:
        """Input and target scales from the training frames (style (F, S), magnitude (F,), target (F,))."""
        to = lambda a: torch.as_tensor(np.asarray(a, np.float64), dtype=torch.float32)  # noqa: E731
        self.style_mean.copy_(to(style.mean(0)))
        self.style_std.copy_(to(np.maximum(style.std(0), 1e-6)))
        self.magnitude_range.copy_(to(np.percentile(magnitude, [1, 99])))
        self.target_scale.copy_(to([target.mean(), max(target.std(), 1e-6)]))

    def forward(self, style: torch.Tensor, magnitude: torch.Tensor) -> torch.Tensor:
        low, high = self.magnitude_range[0], self.magnitude_range[1]
        x = torch.cat([(style - self.style_mean) / self.style_std, (magnitude - low) / (high - low)], 1)  # (N, S + 1)
        return self.mlp(x) * self.target_scale[1] + self.target_scale[0]  # (N, 1)


@dataclass(frozen=True)
class Frames:
    """Frames with a target: style (F, S), magnitude (F,), CR target (F,)."""

    style: np.ndarray
    magnitude: np.ndarray
    target: np.ndarray

    @classmethod
    def of(cls, features: Features) -> Frames:
        target = cr_targets(features.embedding, features.labels)  # (N, V)
        keep = np.isfinite(target).ravel()
        style = features.style.reshape(-1, features.style.shape[-1])[keep]
        magnitude = np.linalg.norm(features.embedding, axis=-1).ravel()[keep]
        return cls(style.astype(np.float32), magnitude.astype(np.float32), target.ravel()[keep].astype(np.float32))


def train_head(frames: Frames, steps: int = 1500, batch: int = 512, lr: float = 1e-3, seed: int = 0,
               hidden: int = 64, threads: int = 1) -> QualityHeadNet:
    """MSE regression of the CR target with AdamW (weight decay 1e-4), minibatches drawn with a fixed seed."""
    if len(frames.target) < 2:
        raise ValueError("the quality head needs training identities with two photos or more")
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)  # matrices this small run fastest on one thread (measured: 18 vs 159 ms a step)
    try:
        return _fit(frames, steps, batch, lr, seed, hidden)
    finally:
        torch.set_num_threads(previous)


def _fit(frames: Frames, steps: int, batch: int, lr: float, seed: int, hidden: int) -> QualityHeadNet:
    torch.manual_seed(seed)
    net = QualityHeadNet(frames.style.shape[1], hidden)
    net.normalise(frames.style, frames.magnitude, frames.target)
    style, magnitude, target = (torch.from_numpy(a) for a in (frames.style, frames.magnitude[:, None],
                                                               frames.target[:, None]))
    optimiser = torch.optim.AdamW(net.mlp.parameters(), lr=lr, weight_decay=1e-4)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(len(target), (min(batch, len(target)),), generator=generator)
        loss = nn.functional.mse_loss(net(style[rows], magnitude[rows]), target[rows])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return net.eval()


def predict(net: QualityHeadNet, frames: Frames) -> np.ndarray:
    with torch.no_grad():
        return net(torch.from_numpy(frames.style), torch.from_numpy(frames.magnitude[:, None]))[:, 0].numpy()


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    ra, rb = (np.argsort(np.argsort(x)).astype(np.float64) for x in (a, b))
    return float(np.corrcoef(ra, rb)[0, 1])


def export_head(net: QualityHeadNet, path: Path, frames: Frames, check: int = 256) -> float:
    """Write the head's ONNX to `path` (atomically, after parity on up to `check` frames); the largest |Δ|."""
    example = (torch.from_numpy(frames.style[:2]), torch.from_numpy(frames.magnitude[:2, None]))
    with staged_files(path.parent, [path.name]) as (tmp,):
        export_traced(net, example, tmp, list(HEAD_INPUTS), [HEAD_OUTPUT],
                      {name: {0: "batch"} for name in [*HEAD_INPUTS, HEAD_OUTPUT]}, OPSET)
        rows = slice(0, min(check, len(frames.target)))
        session = ort.InferenceSession(str(tmp), providers=["CPUExecutionProvider"])
        got = session.run([HEAD_OUTPUT], {HEAD_INPUTS[0]: frames.style[rows],
                                          HEAD_INPUTS[1]: frames.magnitude[rows, None]})[0][:, 0]
        diff = float(np.abs(got.astype(np.float64) - predict(net, Frames(
            frames.style[rows], frames.magnitude[rows], frames.target[rows]))).max())
        if not diff <= PARITY_MAX_ABS:
            raise ParityError(f"quality head: ONNX Runtime and torch differ by {diff:.2e} > {PARITY_MAX_ABS}")
    return diff


def attach_quality_head(model_dir: Path, features_path: Path, data: str, eval_every: int = 8, steps: int = 1500,
                        seed: int = 0, command: str | None = None) -> ModelCard:
    """Train the head on the features' identities (every `eval_every`-th with 2+ photos held out for its check),
    write it beside the card and name it in the card's quality_head; a learned quality of an older head is dropped
    (calibrate again). Returns the card."""
    card = ModelCard.load(model_dir)
    features = Features.load(features_path)
    if card.outputs.style is None or features.style.shape[-1] != 2 * sum(card.outputs.style_channels):
        raise ValueError(f"{features_path}: its style rows do not fit {card.name}'s style output; a learned quality "
                         "needs the style output (faceset model style) and that model's features")
    counts = np.bincount(features.labels, minlength=len(features.identities))
    held = split_identities(features.identities, eval_every, {str(n) for n, k in zip(features.identities, counts) if k >= 2})
    train, check = Frames.of(features.subset(~held)), Frames.of(features.subset(held))
    net = train_head(train, steps=steps, seed=seed)
    validation = (f"on {int(held.sum())} held-out training identities ({len(check.target)} frames): Spearman "
                  f"{spearman(predict(net, check), check.target):.3f} with the target (the magnitude alone: "
                  f"{spearman(check.magnitude, check.target):.3f})") if len(check.target) > 2 else "no held-out identities"
    log.info("quality head: %s", validation)
    parity = export_head(net, card.root / HEAD_FILE, train)
    head = QualityHead(onnx={"path": HEAD_FILE, "sha256": sha256_file(card.root / HEAD_FILE)},
                       target="CR-FIQA: cos to the own class centre / (cos to the nearest other class centre + 1), "
                              "from this model's embeddings; clean photos and 4 degraded frames each",
                       data=f"{data}: {len(train.target)} frames of {int((~held).sum())} identities",
                       validation=validation, parity_max_abs_diff=parity, command=command)
    card = _with_head(card, head)
    card.save(model_dir)
    return card


def _with_head(card: ModelCard, head: QualityHead) -> ModelCard:
    """The card naming `head`; a quality that came from a previous head, and what rests on it, is dropped."""
    update = {"quality_head": head}
    if card.quality is not None and card.quality.method == "learned_head":
        update["quality"] = None
        if card.calibration is not None:  # its checks were of the old head: none is in use any more
            checks = [c.model_copy(update=dict(used=False)) for c in card.calibration.quality_checks]
            update["calibration"] = card.calibration.model_copy(update=dict(quality_bands=[], floors=None,
                                                                            quality_checks=checks))
    out = card.model_copy(update=update)
    return ModelCard.model_validate(out.model_dump()).set_root(card.root)
