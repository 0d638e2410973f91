"""D-Softmax: w_intra·softplus(s·(d − c_y)) + w_inter·softplus(LSE_{k≠y}(s·c_k))."""

from __future__ import annotations

import math

import pytest
import torch
from _cases import random_batch

from workers.losses import build_loss, get_loss_class, reference_loss

# Three samples of class 0, so centre 0 is only ever a positive and centres 1.. only negatives.
LABELS = torch.tensor([0, 0, 0])


def _batch(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    embeddings, weights, _ = random_batch(3, 6, 8, seed=seed)
    return embeddings, weights


def _grad_wrt(name: str, kwargs: dict, embeddings: torch.Tensor,
              weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    w = weights.clone().requires_grad_()
    value = reference_loss(build_loss(name, scale=8.0, **kwargs), embeddings, w, LABELS)
    (grad,) = torch.autograd.grad(value, w)
    return grad[0], grad[1:]


def test_target_centre_gradient_ignores_the_negatives() -> None:
    """Change every non-target centre: ∂L/∂W_y is unchanged for D-Softmax (and changes for
    NormFace, so the test can tell)."""
    embeddings, weights = _batch(0)
    other = weights.clone()
    other[1:] = random_batch(1, 6, 8, seed=99)[1][1:]
    for kwargs in ({}, {"d": 0.5, "w_intra": 3.0, "w_inter": 0.5}):
        a, _ = _grad_wrt("dsoftmax", kwargs, embeddings, weights)
        b, _ = _grad_wrt("dsoftmax", kwargs, embeddings, other)
        assert float(a.abs().max()) > 1e-3
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    a, _ = _grad_wrt("normface", {}, embeddings, weights)
    b, _ = _grad_wrt("normface", {}, embeddings, other)
    assert not torch.allclose(a, b, atol=1e-6)


def test_negative_centre_gradients_ignore_the_target_cosine() -> None:
    """Rotate the target centre (c_y changes): ∂L/∂W_j, j ≠ y, is unchanged."""
    embeddings, weights = _batch(1)
    other = weights.clone()
    other[0] = -2.0 * weights[0] + 0.3
    for kwargs in ({}, {"d": 0.5, "w_intra": 0.5, "w_inter": 2.0}):
        _, a = _grad_wrt("dsoftmax", kwargs, embeddings, weights)
        _, b = _grad_wrt("dsoftmax", kwargs, embeddings, other)
        assert float(a.abs().max()) > 1e-3
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)
    _, a = _grad_wrt("normface", {}, embeddings, weights)
    _, b = _grad_wrt("normface", {}, embeddings, other)
    assert not torch.allclose(a, b, atol=1e-6)


def test_intra_term_stops_pulling_past_d() -> None:
    """Intra-only (w_inter = 0) at s = 64: the pull on x is s·σ(s(d − c_y))·∂c_y, tiny past d."""
    loss = build_loss("dsoftmax", d=0.5, w_inter=0.0)
    weights = torch.eye(3, dtype=torch.float64)
    for c, expect_pull in ((0.9, False), (0.2, True)):
        x = torch.tensor([[c, math.sqrt(1 - c * c), 0.0]], dtype=torch.float64,
                         requires_grad=True)
        value = reference_loss(loss, x, weights, torch.tensor([0]))
        (grad,) = torch.autograd.grad(value, x)
        assert value.item() == pytest.approx(math.log1p(math.exp(64.0 * (0.5 - c))), rel=1e-12)
        sigma = 1.0 / (1.0 + math.exp(-64.0 * (0.5 - c)))
        assert float(grad.norm()) == pytest.approx(64.0 * sigma * math.sqrt(1 - c * c), rel=1e-9)
        assert (float(grad.norm()) > 1.0) == expect_pull


def test_margin_grad_does_not_apply() -> None:
    assert "margin_grad" not in {s.name for s in get_loss_class("dsoftmax").hyperparameters()}


def test_init_errors() -> None:
    with pytest.raises(ValueError, match=r"dsoftmax\.d = 1\.5 cos is outside \[0, 1\]"):
        build_loss("dsoftmax", d=1.5)
