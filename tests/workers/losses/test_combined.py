"""Combined margin: cos(m1·θ + m2) − m3 with every margin applied, and its continuation."""

from __future__ import annotations

import math

import pytest
import torch
from _cases import THETA, assert_non_increasing, grid_target, make_batch

from workers.losses import Target, build_loss, reference_loss


def _psi(theta: torch.Tensor, **kwargs: float) -> torch.Tensor:
    loss = build_loss("combined", scale=1.0, **kwargs)
    cos = torch.cos(theta)
    ones = torch.ones_like(cos)
    return loss.positive_logit(Target(cos, ones, ones))


@pytest.mark.parametrize(("m1", "m2", "m3"), [
    (1.0, 0.3, 0.2), (1.15, 0.1, 0.1), (0.9, 0.4, 0.35), (2.0, 0.0, 0.0), (0.5, 1.2, 1.0),
    (1.2, 0.5, 0.35), (2.0, 1.2, 0.0),
])
def test_every_margin_applied_then_continued(m1: float, m2: float, m3: float) -> None:
    theta = THETA[::40]
    got = _psi(theta, m1=m1, m2=m2, m3=m3).tolist()
    theta_b = (math.pi - m2) / m1
    for t, p in zip(theta.tolist(), got, strict=True):
        if m1 * t + m2 <= math.pi:
            want = math.cos(m1 * t + m2) - m3
        else:
            want = math.cos(t) - math.cos(theta_b) - 1.0 - m3
        # at θ = 0 and π the ε = 1e-7 clamp moves θ by √(2ε) ≈ 4.5e-4
        near_clamp = t < 1e-3 or t > math.pi - 1e-3
        assert p == pytest.approx(want, abs=2e-3 if near_clamp else 1e-12), t


@pytest.mark.parametrize(("m1", "m2", "m3"), [(1.0, 0.3, 0.2), (1.15, 0.1, 0.1), (2.0, 1.2, 0.5)])
def test_continuation_is_continuous_at_theta_b(m1: float, m2: float, m3: float) -> None:
    theta_b = (math.pi - m2) / m1
    below, above = _psi(torch.tensor([theta_b - 1e-9, theta_b + 1e-9], dtype=torch.float64),
                        m1=m1, m2=m2, m3=m3).tolist()
    assert below == pytest.approx(-1.0 - m3, abs=1e-7)
    assert above == pytest.approx(below, abs=1e-7)


@pytest.mark.parametrize(("m1", "m2", "m3"), [
    (0.5, 0.0, 0.0), (0.5, 1.2, 1.0), (1.0, 0.3, 0.2), (1.2, 0.5, 0.35), (2.0, 1.2, 1.0),
])
def test_monotone(m1: float, m2: float, m3: float) -> None:
    loss = build_loss("combined", m1=m1, m2=m2, m3=m3)
    assert_non_increasing(loss.positive_logit(grid_target(loss)), loss.describe())


def test_m3_does_not_drop_m1_m2() -> None:
    """insightface runs plain CosFace whenever m3 > 0; here the angular margins stay."""
    embeddings, weights, labels = make_batch(seed=4)
    combined = reference_loss(build_loss("combined", m1=1.1, m2=0.3, m3=0.2), embeddings,
                              weights, labels)
    cosface = reference_loss(build_loss("cosface", margin=0.2), embeddings, weights, labels)
    assert float(combined) > float(cosface) + 1.0


@pytest.mark.parametrize("m3", [0.0, 0.2, 0.35, 1.0])
def test_pure_cosine_margin_is_cosface(m3: float) -> None:
    """Combined(1, 0, m3) = CosFace(m3) everywhere (θ_b = π: no continuation)."""
    embeddings, weights, labels = make_batch(seed=5)
    got, want = [
        reference_loss(build_loss(name, scale=16.0, **kw), embeddings, weights, labels,
                       reduction="none")
        for name, kw in (("combined", {"m1": 1.0, "m2": 0.0, "m3": m3}),
                         ("cosface", {"margin": m3}))
    ]
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize("m2", [0.2, 0.5])
def test_pure_angular_margin_is_arcface_before_the_switch(m2: float) -> None:
    """Combined(1, m2, 0) = ArcFace(m2) for θ ≤ π − m2; past it Combined continues
    continuously (c + cos m2 − 1) where ArcFace falls back to c − m2·sin m2 (a jump)."""
    inside = THETA[(THETA <= math.pi - m2 - 1e-6) & (THETA > 1e-3)]  # away from the clamp
    arc = build_loss("arcface", scale=1.0, margin=m2)
    cos = torch.cos(inside)
    ones = torch.ones_like(cos)
    torch.testing.assert_close(_psi(inside, m1=1.0, m2=m2, m3=0.0),
                               arc.positive_logit(Target(cos, ones, ones)), atol=1e-12, rtol=0)
    past = torch.tensor([math.pi - m2 / 2], dtype=torch.float64)
    c = math.cos(float(past))
    assert float(_psi(past, m1=1.0, m2=m2, m3=0.0)) == pytest.approx(c + math.cos(m2) - 1.0)


def test_init_errors() -> None:
    with pytest.raises(ValueError, match=r"combined\.m1 = 0\.4 is outside \[0\.5, 2\]"):
        build_loss("combined", m1=0.4)
