"""SphereFace (A-Softmax): ψ, the Chebyshev cos(mθ), the λ schedule, the ‖x‖ scale."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _cases import THETA, assert_non_increasing, grid_target, random_batch

from workers.losses import Target, build_loss, raw_logits
from workers.losses.sphereface import chebyshev


def _target(cos: torch.Tensor, norm: float = 1.0, step: int = 0) -> Target:
    n = torch.full_like(cos, norm)
    return Target(logit=norm * cos, embedding_norm=n, weight_norm=torch.ones_like(cos), step=step)


@pytest.mark.parametrize(("kwargs", "step", "want"), [
    ({}, 0, 1000.0),
    ({}, 1, 1000.0 / 1.12),
    ({}, 100, 1000.0 / 13.0),
    ({}, 1658, 1000.0 / (1.0 + 0.12 * 1658)),  # 5.0010…, still above the floor
    ({}, 1659, 5.0),  # 1000 / 200.08 = 4.998 → λ_min
    ({}, 10**6, 5.0),
    ({"lambda_base": 100.0, "lambda_gamma": 0.5, "lambda_power": 2.0, "lambda_min": 0.0}, 2,
     25.0),
    ({"lambda_base": 100.0, "lambda_gamma": 0.0, "lambda_min": 0.0}, 10**6, 100.0),
    ({"lambda_base": 0.0, "lambda_min": 0.0}, 0, 0.0),
])
def test_lambda_schedule_hand_values(kwargs: dict, step: int, want: float) -> None:
    assert build_loss("sphereface", **kwargs).annealed_lambda(step) == pytest.approx(want, 1e-12)


@pytest.mark.parametrize("degree", range(7))
def test_chebyshev_is_cos_m_theta(degree: int) -> None:
    cos = torch.cos(THETA)
    torch.testing.assert_close(chebyshev(cos, degree), torch.cos(degree * THETA),
                               atol=1e-12, rtol=0)
    assert torch.equal(chebyshev(cos, float(degree)), chebyshev(cos, degree))


@pytest.mark.parametrize(("margin", "theta", "psi"), [
    (4, 0.0, 1.0),
    (4, math.pi / 2, math.cos(2 * math.pi) - 4.0),  # k = 2: ψ = −3
    (4, math.pi / 3, -math.cos(4 * math.pi / 3) - 2.0),  # k = 1: ψ = −1.5
    (4, math.pi, 1.0 - 8.0),  # k = 4 (clamped to k = 3 side: ψ continuous) → 1 − 2m
    (2, math.pi, 1.0 - 4.0),
    (3, 2.0, -math.cos(6.0) - 2.0),  # k = ⌊6/π⌋ = 1
])
def test_positive_logit_hand_values(margin: int, theta: float, psi: float) -> None:
    """P = ‖x‖·(λ·cos θ + ψ)/(1 + λ) at λ = 5 (step large), ‖x‖ = 2."""
    loss = build_loss("sphereface", margin=margin)
    cos = torch.tensor([math.cos(theta)], dtype=torch.float64)
    got = float(loss.positive_logit(_target(cos, norm=2.0, step=10**6)))
    assert got == pytest.approx(2.0 * (5.0 * math.cos(theta) + psi) / 6.0, abs=1e-5)


@pytest.mark.parametrize("margin", range(1, 7))
def test_psi_continuous_and_monotone(margin: int) -> None:
    for lambda_min, step in ((0.0, 10**9), (5.0, 10**9), (5.0, 0)):
        loss = build_loss("sphereface", margin=margin, lambda_min=lambda_min)
        positive = loss.positive_logit(grid_target(loss, step=step))
        assert_non_increasing(positive, loss.describe())
        assert float(torch.diff(positive).abs().max()) < 1e-2  # no jump at the k boundaries


def test_gradient_uses_detached_k() -> None:
    """dP/dc = ‖x‖·(λ + (−1)^k·m·sin(mθ)/sin θ)/(1 + λ): k contributes no gradient."""
    loss = build_loss("sphereface", margin=4, lambda_min=1.0)
    thetas = [0.5, 1.0, 1.9, 2.5, 3.0]
    cos = torch.tensor([math.cos(t) for t in thetas], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss.positive_logit(_target(cos, norm=1.0, step=10**9)).sum(),
                                  cos)
    for theta, g in zip(thetas, grad.tolist(), strict=True):
        k = math.floor(4 * theta / math.pi)
        dpsi = (-1) ** k * 4 * math.sin(4 * theta) / math.sin(theta)
        assert g == pytest.approx((1.0 + dpsi) / 2.0, rel=1e-9)


def test_only_one_sixth_of_psi_at_lambda_min_five() -> None:
    loss = build_loss("sphereface")
    cos = torch.tensor([0.3], dtype=torch.float64)
    got = float(loss.positive_logit(_target(cos, norm=1.0, step=10**6)))
    theta = math.acos(0.3)
    psi = -math.cos(4 * theta) - 2.0  # k = 1
    assert got == pytest.approx(5 / 6 * 0.3 + psi / 6, abs=1e-12)


def test_negatives_keep_the_feature_norm() -> None:
    """Only W is normalised: raw logits are ‖x‖·cos θ_j, and φ leaves them unchanged."""
    loss = build_loss("sphereface")
    embeddings, weights, _ = random_batch(5, 7, 6, seed=0)
    want = embeddings @ (weights / weights.norm(dim=1, keepdim=True)).T
    logits = raw_logits(loss, embeddings, weights)
    torch.testing.assert_close(logits, want, atol=1e-12, rtol=0)
    assert torch.equal(loss.phi(logits), logits)
    cos = F.cosine_similarity(embeddings[:, None], weights[None], dim=2)
    torch.testing.assert_close(logits, embeddings.norm(dim=1, keepdim=True) * cos)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"margin": 0}, r"sphereface\.margin = 0 is outside \{1, …, 6\}"),
    ({"margin": 2.5}, r"sphereface\.margin = 2\.5 must be an integer"),
    ({"lambda_min": -1.0}, r"sphereface\.lambda_min = -1\.0 is outside \[0, 100000\]"),
])
def test_init_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        build_loss("sphereface", **kwargs)
