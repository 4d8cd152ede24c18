"""GB-CosFace against a float64 numpy re-implementation, including the running global boundary."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.training.losses._ddp import run_sharded
from training.heads import PartialFC
from training.losses import LOSSES
from training.losses.combined_margin import cosface
from training.losses.gb_cosface import GBCosFaceLoss

S, M, ALPHA, R = 32.0, 0.16, 0.15, 0.01


def make_batch(dtype: torch.dtype, cos_y, seed: int = 0, dim: int = 8, classes: int = 6, sample_rate: float = 1.0):
    """A PartialFC head and embeddings whose target cosines are `cos_y` (norms arbitrary: GB-CosFace ignores them)."""
    gen = torch.Generator().manual_seed(seed)
    head = PartialFC(dim, classes, sample_rate).to(dtype)
    labels = torch.arange(len(cos_y)) % classes
    w = F.normalize(head.weight.detach(), dim=1)[labels]  # (B, D)
    noise = torch.randn(len(cos_y), dim, generator=gen, dtype=dtype)
    ortho = F.normalize(noise - (noise * w).sum(1, keepdim=True) * w, dim=1)  # unit, ⟂ W_y
    c = torch.tensor(cos_y, dtype=dtype)[:, None]
    norms = 1 + 20 * torch.rand(len(cos_y), 1, generator=gen, dtype=dtype)
    emb = (norms * (c * w + torch.sqrt(1 - c**2) * ortho)).requires_grad_()
    return head, emb, labels


def numpy_cos(f: np.ndarray, weight: np.ndarray) -> np.ndarray:
    f, weight = f.astype(np.float64), weight.astype(np.float64)
    f_hat = f / np.linalg.norm(f, axis=1, keepdims=True)
    w_hat = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    return np.clip(f_hat @ w_hat.T, -1, 1)


def numpy_pn(cos: np.ndarray, y: np.ndarray, s: float = S) -> tuple[np.ndarray, np.ndarray]:
    rows = np.arange(len(y))
    neg = np.ones_like(cos, dtype=bool)
    neg[rows, y] = False
    z = s * cos[neg].reshape(len(y), -1)  # (B, C − 1)
    zmax = z.max(1, keepdims=True)
    return cos[rows, y], (np.log(np.exp(z - zmax).sum(1)) + zmax[:, 0]) / s


def numpy_loss(cos_p, cos_n, boundary, s=S, m=M, alpha=ALPHA):
    """(positive, negative) halves of (1/2N)Σ[−log σ(2s(cos_p − m − v̂)) − log σ(2s(v̂ − m − cos_n))]."""
    v = (cos_p + cos_n) / 2
    v_hat = v + alpha * (boundary - v)
    neg_log_sigmoid = lambda x: np.logaddexp(0.0, -x)  # noqa: E731
    return neg_log_sigmoid(2 * s * (cos_p - m - v_hat)).mean() / 2, neg_log_sigmoid(2 * s * (v_hat - m - cos_n)).mean() / 2


def numpy_step(cos_p, cos_n, state, lo=0.5, hi=0.7, r=R, training=True):
    """One step of the boundary rule: init on first batch, clamp, use, update. Returns (used, new state)."""
    mean_v = np.mean((cos_p + cos_n) / 2)
    start = mean_v if state is None else state
    used = float(np.clip(start, lo, hi))
    if not training:
        return used, state
    return used, (1 - r) * used + r * mean_v


def pn_of(head, emb, labels):
    return numpy_pn(numpy_cos(emb.detach().numpy(), head.weight.detach().numpy()), labels.numpy())


COS_A = [0.9, 0.7, 0.4, 0.1, -0.3, 0.8, 0.6, 0.95]


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_first_step_initialises_boundary(dtype, rtol):
    loss_fn = GBCosFaceLoss(min_boundary=-1.0, max_boundary=1.0).to(dtype)
    head, emb, labels = make_batch(dtype, COS_A)
    assert not loss_fn.boundary_initialised
    out = loss_fn(head(emb, labels))
    cos_p, cos_n = pn_of(head, emb, labels)
    mean_v = np.mean((cos_p + cos_n) / 2)
    pos, neg = numpy_loss(cos_p, cos_n, mean_v)
    assert bool(loss_fn.boundary_initialised)
    np.testing.assert_allclose(loss_fn.boundary.item(), mean_v, rtol=rtol)  # (1−r)·V + r·V = V
    np.testing.assert_allclose(out.parts["positive"].item(), pos, rtol=rtol)
    np.testing.assert_allclose(out.parts["negative"].item(), neg, rtol=rtol)
    np.testing.assert_allclose(out.loss.item(), pos + neg, rtol=rtol)


@pytest.mark.parametrize("stored,used", [(0.2, 0.5), (0.9, 0.7), (0.63, 0.63)])
def test_boundary_is_clamped_before_use_and_update(stored, used):
    loss_fn = GBCosFaceLoss().double()
    loss_fn.boundary.fill_(stored)
    loss_fn.boundary_initialised.fill_(True)
    head, emb, labels = make_batch(torch.float64, COS_A)
    out = loss_fn(head(emb, labels))
    cos_p, cos_n = pn_of(head, emb, labels)
    pos, neg = numpy_loss(cos_p, cos_n, used)
    np.testing.assert_allclose(out.loss.item(), pos + neg, rtol=1e-10)
    np.testing.assert_allclose(loss_fn.boundary.item(), (1 - R) * used + R * np.mean((cos_p + cos_n) / 2), rtol=1e-10)


@pytest.mark.parametrize("lo,hi,r", [(0.5, 0.7, 0.01), (-1.0, 1.0, 0.3), (0.2, 0.3, 0.5)])
def test_running_update_over_three_steps(lo, hi, r):
    loss_fn = GBCosFaceLoss(update_rate=r, min_boundary=lo, max_boundary=hi)
    batches = [COS_A, [0.2, 0.3, 0.1, 0.5, 0.0, 0.4], [0.99, 0.98, 0.9, 0.95, 0.97, 0.92, 0.85]]
    state = None
    for seed, cos_y in enumerate(batches):
        head, emb, labels = make_batch(torch.float32, cos_y, seed=seed)
        out = loss_fn(head(emb, labels))
        cos_p, cos_n = pn_of(head, emb, labels)
        used, state = numpy_step(cos_p, cos_n, state, lo, hi, r)
        np.testing.assert_allclose(out.loss.item(), sum(numpy_loss(cos_p, cos_n, used)), rtol=1e-5)
        np.testing.assert_allclose(loss_fn.boundary.item(), state, rtol=1e-5)


def test_alpha_zero_is_cosface_with_margin_2m():
    # α = 0: v̂ = (cos_p + cos_n)/2, so 2s(cos_p − m − v̂) = 2s(v̂ − m − cos_n) = s(cos_p − cos_n) − 2sm, and
    # −log σ(s·cos_p − 2sm − s·cos_n) = −log softmax of the target logit s(cos_p − 2m) against s·cos_j, j ≠ y.
    head, emb, labels = make_batch(torch.float64, COS_A)
    logits = head(emb, labels)
    out = GBCosFaceLoss(alpha=0.0).double()(logits)
    cos_p, cos_n = pn_of(head, emb, labels)
    pos, neg = numpy_loss(cos_p, cos_n, boundary=123.0, alpha=0.0)  # boundary must not matter
    np.testing.assert_allclose([pos, neg], [pos, pos], rtol=1e-12)
    expected = np.mean(np.logaddexp(0.0, -(S * (cos_p - cos_n) - 2 * S * M)))
    np.testing.assert_allclose(out.loss.item(), expected, rtol=1e-10)
    reference = cosface(scale=S, margin=2 * M)(logits)
    np.testing.assert_allclose(out.loss.item(), reference.loss.item(), rtol=1e-10)


def test_eval_mode_does_not_touch_boundary():
    loss_fn = GBCosFaceLoss().double().eval()
    head, emb, labels = make_batch(torch.float64, COS_A)
    cos_p, cos_n = pn_of(head, emb, labels)
    out = loss_fn(head(emb, labels))  # not initialised yet: judged against the batch's clamped mean
    used, _ = numpy_step(cos_p, cos_n, None, training=False)
    np.testing.assert_allclose(out.loss.item(), sum(numpy_loss(cos_p, cos_n, used)), rtol=1e-10)
    assert not loss_fn.boundary_initialised and loss_fn.boundary.item() == 0.0

    loss_fn.train()(head(emb, labels))
    stored = loss_fn.boundary.item()
    loss_fn.eval()
    for cos_y in ([0.1, 0.2, 0.3], [0.9, 0.95, 0.99]):
        head2, emb2, labels2 = make_batch(torch.float64, cos_y, seed=3)
        out = loss_fn(head2(emb2, labels2))
        cp, cn = pn_of(head2, emb2, labels2)
        np.testing.assert_allclose(out.loss.item(), sum(numpy_loss(cp, cn, np.clip(stored, 0.5, 0.7))), rtol=1e-10)
    assert loss_fn.boundary.item() == stored


def test_sampled_partial_fc_uses_only_the_sampled_negatives():
    torch.manual_seed(0)
    head, emb, labels = make_batch(torch.float64, [0.9, 0.5, 0.7, 0.2], classes=40, sample_rate=0.25)
    logits = head(emb, labels)
    assert logits.cos.shape[1] < 40
    out = GBCosFaceLoss().double()(logits)
    weight = head.weight.detach().numpy()[logits.class_ids.numpy()]
    cos_p, cos_n = numpy_pn(numpy_cos(emb.detach().numpy(), weight), logits.labels.numpy())
    used, _ = numpy_step(cos_p, cos_n, None)
    np.testing.assert_allclose(out.loss.item(), sum(numpy_loss(cos_p, cos_n, used)), rtol=1e-10)


def test_gradients_finite_and_nonzero():
    head, emb, labels = make_batch(torch.float32, COS_A)
    loss_fn = GBCosFaceLoss()
    out = loss_fn(head(emb, labels))
    out.loss.backward()
    assert not loss_fn.boundary.requires_grad  # the boundary is a statistic, never trained
    for grad in (emb.grad, head.weight.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_registered_and_checkpointed():
    loss_fn = LOSSES.build("gb_cosface", margin=0.2)
    assert isinstance(loss_fn, GBCosFaceLoss) and loss_fn.margin == 0.2
    assert set(loss_fn.state_dict()) == {"boundary", "boundary_initialised"}


def sharded_steps(rank: int, world: int, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> list[dict]:
    """Two training steps on each rank's slice of every batch, classes sharded (run under gloo)."""
    head = PartialFC(batches[0][0].shape[1], 6).double()  # seeded per class id: same centers as one process
    loss_fn = GBCosFaceLoss(update_rate=0.3, min_boundary=-1.0, max_boundary=1.0).double()
    results = []
    for emb, labels in batches:
        rows = slice(rank * len(labels) // world, (rank + 1) * len(labels) // world)
        local = emb[rows].clone().requires_grad_()
        head.zero_grad()
        out = loss_fn(head(local, labels[rows]))
        out.loss.backward()
        results.append(
            {"loss": out.loss.detach(), "emb_grad": local.grad, "weight_grad": head.weight.grad.clone(),
             "start": head.start, "boundary": loss_fn.boundary.clone()}
        )
    return results


def test_sharded_over_two_ranks_matches_one_process(tmp_path):
    made = [make_batch(torch.float64, cos_y, seed=i) for i, cos_y in enumerate([COS_A, COS_A[::-1]])]
    ranks = run_sharded(sharded_steps, 2, tmp_path, [(emb.detach(), labels) for _, emb, labels in made])
    loss_fn = GBCosFaceLoss(update_rate=0.3, min_boundary=-1.0, max_boundary=1.0).double()
    for step, (head, emb, labels) in enumerate(made):
        out = loss_fn(head(emb, labels))
        out.loss.backward()
        emb_grad = torch.cat([r[step]["emb_grad"] for r in ranks])
        np.testing.assert_allclose(emb_grad.numpy(), emb.grad.numpy(), rtol=1e-9, atol=1e-14)
        for r in ranks:
            np.testing.assert_allclose(r[step]["loss"].item(), out.loss.item(), rtol=1e-12)
            np.testing.assert_allclose(r[step]["boundary"].item(), loss_fn.boundary.item(), rtol=1e-12)
            start, stop = r[step]["start"], r[step]["start"] + r[step]["weight_grad"].shape[0]
            shard_grad = head.weight.grad[start:stop].numpy()
            np.testing.assert_allclose(r[step]["weight_grad"].numpy(), shard_grad, rtol=1e-9, atol=1e-14)
