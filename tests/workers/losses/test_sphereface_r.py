"""SphereFace-R: ψ(θ) = (−1)^k·cos(mθ) − 2k with a real margin m, fixed scale s."""

from __future__ import annotations

import math

import pytest
import torch
from _cases import THETA, assert_non_increasing, grid_target

from workers.losses import Target, build_loss


def _psi(loss_kwargs: dict, thetas: list[float]) -> list[float]:
    loss = build_loss("sphereface_r", scale=1.0, **loss_kwargs)
    cos = torch.tensor([math.cos(t) for t in thetas], dtype=torch.float64)
    ones = torch.ones_like(cos)
    return loss.positive_logit(Target(cos, ones, ones)).tolist()


@pytest.mark.parametrize(("margin", "theta", "psi"), [
    (1.7, 0.0, 1.0),
    (1.7, 1.0, math.cos(1.7)),  # k = 0
    (1.7, 2.5, -math.cos(4.25) - 2.0),  # k = ⌊4.25/π⌋ = 1
    (1.7, math.pi, -math.cos(1.7 * math.pi) - 2.0),  # k = 1
    (2.5, 2.9, math.cos(7.25) - 4.0),  # k = 2
    (1.0, 2.0, math.cos(2.0)),
])
def test_psi_hand_values(margin: float, theta: float, psi: float) -> None:
    (got,) = _psi({"margin": margin}, [theta])
    # at θ = 0 and π the ε = 1e-7 clamp moves θ by √(2ε) ≈ 4.5e-4
    assert got == pytest.approx(psi, abs=2e-3 if theta in (0.0, math.pi) else 1e-12)


@pytest.mark.parametrize("margin", [1.0, 1.2, 1.35, 1.7, 2.0, 2.5, 3.0])
def test_continuous_at_k_boundaries_and_monotone(margin: float) -> None:
    boundaries = [k * math.pi / margin for k in range(1, math.ceil(margin)) if k < margin]
    for b in boundaries:
        below, above = _psi({"margin": margin}, [b - 1e-9, b + 1e-9])
        assert above == pytest.approx(below, abs=1e-7)
        assert below == pytest.approx(1.0 - 2.0 * round(margin * b / math.pi), abs=1e-7)
    loss = build_loss("sphereface_r", margin=margin)
    positive = loss.positive_logit(grid_target(loss))
    assert_non_increasing(positive, loss.describe(), THETA)


def test_scale_multiplies_psi() -> None:
    thetas = [0.3, 1.1, 2.2]
    one = _psi({"margin": 1.7}, thetas)
    loss = build_loss("sphereface_r", scale=30.0)
    cos = torch.tensor([math.cos(t) for t in thetas], dtype=torch.float64)
    ones = torch.ones_like(cos)
    assert loss.positive_logit(Target(cos, ones, ones)).tolist() == pytest.approx(
        [30.0 * v for v in one], rel=1e-14)


def test_init_errors() -> None:
    with pytest.raises(ValueError, match=r"sphereface_r\.margin = 0\.9 is outside \[1, 3\]"):
        build_loss("sphereface_r", margin=0.9)
