"""MagFace and MagCosFace against a float64 numpy re-derivation from raw embeddings and weights."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tests.training.losses._ddp import run_sharded
from training.heads import PartialFC
from training.losses import LOSSES
from training.losses.magface import MagCosFaceLoss, MagFaceLoss

L_A, U_A, L_M, U_M, LAMBDA_G, SCALE = 10.0, 110.0, 0.45, 0.8, 35.0, 64.0
LABELS = [0, 1, 2, 3, 4, 5, 0, 1]
# ‖f‖: below l_a, inside, above u_a
NORMS = [5.0, 12.0, 30.0, 60.0, 100.0, 150.0, 40.0, 80.0]
# cos θ_y of each row: the last three are ≤ 0 (easy margin); −0.99 with m ≈ 0.7 passes θ + m > π
COS_Y = [0.9, 0.5, 0.2, 0.8, 0.3, 0.95, -0.05, -0.99]


def make_batch(dtype: torch.dtype, dim: int = 8, classes: int = 6):
    """A PartialFC head and embeddings with the chosen norms and target cosines."""
    gen = torch.Generator().manual_seed(0)
    head = PartialFC(dim, classes).to(dtype)
    labels = torch.tensor(LABELS)
    w = F.normalize(head.weight.detach(), dim=1)[labels]  # (B, D)
    noise = torch.randn(len(LABELS), dim, generator=gen, dtype=dtype)
    ortho = F.normalize(noise - (noise * w).sum(1, keepdim=True) * w, dim=1)  # unit, ⟂ W_y
    cos_y = torch.tensor(COS_Y, dtype=dtype)[:, None]
    direction = cos_y * w + torch.sqrt(1 - cos_y**2) * ortho
    emb = (torch.tensor(NORMS, dtype=dtype)[:, None] * direction).requires_grad_()
    return head, emb, labels


def numpy_magface(f: np.ndarray, weight: np.ndarray, y: np.ndarray, form: str, easy: bool, lam: float = LAMBDA_G):
    """(ce, λ·mean g) straight from the paper's equations, in float64."""
    f, weight = f.astype(np.float64), weight.astype(np.float64)
    rows = np.arange(len(y))
    f_hat = f / np.linalg.norm(f, axis=1, keepdims=True)
    w_hat = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    cos = np.clip(f_hat @ w_hat.T, -1, 1)
    a = np.clip(np.linalg.norm(f, axis=1), L_A, U_A)
    m = (U_M - L_M) / (U_A - L_A) * (a - L_A) + L_M
    c = cos[rows, y]
    theta = np.arccos(c)
    if form == "cos":
        t = c - m
    elif easy:
        t = np.where(c > 0, np.cos(theta + m), c)
    else:
        t = np.where(theta + m <= math.pi, np.cos(theta + m), c - m * np.sin(m))
    z = SCALE * cos
    z[rows, y] = SCALE * t
    zmax = z.max(1, keepdims=True)
    lse = np.log(np.exp(z - zmax).sum(1)) + zmax[:, 0]
    ce = np.mean(lse - z[rows, y])
    return ce, lam * np.mean(a / U_A**2 + 1 / a)


def as_np(t: torch.Tensor) -> np.ndarray:
    return t.detach().numpy()


def test_batch_covers_every_branch():
    head, emb, labels = make_batch(torch.float64)
    norms = as_np(emb.norm(dim=1))
    cos_y = np.asarray(COS_Y)
    m = (U_M - L_M) / (U_A - L_A) * (np.clip(norms, L_A, U_A) - L_A) + L_M
    assert (norms < L_A).any() and (norms > U_A).any() and ((norms > L_A) & (norms < U_A)).any()
    assert (cos_y <= 0).sum() >= 2
    assert (np.arccos(cos_y) + m > math.pi).any()  # the non-easy fallback triggers


@pytest.mark.parametrize("dtype,rtol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize(
    "loss_fn,form,easy",
    [(MagFaceLoss(), "arc", True), (MagFaceLoss(easy_margin=False), "arc", False), (MagCosFaceLoss(), "cos", False)],
    ids=["magface_easy", "magface_fallback", "mag_cosface"],
)
def test_known_value(loss_fn, form, easy, dtype, rtol):
    head, emb, labels = make_batch(dtype)
    out = loss_fn(head(emb, labels))
    ce, reg = numpy_magface(as_np(emb), as_np(head.weight), labels.numpy(), form, easy)
    np.testing.assert_allclose(out.parts["ce"].item(), ce, rtol=rtol)
    np.testing.assert_allclose(out.parts["magnitude"].item(), reg, rtol=rtol)
    np.testing.assert_allclose(out.loss.item(), ce + reg, rtol=rtol)


def test_easy_margin_changes_only_nonpositive_rows():
    head, emb, labels = make_batch(torch.float64)
    logits = head(emb, labels)
    easy, hard = MagFaceLoss()(logits).logits, MagFaceLoss(easy_margin=False)(logits).logits
    rows = np.arange(len(LABELS))
    changed = as_np(easy[rows, labels] != hard[rows, labels])
    np.testing.assert_array_equal(changed, np.asarray(COS_Y) <= 0)
    np.testing.assert_allclose(as_np(easy[rows, labels])[changed], SCALE * np.asarray(COS_Y)[changed], rtol=1e-9)


