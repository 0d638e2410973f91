"""ElasticFace-Arc / -Cos: margins m_i = m + σ·n_i drawn per (seed, step, global row)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from _cases import make_batch

from workers.losses import Batch, Target, build_loss, reference_loss
from workers.losses.elasticface import MARGIN_DRAWS, elastic_margins
from workers.seeding import row_normals


def _batch(cos: torch.Tensor, step: int = 0, seed: int | None = 1) -> Batch:
    return Batch(cos, torch.ones_like(cos), step=step, seed=seed)


@pytest.mark.parametrize("name", ["elasticface_arc", "elasticface_cos"])
def test_margins_are_normal_around_m(name: str) -> None:
    loss = build_loss(name, sigma=0.05)
    margins = elastic_margins(loss, _batch(torch.zeros(20_000, dtype=torch.float64)))[:, 0]
    assert float(margins.mean()) == pytest.approx(loss.margin, abs=2e-3)
    assert float(margins.std()) == pytest.approx(0.05, rel=0.03)


def test_margin_of_a_row_depends_on_seed_step_and_row_only() -> None:
    loss = build_loss("elasticface_arc", sigma=0.1)
    full = elastic_margins(loss, _batch(torch.zeros(12, dtype=torch.float64), step=4))[:, 0]
    want = 0.5 + 0.1 * torch.from_numpy(row_normals(MARGIN_DRAWS, 1, 4, np.arange(12)))
    torch.testing.assert_close(full, want, atol=0, rtol=0)
    # a rank's rows [5, 9) of the global batch draw the same values on their own
    torch.testing.assert_close(
        0.5 + 0.1 * torch.from_numpy(row_normals(MARGIN_DRAWS, 1, 4, np.arange(5, 9))),
        full[5:9], atol=0, rtol=0)
    other_step = elastic_margins(loss, _batch(torch.zeros(12, dtype=torch.float64), step=5))
    other_seed = elastic_margins(loss, _batch(torch.zeros(12, dtype=torch.float64), step=4,
                                              seed=2))
    assert not torch.equal(other_step[:, 0], full) and not torch.equal(other_seed[:, 0], full)


def test_plus_gives_the_highest_cosine_the_smallest_margin() -> None:
    cos = torch.tensor([0.1, 0.9, 0.5, -0.3, 0.7], dtype=torch.float64)
    plain = elastic_margins(build_loss("elasticface_cos", sigma=0.1), _batch(cos))[:, 0]
    plus = elastic_margins(build_loss("elasticface_cos", sigma=0.1, plus=True), _batch(cos))[:, 0]
    assert sorted(plus.tolist()) == sorted(plain.tolist())  # the same draws, re-assigned
    by_cos = torch.argsort(cos, descending=True)
    assert torch.equal(plus[by_cos], torch.sort(plain).values)


def test_without_a_seed_every_margin_is_m() -> None:
    loss = build_loss("elasticface_arc", scale=2.0, margin=0.4)
    cos = torch.tensor([0.6, -0.2], dtype=torch.float64)
    got = loss.positive_logit(Target(cos, torch.ones(2), torch.ones(2)))
    want = [2.0 * math.cos(math.acos(c) + 0.4) for c in cos.tolist()]
    assert got.tolist() == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize(("name", "base", "margin"), [("elasticface_arc", "arcface", 0.5),
                                                      ("elasticface_cos", "cosface", 0.35)])
@pytest.mark.parametrize("plus", [False, True])
def test_sigma_zero_is_the_base_loss(name: str, base: str, margin: float, plus: bool) -> None:
    embeddings, weights, labels = make_batch(seed=8)
    grads = []
    for loss in (build_loss(name, scale=8.0, margin=margin, sigma=0.0, plus=plus),
                 build_loss(base, scale=8.0, margin=margin)):
        e, w = embeddings.clone().requires_grad_(), weights.clone().requires_grad_()
        value = reference_loss(loss, e, w, labels, step=9, reduction="none")
        grads.append((value.detach(), *torch.autograd.grad(value.sum(), (e, w))))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_arc_fallback_per_sample_margin() -> None:
    """Past θ = π − m_i the positive is cos θ − m_i·sin m_i (monotone; ours)."""
    loss = build_loss("elasticface_arc", scale=1.0)
    cos = torch.tensor([-0.99, 0.3], dtype=torch.float64)
    margins = torch.tensor([[0.45], [0.55]], dtype=torch.float64)
    got = loss.positive_logit(Target(cos, torch.ones(2), torch.ones(2), context=margins))
    assert got.tolist() == pytest.approx(
        [-0.99 - 0.45 * math.sin(0.45), math.cos(math.acos(0.3) + 0.55)], abs=1e-12)


def test_the_seed_reaches_the_reference() -> None:
    loss = build_loss("elasticface_cos", scale=8.0, sigma=0.2)
    embeddings, weights, labels = make_batch(seed=1)
    a, b = (reference_loss(loss, embeddings, weights, labels, seed=s) for s in (0, 1))
    assert not torch.equal(a, b)
    assert torch.equal(a, reference_loss(loss, embeddings, weights, labels, seed=0))


@pytest.mark.parametrize(("name", "kwargs", "message"), [
    ("elasticface_arc", {"sigma": 0.6},
     r"elasticface_arc\.sigma = 0\.6 rad is outside \[0, 0\.5\]"),
    ("elasticface_arc", {"margin": 1.3}, r"elasticface_arc\.margin = 1\.3 rad is outside"),
    ("elasticface_cos", {"sigma": -0.1}, r"elasticface_cos\.sigma = -0\.1 cos is outside"),
    ("elasticface_cos", {"plus": "yes"}, r"elasticface_cos\.plus = 'yes' is not one of"),
])
def test_init_errors(name: str, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}"):
        build_loss(name, **kwargs)
