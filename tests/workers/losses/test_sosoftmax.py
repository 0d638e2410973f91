"""SO-softmax (ours): P = s·(c − λ_p(1 − c)²), N_j = s·(c_j + λ_n·max(0, c_j − g_n)²)."""

from __future__ import annotations

import pytest
import torch

from workers.losses import Target, build_loss

COS = torch.linspace(-1.0, 1.0, 4001, dtype=torch.float64)


def _psi(**kwargs: float) -> torch.Tensor:
    ones = torch.ones_like(COS)
    return build_loss("sosoftmax", **kwargs).positive_logit(Target(COS, ones, ones))


@pytest.mark.parametrize("lambda_p", [0.0, 0.5, 2.0])
def test_positive_transform(lambda_p: float) -> None:
    psi = _psi(scale=10.0, lambda_p=lambda_p)
    torch.testing.assert_close(psi, 10.0 * (COS - lambda_p * (1 - COS) ** 2), atol=1e-12, rtol=0)
    assert bool((torch.diff(psi) > 0).all()), "ψ must increase with c"
    assert bool((psi <= 10.0 * COS + 1e-12).all()) and float(psi[-1]) == pytest.approx(10.0)


@pytest.mark.parametrize("goal_n", [-1.0, -0.2, 0.1, 0.4, 1.0])
@pytest.mark.parametrize("lambda_n", [0.0, 0.5, 2.0])
def test_negative_transform(lambda_n: float, goal_n: float) -> None:
    phi = build_loss("sosoftmax", scale=10.0, lambda_n=lambda_n, goal_n=goal_n).phi(COS)
    below = COS <= goal_n
    torch.testing.assert_close(phi[below], 10.0 * COS[below], atol=1e-12, rtol=0)
    above = ~below
    want = 10.0 * (COS[above] + lambda_n * (COS[above] - goal_n) ** 2)
    torch.testing.assert_close(phi[above], want, atol=1e-12, rtol=0)
    assert bool((torch.diff(phi) > 0).all()), "φ must increase with c"


def test_negative_transform_gradient_is_continuous_at_goal() -> None:
    loss = build_loss("sosoftmax", scale=1.0, lambda_n=2.0, goal_n=0.1)
    cos = torch.tensor([0.1 - 1e-9, 0.1 + 1e-9, 0.6], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss.phi(cos).sum(), cos)
    assert grad.tolist() == pytest.approx([1.0, 1.0, 1.0 + 2 * 2.0 * 0.5], abs=1e-7)


def test_init_errors() -> None:
    with pytest.raises(ValueError, match=r"sosoftmax\.goal_n = 1\.5 cos is outside \[-1, 1\]"):
        build_loss("sosoftmax", goal_n=1.5)
