"""CoReFace against a float64 numpy re-derivation from raw embeddings, weights and dropout masks."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.distributed as tdist
from torch import nn

from tests.training.losses._ddp import run_sharded
from training.heads import PartialFC
from training.losses import LOSSES
from training.losses.combined_margin import CombinedMarginLoss
from training.losses.coreface import CoReFaceLoss, adaptive_margin, coreface_contrastive, coupling_matrix

LABELS = [0, 1, 0, 2, 1, 0]  # class 0 three times, class 1 twice
CLASSES, DIM, FEAT = 4, 6, 2 * 3 * 3  # stand-in backbone: (B, 2, 3, 3) feature map -> D 6


class StandInBackbone(nn.Module):
    """Honours the backbone contract; dropout masks come from a fixed bank so numpy can replay them.

    ``bank[k]`` is the keep-mask of the k-th dropout call, for every sample of the global batch;
    ``offset`` is where this process's samples start in it (its rank times the local batch).
    """

    embedding_size = DIM

    def __init__(self, bank: torch.Tensor | None = None, offset: int = 0) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(7)
        self.conv = nn.Conv2d(3, 2, kernel_size=1)
        self.fc = nn.Linear(FEAT, DIM)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
        self.bank, self.offset, self.calls = bank, offset, 0
        self.dropouts: list[float | None] = []  # every dropout p asked for, in order

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.conv(x))  # (B, 2, 3, 3)

    def forward_head(self, feat: torch.Tensor, dropout: float | None = None) -> torch.Tensor:
        self.dropouts.append(dropout)
        flat = feat.flatten(1)  # (B, FEAT)
        if dropout:
            keep = self.bank[self.calls % len(self.bank), self.offset : self.offset + flat.shape[0]]
            self.calls += 1
            flat = flat * keep / (1.0 - dropout)
        return self.fc(flat)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().double().numpy()


def unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def np_coupling(z1: np.ndarray, z2: np.ndarray, y) -> np.ndarray:
    c = unit(z1) @ unit(z2).T
    for i in range(len(y)):
        for j in range(len(y)):
            if i != j and y[i] == y[j]:
                c[i, j] = 0.0
    return c


def np_margin_b(c: np.ndarray) -> float:
    n = len(c)
    return float(np.mean([c[i, i] - max(0.0, max((c[i, j] for j in range(n) if j != i), default=0.0)) for i in range(n)]))


def np_lc(c: np.ndarray, s: float, m: float) -> float:
    total = 0.0
    for i in range(len(c)):
        pos = math.exp(s * (c[i, i] - m))
        neg = sum(math.exp(s * c[i, j]) for j in range(len(c)) if j != i)
        total -= math.log(pos / (pos + neg))
    return total / len(c)


def np_arcface(z: np.ndarray, weight: np.ndarray, y, s: float = 64.0, m: float = 0.5) -> float:
    cos = unit(z) @ unit(weight).T
    total = 0.0
    for i, yi in enumerate(y):
        theta = math.acos(cos[i, yi])
        target = math.cos(theta + m) if theta + m <= math.pi else cos[i, yi] - m * math.sin(m)
        logits = s * cos[i].copy()
        logits[yi] = s * target
        top = logits.max()
        total += math.log(np.exp(logits - top).sum()) + top - logits[yi]
    return total / len(y)


def np_backbone(model: StandInBackbone, images: torch.Tensor, keep: np.ndarray | None, p: float) -> np.ndarray:
    """The stand-in's forward in numpy: tanh(1×1 conv) -> flatten -> mask/(1 − p) -> fc."""
    w, b = as_np(model.conv.weight)[:, :, 0, 0], as_np(model.conv.bias)
    feat = np.tanh(np.einsum("oc,bchw->bohw", w, as_np(images)) + b[None, :, None, None])
    flat = feat.reshape(len(feat), -1)
    if keep is not None:
        flat = flat * keep / (1.0 - p)
    return flat @ as_np(model.fc.weight).T + as_np(model.fc.bias)


def make_bank(calls: int, n: int, p: float, seed: int = 3) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.rand(calls, n, FEAT, generator=gen) >= p).float()


