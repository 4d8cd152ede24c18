"""Cluster-guided ArcFace (our reading of arXiv 2312.04029) against a float64 numpy re-derivation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from tests.training.losses._ddp import run_sharded
from training.heads import PartialFC
from training.losses import LOSSES
from training.losses.cluster_margin import ClusterArcFaceLoss

CLASSES, DIM, TAU = 6, 5, 0.1
BATCHES = [  # labels of three steps: repeats, first appearances, and class 5 only in the last
    [0, 1, 0, 2, 3, 1, 4, 0],
    [1, 2, 0, 3, 3, 3, 2, 0],
    [5, 4, 1, 1, 2, 0, 5, 3],
]


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def logsumexp(x: np.ndarray) -> float:
    top = x.max()
    return float(math.log(np.exp(x - top).sum()) + top)


class NumpyCluster:
    """The module docstring's equations, one class and one sample at a time, in float64."""

    def __init__(self, num_classes: int = CLASSES, dim: int = DIM, alpha: float = 0.9, beta: float = 0.9) -> None:
        self.centers = np.zeros((num_classes, dim))
        self.center_seen = np.zeros(num_classes, bool)
        self.mean_cos = np.zeros(num_classes)
        self.cos_seen = np.zeros(num_classes, bool)
        self.alpha, self.beta = alpha, beta

    def margins(self, m0: float = 0.5, delta: float = 0.1) -> np.ndarray:
        d = 1.0 - self.mean_cos
        h = np.full(len(d), 0.5)
        measured = np.flatnonzero(self.cos_seen)
        if len(measured) and d[measured].max() - d[measured].min() > 1e-6:
            lo, hi = d[measured].min(), d[measured].max()
            h[measured] = (d[measured] - lo) / (hi - lo)
        return m0 + delta * (h - 0.5)

    def batch_center(self, f: np.ndarray, y: list[int], k: int) -> np.ndarray:
        if self.center_seen[k]:
            return unit(self.centers[k])
        return unit(f[[i for i, yi in enumerate(y) if yi == k]].mean(0))

    def loss(self, emb: np.ndarray, weight: np.ndarray, y: list[int], s: float = 64.0, lam_c: float = 1.0, lam_a: float = 0.1):
        f, w = unit(emb), unit(weight)
        cos, margins, classes = f @ w.T, self.margins(), sorted(set(y))
        centers = {k: self.batch_center(f, y, k) for k in classes}
        ce = scc = 0.0
        for i, yi in enumerate(y):
            theta, m = math.acos(cos[i, yi]), margins[yi]
            logits = s * cos[i].copy()
            logits[yi] = s * (math.cos(theta + m) if theta + m <= math.pi else cos[i, yi] - m * math.sin(m))
            ce += logsumexp(logits) - logits[yi]
            to_centers = np.array([f[i] @ centers[k] / TAU for k in classes])
            scc += logsumexp(to_centers) - to_centers[classes.index(yi)]
        align = np.mean([1.0 - centers[k] @ w[k] for k in classes])
        ce, scc = ce / len(y), scc / len(y)
        return {"ce": ce, "cluster": lam_c * scc, "align": lam_a * align, "total": ce + lam_c * scc + lam_a * align}

    def update(self, emb: np.ndarray, y: list[int]) -> None:
        f = unit(emb)
        for k in sorted(set(y)):
            rows = f[[i for i, yi in enumerate(y) if yi == k]]
            if self.center_seen[k]:
                kappa = float(np.mean(rows @ unit(self.centers[k])))
                self.mean_cos[k] = self.beta * self.mean_cos[k] + (1 - self.beta) * kappa if self.cos_seen[k] else kappa
                self.cos_seen[k] = True
                self.centers[k] = self.alpha * self.centers[k] + (1 - self.alpha) * rows.mean(0)
            else:
                self.centers[k] = rows.mean(0)
                self.center_seen[k] = True


def embeddings(step: int, n: int = 8) -> torch.Tensor:
    """Embeddings that lean toward their class (so classes cluster, unevenly), plus noise."""
    gen = torch.Generator().manual_seed(100 + step)
    protos = torch.randn(CLASSES, DIM, generator=torch.Generator().manual_seed(9))
    y = torch.tensor(BATCHES[step])
    spread = torch.linspace(0.3, 1.5, CLASSES)[y, None]  # class k is looser than class k − 1
    return (3.0 * protos[y] + spread * torch.randn(n, DIM, generator=gen)).requires_grad_()


def weight_of(head: PartialFC):
    return lambda ids: head.weight[ids - head.start]


def check_state(loss: ClusterArcFaceLoss, ref: NumpyCluster) -> None:
    np.testing.assert_array_equal(loss.center_seen.numpy(), ref.center_seen)
    np.testing.assert_array_equal(loss.cos_seen.numpy(), ref.cos_seen)
    np.testing.assert_allclose(as_np(loss.centers), ref.centers, atol=1e-6)
    np.testing.assert_allclose(as_np(loss.mean_cos), ref.mean_cos, atol=1e-6)


