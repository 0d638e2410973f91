"""ArcFace: cos(θ + m) up to θ = π − m, the monotone fallback c − m·sin m past it."""

from __future__ import annotations

import math

import pytest
import torch
from _cases import TARGET_COS, THETA, assert_non_increasing, grid_target

from workers.losses import Target, build_loss


def _target(cos: torch.Tensor) -> Target:
    ones = torch.ones_like(cos)
    return Target(logit=cos, embedding_norm=ones, weight_norm=ones)


@pytest.mark.parametrize("margin", [0.0, 0.2, 0.5, 0.8, 1.2])
def test_psi_on_both_sides_of_the_switch(margin: float) -> None:
    loss = build_loss("arcface", scale=3.0, margin=margin)
    positive = loss.positive_logit(_target(torch.cos(THETA)))
    for theta, got in zip(THETA[::50].tolist(), positive[::50].tolist(), strict=True):
        c = math.cos(theta)
        if theta <= math.pi - margin - 1e-9:
            want = 3.0 * math.cos(theta + margin)
        elif theta > math.pi - margin + 1e-9:
            want = 3.0 * (c - margin * math.sin(margin))
        else:
            continue
        # at θ ≈ 0 the clamp (ε = 1e-7) shifts sin θ by up to √(2ε) ≈ 4.5e-4
        assert got == pytest.approx(want, abs=2e-3 if theta < 1e-3 else 1e-12), theta


def test_fallback_jump_at_half_radian_margin() -> None:
    """LOSSES.md [derived]: the fallback jumps by −0.117 at m = 0.5."""
    m = 0.5
    loss = build_loss("arcface", scale=1.0, margin=m)
    switch = math.pi - m
    cos = torch.tensor([math.cos(switch - 1e-9), math.cos(switch + 1e-9)], dtype=torch.float64)
    below, above = loss.positive_logit(_target(cos)).tolist()
    assert below == pytest.approx(-1.0, abs=1e-8)
    assert above - below == pytest.approx(-0.117, abs=5e-4)
    assert above - below == pytest.approx(1.0 - math.cos(m) - m * math.sin(m), abs=1e-8)


@pytest.mark.parametrize("margin_grad", ["true", "detached"])
@pytest.mark.parametrize("margin", [0.0, 0.1, 0.5, 1.0, 1.2])
def test_target_logit_monotone(margin: float, margin_grad: str) -> None:
    loss = build_loss("arcface", margin=margin, margin_grad=margin_grad)
    assert_non_increasing(loss.positive_logit(grid_target(loss)), loss.describe())


def test_plain_cos_theta_plus_m_is_not_monotone() -> None:
    """What the fallback guards against (so the monotonicity test can fail)."""
    assert float(torch.diff(torch.cos(THETA + 0.5)).max()) > 0


def test_fallback_gradient_is_the_plain_cosine_gradient() -> None:
    loss = build_loss("arcface", scale=5.0, margin=0.5)
    cos = torch.tensor([-0.95, -0.99, 0.6], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss.positive_logit(_target(cos)).sum(), cos)
    assert grad[:2].tolist() == pytest.approx([5.0, 5.0], abs=1e-12)
    # inside: d/dc s·cos(θ + m) = s·sin(θ + m)/sin θ
    theta = math.acos(0.6)
    assert float(grad[2]) == pytest.approx(5.0 * math.sin(theta + 0.5) / math.sin(theta))


def test_test_batch_reaches_the_fallback() -> None:
    """The parity batch has one target past π − m for both margins the cases use."""
    assert math.acos(min(TARGET_COS)) > math.pi - 0.3 + 0.05
    assert all(abs(math.acos(c) - (math.pi - m)) > 0.05 for c in TARGET_COS for m in (0.3, 0.5))


def test_finite_gradient_at_cos_one() -> None:
    loss = build_loss("arcface")
    cos = torch.tensor([1.0, -1.0, 1.0 - 1e-12], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss.positive_logit(_target(cos)).sum(), cos)
    assert torch.isfinite(grad).all()


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"margin": -0.1}, r"arcface\.margin = -0\.1 rad is outside \[0, 1\.2\]"),
    ({"margin": 1.3}, r"arcface\.margin = 1\.3 rad is outside \[0, 1\.2\]"),
    ({"scale": 0.5}, r"arcface\.scale = 0\.5 is outside \[1, 256\]"),
    ({"margin_grad": "stop"}, r"arcface\.margin_grad = 'stop' is not one of"),
])
def test_init_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_loss("arcface", **kwargs)