def make_views(n: int = len(LABELS), seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    z1 = torch.randn(n, DIM, generator=gen)
    return z1, z1 + 0.6 * torch.randn(n, DIM, generator=gen)  # correlated views, like two dropout masks


def images(n: int = len(LABELS), seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 3, 3, generator=torch.Generator().manual_seed(seed))


# ---- the coupling matrix, the margin and L_C -----------------------------------------------


def test_coupling_sets_same_label_off_diagonals_to_zero():
    z1, z2 = make_views()
    c = coupling_matrix(z1, z2, torch.tensor(LABELS))
    expected = np_coupling(as_np(z1), as_np(z2), LABELS)
    np.testing.assert_allclose(as_np(c), expected, atol=1e-6)
    raw = unit(as_np(z1)) @ unit(as_np(z2)).T
    for i, j in [(0, 2), (2, 0), (0, 5), (5, 2), (1, 4), (4, 1)]:
        assert c[i, j] == 0.0 and abs(raw[i, j]) > 1e-3  # masked, and not zero by accident
    np.testing.assert_allclose(np.diag(as_np(c)), np.diag(raw), atol=1e-6)  # positives kept
    assert abs(c[0, 1]) > 1e-3  # a different-label pair keeps its cosine


def test_adaptive_margin_matches_numpy():
    z1, z2 = make_views()
    c = coupling_matrix(z1, z2, torch.tensor(LABELS))
    expected = np_margin_b(np_coupling(as_np(z1), as_np(z2), LABELS))
    assert adaptive_margin(c).item() == pytest.approx(expected, abs=1e-6)
    assert not adaptive_margin(c.requires_grad_()).requires_grad


def test_adaptive_margin_floors_the_hardest_negative_at_zero():
    # every off-diagonal cosine is negative, so max(0, ·) makes m_b the mean of the diagonal
    z1 = torch.eye(3, dtype=torch.float64)
    z2 = torch.tensor([[1.0, -0.3, -0.2], [-0.1, 1.0, -0.4], [-0.2, -0.5, 1.0]], dtype=torch.float64)
    c = coupling_matrix(z1, z2, torch.tensor([0, 1, 2]))
    raw = unit(as_np(z1)) @ unit(as_np(z2)).T
    assert (raw - np.diag(np.diag(raw)) <= 0).all()
    assert adaptive_margin(c).item() == pytest.approx(np.diag(raw).mean(), abs=1e-6)


def test_contrastive_matches_numpy_with_repeated_labels():
    z1, z2 = make_views()
    # at s 64 the positive dwarfs the e^0 = 1 of a masked pair; at s 2 keeping them (not removing) shows
    for scale, margin in ((64.0, 0.0), (64.0, 0.3), (2.0, 0.3)):
        got = coreface_contrastive(z1, z2, torch.tensor(LABELS), scale=scale, margin=margin)
        expected = np_lc(np_coupling(as_np(z1), as_np(z2), LABELS), scale, margin)
        assert got.item() == pytest.approx(expected, rel=1e-5)


def test_margin_momentum_across_two_steps():
    loss = CoReFaceLoss()
    y = torch.tensor(LABELS)
    (a1, a2), (b1, b2) = make_views(seed=0), make_views(seed=5)
    first = loss.coupling_terms(a1, a2, y)["contrastive"]
    m1 = 0.99 * np_margin_b(np_coupling(as_np(a1), as_np(a2), LABELS)) + 0.01 * 0.0
    assert loss.m_prev.item() == pytest.approx(m1, abs=1e-6)
    assert first.item() == pytest.approx(0.05 * np_lc(np_coupling(as_np(a1), as_np(a2), LABELS), 64.0, m1), rel=1e-5)
    c2 = np_coupling(as_np(b1), as_np(b2), LABELS)
    m2 = 0.99 * np_margin_b(c2) + 0.01 * m1
    second = loss.coupling_terms(b1, b2, y)["contrastive"]
    assert loss.m_prev.item() == pytest.approx(m2, abs=1e-6)
    assert second.item() == pytest.approx(0.05 * np_lc(c2, 64.0, m2), rel=1e-5)
    loss.eval()  # evaluation computes with the running margin but leaves it alone
    evaluated = loss.coupling_terms(a1, a2, y)["contrastive"]
    m3 = 0.99 * np_margin_b(np_coupling(as_np(a1), as_np(a2), LABELS)) + 0.01 * m2
    assert evaluated.item() == pytest.approx(0.05 * np_lc(np_coupling(as_np(a1), as_np(a2), LABELS), 64.0, m3), rel=1e-5)
    assert loss.m_prev.item() == pytest.approx(m2, abs=1e-6)


def test_reverse_coupling_uses_the_transpose_and_chains_the_margin():
    loss = CoReFaceLoss(reverse_weight=0.5)
    z1, z2 = make_views()
    terms = loss.coupling_terms(z1, z2, torch.tensor(LABELS))
    c = np_coupling(as_np(z1), as_np(z2), LABELS)
    m = 0.99 * np_margin_b(c)
    m_rev = 0.99 * np_margin_b(c.T) + 0.01 * m
    assert terms["contrastive"].item() == pytest.approx(0.05 * np_lc(c, 64.0, m), rel=1e-5)
    reverse = np_lc(np_coupling(as_np(z2), as_np(z1), LABELS), 64.0, m_rev)
    assert terms["contrastive_reverse"].item() == pytest.approx(0.5 * reverse, rel=1e-5)
    assert loss.m_prev.item() == pytest.approx(m_rev, abs=1e-6)
    assert "contrastive_reverse" not in CoReFaceLoss().coupling_terms(z1, z2, torch.tensor(LABELS))


# ---- the whole step through a stand-in backbone --------------------------------------------


def test_total_matches_numpy_with_replayed_dropout_masks():
    x, y = images(), torch.tensor(LABELS)
    bank = make_bank(2, len(LABELS), 0.4)
    model, head, loss = StandInBackbone(bank), PartialFC(DIM, CLASSES), CoReFaceLoss()
    out = loss.forward_batch(model, head, x, y)
    assert model.dropouts == [0.4, 0.4]
    z1 = np_backbone(model, x, bank[0].numpy(), 0.4)
    z2 = np_backbone(model, x, bank[1].numpy(), 0.4)
    weight = as_np(head.weight)
    c = np_coupling(z1, z2, LABELS)
    m = 0.99 * np_margin_b(c)
    expected = 0.5 * np_arcface(z1, weight, LABELS) + 0.5 * np_arcface(z2, weight, LABELS) + 0.05 * np_lc(c, 64.0, m)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)
    assert out.parts["view1_ce"].item() == pytest.approx(0.5 * np_arcface(z1, weight, LABELS), rel=1e-5)
    assert out.parts["contrastive"].item() == pytest.approx(0.05 * np_lc(c, 64.0, m), rel=1e-5)
    assert loss.m_prev.item() == pytest.approx(m, abs=1e-6)