# ---- hardness and margins --------------------------------------------------------------------


def test_margins_from_known_mean_cosines():
    loss = ClusterArcFaceLoss(num_classes=5, embedding_size=DIM)
    np.testing.assert_allclose(as_np(loss.class_margins()), 0.5)  # nothing measured yet
    loss.mean_cos.copy_(torch.tensor([0.9, 0.7, 0.8, 0.1, 0.6]))
    loss.cos_seen.copy_(torch.tensor([True, True, True, False, True]))
    # 1 − κ̄ = 0.1, 0.3, 0.2, (unmeasured), 0.4 -> h = 0, 2/3, 1/3, 0.5, 1
    h = np.array([0.0, 2 / 3, 1 / 3, 0.5, 1.0])
    np.testing.assert_allclose(as_np(loss.hardness()), h, atol=1e-6)
    np.testing.assert_allclose(as_np(loss.class_margins()), 0.5 + 0.1 * (h - 0.5), atol=1e-6)
    loss.mean_cos.fill_(0.8)  # every measured class equally tight: no class is harder
    np.testing.assert_allclose(as_np(loss.class_margins()), 0.5)
    wide = ClusterArcFaceLoss(num_classes=5, embedding_size=DIM, margin=0.4, margin_range=0.2)
    wide.mean_cos.copy_(torch.tensor([0.9, 0.7, 0.8, 0.1, 0.6]))
    wide.cos_seen.copy_(torch.tensor([True, True, True, False, True]))
    np.testing.assert_allclose(as_np(wide.class_margins()), 0.4 + 0.2 * (h - 0.5), atol=1e-6)


def test_terms_from_known_centers_match_numpy():
    gen = torch.Generator().manual_seed(4)
    loss, head, ref = ClusterArcFaceLoss(CLASSES, DIM), PartialFC(DIM, CLASSES), NumpyCluster()
    known = [0, 1, 2, 3]  # classes 4 (in the batch) and 5 have no center yet
    centers = torch.randn(len(known), DIM, generator=gen)
    mean_cos = torch.tensor([0.9, 0.5, 0.75, 0.6])
    loss.centers[known], loss.center_seen[known] = centers, True
    loss.mean_cos[known], loss.cos_seen[known] = mean_cos, True
    ref.centers[known], ref.center_seen[known] = as_np(centers), True
    ref.mean_cos[known], ref.cos_seen[known] = as_np(mean_cos), True
    emb, y = embeddings(0), BATCHES[0]
    out = loss(head(emb, torch.tensor(y)), weight_of=weight_of(head))
    expected = ref.loss(as_np(emb), as_np(head.weight), y)
    for name in ("ce", "cluster", "align"):
        assert out.parts[name].item() == pytest.approx(expected[name], rel=1e-5), name
    assert out.loss.item() == pytest.approx(expected["total"], rel=1e-5)


def test_state_and_loss_over_three_steps_match_numpy():
    loss, head, ref = ClusterArcFaceLoss(CLASSES, DIM), PartialFC(DIM, CLASSES), NumpyCluster()
    for step, y in enumerate(BATCHES):
        emb = embeddings(step)
        out = loss(head(emb, torch.tensor(y)), weight_of=weight_of(head))
        expected = ref.loss(as_np(emb), as_np(head.weight), y)
        assert out.loss.item() == pytest.approx(expected["total"], rel=1e-5), step
        ref.update(as_np(emb), y)
        check_state(loss, ref)
    assert ref.cos_seen.sum() >= 4 and np.ptp(ref.margins()) > 0.01  # the margins did spread


def test_first_appearance_only_initialises_the_center():
    loss, head = ClusterArcFaceLoss(CLASSES, DIM), PartialFC(DIM, CLASSES)
    emb, y = embeddings(0), BATCHES[0]
    loss(head(emb, torch.tensor(y)))
    f = unit(as_np(emb))
    np.testing.assert_allclose(as_np(loss.centers[0]), f[[0, 2, 7]].mean(0), atol=1e-6)
    assert loss.center_seen[[0, 1, 2, 3, 4]].all() and not loss.center_seen[5]
    assert not loss.cos_seen.any()


def test_evaluation_leaves_the_state_alone():
    loss, head = ClusterArcFaceLoss(CLASSES, DIM).eval(), PartialFC(DIM, CLASSES)
    loss(head(embeddings(0), torch.tensor(BATCHES[0])))
    assert not loss.center_seen.any() and loss.centers.abs().sum() == 0


# ---- gradients, the head's shard, the registry --------------------------------------------------


