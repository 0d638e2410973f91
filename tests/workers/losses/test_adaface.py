"""AdaFace: g_ang = −m·ẑ, g_add = m + m·ẑ, ẑ from the norm against EMA batch statistics."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from _cases import make_batch
from _formulas import naive_loss

from workers.losses import Batch, LossState, Target, build_loss, reference_loss


def _state(loss: object) -> LossState:
    return LossState(loss, 7, 1.0, dtype=torch.float64)


def test_mu_sigma_are_emas_of_the_batch_norm_statistics() -> None:
    """Three steps: μ, σ (unbiased std) and the loss equal the naive loop's, from μ₀ = 20,
    σ₀ = 100, updated before use."""
    loss = build_loss("adaface", scale=8.0, t_alpha=0.2)
    state, naive_state = _state(loss), None
    assert (float(state.mu), float(state.sigma)) == (20.0, 100.0)
    mu, sigma = 20.0, 100.0
    for step in range(3):
        embeddings, weights, labels = make_batch(seed=step)
        got = reference_loss(loss, embeddings, weights, labels, state=state, reduction="none")
        updated: dict = {}
        want = naive_loss("adaface", loss.hyperparameter_values(), embeddings, weights, labels,
                          state=naive_state, new_state=updated, reduction="none")
        naive_state = updated
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
        norms = embeddings.norm(dim=1).tolist()
        mu = 0.2 * statistics.mean(norms) + 0.8 * mu
        sigma = 0.2 * statistics.stdev(norms) + 0.8 * sigma
        assert (float(state.mu), float(state.sigma)) == pytest.approx((mu, sigma), abs=1e-12)


def test_norm_scaler_is_clipped_and_detached() -> None:
    loss = build_loss("adaface", h=0.5, t_alpha=0.0)
    norms = torch.tensor([0.0, 20.0, 120.0, 2000.0], dtype=torch.float64, requires_grad=True)
    context = loss.prepare(Batch(torch.zeros(4, dtype=torch.float64), norms), _state(loss))
    # ã = clip(a, 0.001, 100); ẑ = clip(h·(ã − 20)/(100 + 1e-3), −1, 1)
    expected = [0.5 * (a - 20.0) / 100.001 for a in (0.001, 20.0, 100.0, 100.0)]
    assert context[:, 0].tolist() == pytest.approx(expected, abs=1e-14)
    assert not context.requires_grad
    far = loss.prepare(Batch(torch.zeros(2), torch.tensor([0.0, 100.0])), _state(loss))
    big_h = build_loss("adaface", h=2.0, t_alpha=0.0)
    clipped = big_h.prepare(Batch(torch.zeros(2), torch.tensor([0.0, 100.0])), _state(big_h))
    assert far[:, 0].abs().max() < 1 and clipped[:, 0].tolist() == pytest.approx([-0.4, 1.0],
                                                                                    abs=1e-4)


def test_positive_logit_follows_the_code() -> None:
    loss = build_loss("adaface", scale=4.0, margin=0.4)
    cos = torch.tensor([0.9, 0.2, -0.5, -0.9999], dtype=torch.float64)
    scaler = torch.tensor([[0.3], [-0.6], [1.0], [0.0]], dtype=torch.float64)
    got = loss.positive_logit(Target(cos, torch.ones(4), torch.ones(4), context=scaler))
    want = []
    for c, z in zip(cos.tolist(), scaler[:, 0].tolist(), strict=True):
        theta = math.acos(min(max(c, -1 + 1e-3), 1 - 1e-3))
        angle = min(max(theta - 0.4 * z, 1e-3), math.pi - 1e-3)
        want.append(4.0 * (math.cos(angle) - (0.4 + 0.4 * z)))
    assert got.tolist() == pytest.approx(want, abs=1e-12)


def test_negatives_are_clipped_like_the_code() -> None:
    loss = build_loss("adaface", scale=2.0)
    logits = torch.tensor([[0.9995, -0.9995, 0.3]], dtype=torch.float64, requires_grad=True)
    out = loss.phi(logits)
    assert out[0].tolist() == pytest.approx([2 * 0.999, -2 * 0.999, 0.6])
    (grad,) = torch.autograd.grad(out.sum(), logits)
    assert grad.tolist() == [[0.0, 0.0, 2.0]]


def test_h_zero_is_cosface_at_margin_m() -> None:
    embeddings, weights, labels = make_batch(seed=6)
    grads = []
    for loss in (build_loss("adaface", scale=8.0, margin=0.3, h=0.0),
                 build_loss("cosface", scale=8.0, margin=0.3)):
        e, w = embeddings.clone().requires_grad_(), weights.clone().requires_grad_()
        value = reference_loss(loss, e, w, labels, reduction="none")
        grads.append((value.detach(), *torch.autograd.grad(value.sum(), (e, w))))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_gradcheck_with_the_norm_scaler_held_fixed() -> None:
    """ẑ depends on the detached norms (by design): gradcheck the centres (ẑ fixed, h > 0)
    and the positive logit given a context."""
    loss = build_loss("adaface", scale=6.0, h=1.0)
    embeddings, weights, labels = make_batch(seed=7)
    assert torch.autograd.gradcheck(
        lambda w: reference_loss(loss, embeddings, w, labels, reduction="sum"),
        (weights.requires_grad_(),), eps=1e-6, atol=1e-6)
    cos = torch.tensor([0.7, -0.2, 0.1], dtype=torch.float64, requires_grad=True)
    context = torch.tensor([[0.5], [-0.8], [0.0]], dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda c: loss.positive_logit(Target(c, torch.ones(3), torch.ones(3), context=context)),
        (cos,), eps=1e-6, atol=1e-6)


def test_one_row_batch_keeps_sigma() -> None:
    loss = build_loss("adaface", t_alpha=0.5)
    state = _state(loss)
    loss.prepare(Batch(torch.zeros(1, dtype=torch.float64),
                       torch.tensor([30.0], dtype=torch.float64)), state)
    assert (float(state.mu), float(state.sigma)) == (25.0, 100.0)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"margin": 1.5}, r"adaface\.margin = 1\.5 rad is outside \[0, 1\]"),
    ({"h": -0.1}, r"adaface\.h = -0\.1 is outside \[0, 2\]"),
    ({"t_alpha": 2.0}, r"adaface\.t_alpha = 2\.0 is outside \[0, 1\]"),
])
def test_init_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        build_loss("adaface", **kwargs)