def test_zero_dropout_gives_identical_views_with_unit_diagonal():
    x, y = images(), torch.tensor(LABELS)
    model, head = StandInBackbone(), PartialFC(DIM, CLASSES)
    loss = CoReFaceLoss(dropout=0.0, start_epoch=0)
    out = loss.forward_batch(model, head, x, y)
    z = np_backbone(model, x, None, 0.0)
    c = np_coupling(z, z, LABELS)
    np.testing.assert_allclose(np.diag(c), 1.0, atol=1e-12)
    assert out.parts["view1_ce"].item() == pytest.approx(out.parts["view2_ce"].item(), rel=1e-6)
    m = 0.99 * np_margin_b(c)
    assert loss.m_prev.item() == pytest.approx(m, abs=1e-6)
    expected = np_arcface(z, as_np(head.weight), LABELS) + 0.05 * np_lc(c, 64.0, m)
    assert out.loss.item() == pytest.approx(expected, rel=1e-5)


def test_before_start_epoch_only_the_base_loss_on_a_plain_embedding():
    x, y = images(), torch.tensor(LABELS)
    model, head = StandInBackbone(make_bank(2, len(LABELS), 0.4)), PartialFC(DIM, CLASSES)
    loss = CoReFaceLoss(start_epoch=2)
    loss.set_epoch(1)
    out = loss.forward_batch(model, head, x, y)
    assert model.dropouts == [0.0]
    assert set(out.parts) == {"ce"}
    assert out.loss.item() == pytest.approx(np_arcface(np_backbone(model, x, None, 0.0), as_np(head.weight), LABELS), rel=1e-5)
    assert loss.m_prev.item() == 0.0
    loss.set_epoch(2)
    out = loss.forward_batch(model, head, x, y)
    assert model.dropouts[1:] == [0.4, 0.4]
    assert {"view1_ce", "view2_ce", "contrastive"} == set(out.parts)
    assert loss.m_prev.item() != 0.0