def test_gradients_are_finite_and_nonzero():
    loss, head = ClusterArcFaceLoss(CLASSES, DIM), PartialFC(DIM, CLASSES)
    for step in range(2):  # the second step has stored centers and spread margins
        emb = embeddings(step)
        head.weight.grad = None
        loss(head(emb, torch.tensor(BATCHES[step])), weight_of=weight_of(head)).loss.backward()
        for g in (emb.grad, head.weight.grad):
            assert torch.isfinite(g).all() and g.abs().sum() > 0
    emb = embeddings(2)
    head.weight.grad = None
    out = loss(head(emb, torch.tensor(BATCHES[2])), weight_of=weight_of(head))
    out.parts["align"].backward()  # aligning moves the class weights, not the features
    assert head.weight.grad.abs().sum() > 0 and emb.grad is None


def test_forward_batch_with_a_sampled_head():
    torch.manual_seed(0)
    classes = 12
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 2 * 3, DIM))
    head = PartialFC(DIM, classes, sample_rate=0.5)
    loss, ref = ClusterArcFaceLoss(classes, DIM), NumpyCluster(classes)
    x, y = torch.randn(8, 3, 2, 2), [7, 3, 7, 11, 0, 3, 5, 7]
    out = loss.forward_batch(model, head, x, torch.tensor(y))
    emb = as_np(model(x))
    # the head scored a sample of the classes, so only the sampled ones enter the softmax
    expected = ref.loss(emb, as_np(head.weight), y)
    f = unit(emb)
    align = np.mean([1 - ref.batch_center(f, y, k) @ unit(as_np(head.weight[k])) for k in sorted(set(y))])
    assert out.parts["align"].item() == pytest.approx(0.1 * align, rel=1e-5)
    assert out.parts["cluster"].item() == pytest.approx(expected["cluster"], rel=1e-5)
    assert out.logits.shape == (8, 6)
    out.loss.backward()
    assert torch.isfinite(head.weight.grad).all() and model[1].weight.grad.abs().sum() > 0


def test_registry_builds_the_loss():
    from training.losses import build_loss

    loss = LOSSES.build("cluster_arcface", num_classes=3, embedding_size=4, temperature=0.2, align_weight=0.5)
    assert isinstance(loss, ClusterArcFaceLoss)
    assert loss.centers.shape == (3, 4) and (loss.temperature, loss.align_weight) == (0.2, 0.5)
    built = build_loss("cluster_arcface", {"margin_range": 0.2}, num_classes=7, embedding_size=DIM)  # as the trainer does
    assert built.centers.shape == (7, DIM) and built.margin_range == 0.2


def test_forward_batch_through_the_trainers_embedder():
    from training.embedder import Embedder, EmbedderModule

    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(2 * 2 * 3, DIM))
    x, y = torch.randn(8, 3, 2, 2), torch.tensor(BATCHES[0])
    via = ClusterArcFaceLoss(CLASSES, DIM).forward_batch(Embedder(EmbedderModule(model)), PartialFC(DIM, CLASSES), x, y)
    head = PartialFC(DIM, CLASSES)
    direct = ClusterArcFaceLoss(CLASSES, DIM)(head(model(x), y), weight_of=weight_of(head))
    assert set(via.parts) == {"ce", "cluster", "align"}
    assert via.loss.item() == pytest.approx(direct.loss.item(), rel=1e-6)


# ---- two processes give the one-process loss, gradients and state ------------------------------


def _ddp_worker(rank: int, world: int) -> dict:
    head, loss = PartialFC(DIM, CLASSES), ClusterArcFaceLoss(CLASSES, DIM)
    results = []
    for step, y in enumerate(BATCHES):
        emb = embeddings(step)
        n = emb.shape[0] // world
        local = emb.detach()[rank * n : (rank + 1) * n].requires_grad_()
        head.weight.grad = None
        out = loss(head(local, torch.tensor(y)[rank * n : (rank + 1) * n]), weight_of=weight_of(head))
        out.loss.backward()
        results.append({"loss": out.loss.detach(), "emb": local.grad, "head": head.weight.grad.clone()})
    return {"steps": results, "state": loss.state_dict()}


def test_two_ranks_match_one_process(tmp_path):
    ranks = run_sharded(_ddp_worker, 2, tmp_path)
    head, loss = PartialFC(DIM, CLASSES), ClusterArcFaceLoss(CLASSES, DIM)
    for step, y in enumerate(BATCHES):
        emb = embeddings(step)
        head.weight.grad = None
        out = loss(head(emb, torch.tensor(y)), weight_of=weight_of(head))
        out.loss.backward()
        for r in ranks:
            assert r["steps"][step]["loss"].item() == pytest.approx(out.loss.item(), rel=1e-5)
        torch.testing.assert_close(torch.cat([r["steps"][step]["emb"] for r in ranks]), emb.grad, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(torch.cat([r["steps"][step]["head"] for r in ranks]), head.weight.grad, rtol=1e-4, atol=1e-6)
    for r in ranks:
        for name, value in loss.state_dict().items():
            torch.testing.assert_close(r["state"][name], value, rtol=1e-5, atol=1e-6)