def test_constructor_args_reach_the_loss():
    head, emb, labels = make_batch(torch.float64)
    out = MagFaceLoss(scale=30.0, l_a=2.0, u_a=51.0, l_m=0.45, u_m=1.0, lambda_g=5.0)(head(emb, labels))
    a = np.clip(as_np(emb.norm(dim=1)), 2.0, 51.0)
    np.testing.assert_allclose(out.parts["magnitude"].item(), 5.0 * np.mean(a / 51.0**2 + 1 / a), rtol=1e-10)
    assert out.logits.abs().max().item() <= 30.0 + 1e-9


def test_registered():
    assert isinstance(LOSSES.build("magface"), MagFaceLoss)
    built = LOSSES.build("mag_cosface", lambda_g=5.0)
    assert isinstance(built, MagCosFaceLoss) and built.lambda_g == 5.0


@pytest.mark.parametrize("loss_fn", [MagFaceLoss(), MagFaceLoss(easy_margin=False), MagCosFaceLoss()])
def test_gradients_finite_and_nonzero(loss_fn):
    head, emb, labels = make_batch(torch.float32)
    loss_fn(head(emb, labels)).loss.backward()
    for grad in (emb.grad, head.weight.grad):
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def radial(grad: torch.Tensor, emb: torch.Tensor) -> np.ndarray:
    """Component of the gradient along f̂: the derivative with respect to ‖f‖."""
    return as_np((grad * F.normalize(emb.detach(), dim=1)).sum(1))


def test_regulariser_raises_magnitude_inside_the_clamp_only():
    # g'(a) = 1/u_a² − 1/a² < 0 for a < u_a: descent increases ‖f‖; outside [l_a, u_a] the clamp stops it.
    head, emb, labels = make_batch(torch.float64)
    MagFaceLoss()(head(emb, labels)).parts["magnitude"].backward()
    norms = np.asarray(NORMS)
    inside = (norms > L_A) & (norms < U_A)
    expected = np.where(inside, LAMBDA_G / len(NORMS) * (1 / U_A**2 - 1 / norms**2), 0.0)
    np.testing.assert_allclose(radial(emb.grad, emb), expected, rtol=1e-9, atol=1e-15)
    assert (radial(emb.grad, emb)[inside] < 0).all()
    tangential = emb.grad - torch.tensor(radial(emb.grad, emb))[:, None] * F.normalize(emb.detach(), dim=1)
    assert tangential.abs().max().item() < 1e-12  # g depends on ‖f‖ alone


def test_margin_term_lowers_magnitude():
    # dCE/da = −(s/B)(1 − p_y)·(−sin(θ_y + m))·m'(a) > 0 where the margin applies; 0 under the easy margin
    # (target s·cos θ_y does not depend on a) and outside the clamp.
    head, emb, labels = make_batch(torch.float64)
    out = MagFaceLoss()(head(emb, labels))
    out.parts["ce"].backward()
    norms, cos_y = np.asarray(NORMS), np.asarray(COS_Y)
    a = np.clip(norms, L_A, U_A)
    m = (U_M - L_M) / (U_A - L_A) * (a - L_A) + L_M
    p_y = as_np(torch.softmax(out.logits.detach(), dim=1))[np.arange(len(LABELS)), LABELS]
    active = (norms > L_A) & (norms < U_A) & (cos_y > 0)
    dce_da = SCALE / len(NORMS) * (1 - p_y) * np.sin(np.arccos(cos_y) + m) * (U_M - L_M) / (U_A - L_A)
    np.testing.assert_allclose(radial(emb.grad, emb), np.where(active, dce_da, 0.0), rtol=1e-7, atol=1e-15)
    assert (radial(emb.grad, emb)[active] > 0).all()


SHARDED_CONFIGS = [("magface", {}), ("magface", {"easy_margin": False}), ("mag_cosface", {})]


def sharded_losses(rank: int, world: int, emb: torch.Tensor, labels: torch.Tensor) -> list[dict]:
    """On each rank: its slice of the batch against its shard of the classes (run under gloo)."""
    head = PartialFC(emb.shape[1], 6).to(emb.dtype)  # seeded per class id: the same centers as one process
    rows = slice(rank * len(labels) // world, (rank + 1) * len(labels) // world)
    results = []
    for name, kwargs in SHARDED_CONFIGS:
        local = emb[rows].clone().requires_grad_()
        head.zero_grad()
        out = LOSSES.build(name, **kwargs)(head(local, labels[rows]))
        out.loss.backward()
        grads = {"emb_grad": local.grad, "weight_grad": head.weight.grad.clone()}
        results.append({"loss": out.loss.detach(), "start": head.start, **grads})
    return results


def test_sharded_over_two_ranks_matches_one_process(tmp_path):
    # The regulariser is computed on the gathered embeddings by every rank: without dist.replicated
    # its gradient would be counted twice here.
    head, emb, labels = make_batch(torch.float64)
    ranks = run_sharded(sharded_losses, 2, tmp_path, emb.detach(), labels)
    for i, (name, kwargs) in enumerate(SHARDED_CONFIGS):
        emb.grad, head.weight.grad = None, None
        out = LOSSES.build(name, **kwargs)(head(emb, labels))
        out.loss.backward()
        emb_grad = torch.cat([r[i]["emb_grad"] for r in ranks])
        np.testing.assert_allclose(as_np(emb_grad), as_np(emb.grad), rtol=1e-9, atol=1e-14)
        for r in ranks:
            np.testing.assert_allclose(r[i]["loss"].item(), out.loss.item(), rtol=1e-12)
            start, stop = r[i]["start"], r[i]["start"] + r[i]["weight_grad"].shape[0]
            np.testing.assert_allclose(as_np(r[i]["weight_grad"]), as_np(head.weight.grad[start:stop]), rtol=1e-9, atol=1e-14)