def test_set_epoch_raises_dropout_late_in_training():
    x, y = images(), torch.tensor(LABELS)
    model, head = StandInBackbone(make_bank(2, len(LABELS), 0.6)), PartialFC(DIM, CLASSES)
    loss = CoReFaceLoss(late_dropout_epoch=3)
    for epoch in (0, 2, 3, 5):
        loss.set_epoch(epoch)
        loss.forward_batch(model, head, x, y)
    assert model.dropouts == [0.4] * 4 + [0.6] * 4
    assert CoReFaceLoss().current_dropout == 0.4  # without a switch epoch the dropout stays


def test_registry_builds_with_a_base_spec():
    loss = LOSSES.build("coreface", base={"name": "cosface", "margin": 0.35}, contrastive_weight=0.1)
    assert isinstance(loss, CoReFaceLoss) and isinstance(loss.base, CombinedMarginLoss)
    assert (loss.base.m2, loss.base.m3, loss.contrastive_weight) == (0.0, 0.35, 0.1)
    default = CoReFaceLoss()
    assert (default.base.scale, default.base.m1, default.base.m2, default.base.m3) == (64.0, 1.0, 0.5, 0.0)


def test_through_the_trainers_embedder_and_build_loss():
    from training.embedder import Embedder, EmbedderModule
    from training.losses import build_loss
    from training.losses.cluster_margin import ClusterArcFaceLoss

    x, y, bank = images(), torch.tensor(LABELS), make_bank(2, len(LABELS), 0.4)
    bare, wrapped = StandInBackbone(bank), StandInBackbone(bank)
    direct = CoReFaceLoss().forward_batch(bare, PartialFC(DIM, CLASSES), x, y)
    embedder = Embedder(EmbedderModule(wrapped))
    via = CoReFaceLoss().forward_batch(embedder, PartialFC(DIM, CLASSES), x, y)
    assert wrapped.dropouts == [0.4, 0.4]
    assert via.loss.item() == pytest.approx(direct.loss.item(), rel=1e-6)
    # the trainer's context reaches a base that needs it
    loss = build_loss("coreface", {"base": {"name": "cluster_arcface"}}, num_classes=CLASSES, embedding_size=DIM)
    assert isinstance(loss.base, ClusterArcFaceLoss) and loss.base.centers.shape == (CLASSES, DIM)


def test_gradients_are_finite_and_nonzero():
    z1, z2 = (z.requires_grad_() for z in make_views())
    CoReFaceLoss().coupling_terms(z1, z2, torch.tensor(LABELS))["contrastive"].backward()
    for z in (z1, z2):
        assert torch.isfinite(z.grad).all() and z.grad.abs().sum() > 0
    model, head = StandInBackbone(make_bank(2, len(LABELS), 0.4)), PartialFC(DIM, CLASSES)
    CoReFaceLoss().forward_batch(model, head, images(), torch.tensor(LABELS)).loss.backward()
    for p in [head.weight, *model.parameters()]:
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0


# ---- two processes give the one-process loss and gradients ---------------------------------


def _ddp_worker(rank: int, world: int, bank: torch.Tensor) -> dict:
    n = len(LABELS) // world
    x, y = images()[rank * n : (rank + 1) * n], torch.tensor(LABELS)[rank * n : (rank + 1) * n]
    model, head, loss = StandInBackbone(bank, offset=rank * n), PartialFC(DIM, CLASSES), CoReFaceLoss(reverse_weight=0.3)
    out = loss.forward_batch(model, head, x, y)
    out.loss.backward()
    grads = [p.grad for p in model.parameters()]
    for g in grads:
        tdist.all_reduce(g)  # what the trainer's sum_gradients_hook does for the backbone
    return {"loss": out.loss.detach(), "m_prev": loss.m_prev, "grads": grads, "head": head.weight.grad}


def test_two_ranks_match_one_process(tmp_path):
    bank = make_bank(2, len(LABELS), 0.4)
    ranks = run_sharded(_ddp_worker, 2, tmp_path, bank)
    model, head, loss = StandInBackbone(bank), PartialFC(DIM, CLASSES), CoReFaceLoss(reverse_weight=0.3)
    out = loss.forward_batch(model, head, images(), torch.tensor(LABELS))
    out.loss.backward()
    for r in ranks:
        assert r["loss"].item() == pytest.approx(out.loss.item(), rel=1e-5)
        assert r["m_prev"].item() == pytest.approx(loss.m_prev.item(), abs=1e-6)
        for got, p in zip(r["grads"], model.parameters()):
            torch.testing.assert_close(got, p.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(torch.cat([r["head"] for r in ranks]), head.weight.grad, rtol=1e-4, atol=1e-6)
