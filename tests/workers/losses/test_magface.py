"""MagFace: ArcFace with m(ã) linear in the clamped norm ã, plus λ_g·(ã/u_a² + 1/ã)."""

from __future__ import annotations

import math

import pytest
import torch
from _cases import make_batch

from workers.losses import Target, build_loss, reference_loss


def _target(cos: torch.Tensor, norm: torch.Tensor) -> Target:
    return Target(logit=cos, embedding_norm=norm, weight_norm=torch.ones_like(cos))


def test_margin_is_linear_in_the_clamped_norm() -> None:
    loss = build_loss("magface", l_a=10.0, u_a=110.0, l_m=0.45, u_m=0.8)
    norms = torch.tensor([1.0, 10.0, 60.0, 110.0, 500.0], dtype=torch.float64)
    margins = loss.adaptive_margin(loss.clamped_norm(_target(torch.zeros(5), norms)))
    torch.testing.assert_close(margins, torch.tensor([0.45, 0.45, 0.625, 0.8, 0.8],
                                                     dtype=torch.float64), atol=1e-15, rtol=0)


def test_positive_logit_is_arcface_at_the_norm_margin() -> None:
    loss = build_loss("magface", scale=4.0, l_a=1.0, u_a=61.0, l_m=0.2, u_m=0.7)
    cos = torch.tensor([0.9, 0.1, -0.5, -0.99], dtype=torch.float64)
    norms = torch.tensor([1.0, 31.0, 61.0, 31.0], dtype=torch.float64)
    got = loss.positive_logit(_target(cos, norms))
    want = []
    for c, a in zip(cos.tolist(), norms.tolist(), strict=True):
        m = 0.2 + 0.5 * (a - 1.0) / 60.0
        theta = math.acos(c)
        want.append(4.0 * (math.cos(theta + m) if theta <= math.pi - m else c - m * math.sin(m)))
    torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64), atol=1e-12, rtol=0)


def test_regulariser_and_its_gradient_through_the_norm() -> None:
    loss = build_loss("magface", lambda_g=35.0)
    norms = torch.tensor([5.0, 50.0, 110.0, 200.0], dtype=torch.float64, requires_grad=True)
    reg = loss.regularizer(_target(torch.zeros(4, dtype=torch.float64), norms))
    clamped = torch.tensor([10.0, 50.0, 110.0, 110.0], dtype=torch.float64)
    torch.testing.assert_close(reg, 35.0 * (clamped / 110**2 + 1 / clamped), atol=1e-13, rtol=0)
    (grad,) = torch.autograd.grad(reg.sum(), norms)
    # inside [l_a, u_a]: λ_g·(1/u_a² − 1/a²); outside the clamp holds: 0
    assert float(grad[0]) == 0.0 and float(grad[3]) == 0.0
    assert float(grad[1]) == pytest.approx(35.0 * (1 / 110**2 - 1 / 50**2))
    assert float(grad[2]) == pytest.approx(0.0, abs=1e-15)  # g's minimum is at a = u_a
    assert build_loss("magface", lambda_g=0.0).regularizer(_target(norms, norms)) is None


def test_equal_margins_and_no_regulariser_is_arcface() -> None:
    embeddings, weights, labels = make_batch(seed=4)
    embeddings = embeddings * 20.0  # norms 14..50: inside [l_a, u_a], the margin does not vary
    grads = []
    for loss in (build_loss("magface", scale=8.0, l_m=0.35, u_m=0.35, lambda_g=0.0),
                 build_loss("arcface", scale=8.0, margin=0.35)):
        e, w = embeddings.clone().requires_grad_(), weights.clone().requires_grad_()
        value = reference_loss(loss, e, w, labels, reduction="none")
        grads.append((value.detach(), *torch.autograd.grad(value.sum(), (e, w))))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_easy_margin_leaves_non_positive_cosines_alone() -> None:
    """The code's ``easy_margin``: no margin where cos θ_y ≤ 0."""
    loss = build_loss("magface", scale=2.0, easy_margin=True)
    cos = torch.tensor([0.5, 0.0, -0.7], dtype=torch.float64)
    got = loss.positive_logit(_target(cos, torch.full_like(cos, 10.0)))
    assert got.tolist() == pytest.approx([2.0 * math.cos(math.acos(0.5) + 0.45), 0.0, -1.4])


def test_margin_gradient_reaches_the_norm() -> None:
    """Inside [l_a, u_a] the loss depends on ‖x‖ (margin and g): finite differences agree."""
    loss = build_loss("magface", scale=6.0, l_a=0.5, u_a=60.0, lambda_g=3.0)
    embeddings, weights, labels = make_batch(seed=5)
    assert torch.autograd.gradcheck(
        lambda e: reference_loss(loss, e, weights, labels, reduction="sum"),
        (embeddings.requires_grad_(),), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"l_a": 60.0}, r"magface\.l_a = 60\.0 norm is outside \[0\.01, 50\]"),
    ({"u_a": 50.0}, r"magface\.u_a = 50\.0 norm is outside \[60, 1000\]"),
    ({"u_m": 1.3}, r"magface\.u_m = 1\.3 rad is outside \[0, 1\.2\]"),
    ({"lambda_g": -1.0}, r"magface\.lambda_g = -1\.0 is outside \[0, 1000\]"),
    ({"easy_margin": 1}, r"magface\.easy_margin = 1 is not one of \{False, True\}"),
])
def test_init_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        build_loss("magface", **kwargs)
