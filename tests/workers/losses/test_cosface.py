"""CosFace: P = s·(cos θ_y − m)."""

from __future__ import annotations

import pytest
import torch
from _cases import make_batch

from workers.losses import Target, build_loss, reference_loss


def test_psi_is_shifted_cosine() -> None:
    loss = build_loss("cosface", scale=30.0, margin=0.35)
    cos = torch.linspace(-1, 1, 101, dtype=torch.float64)
    ones = torch.ones_like(cos)
    torch.testing.assert_close(loss.positive_logit(Target(cos, ones, ones)), 30.0 * (cos - 0.35),
                               atol=1e-13, rtol=0)


def test_detached_margin_changes_nothing_in_backward() -> None:
    """ψ(c) − s·c = −s·m is a constant: both margin_grad modes give the same gradients."""
    embeddings, weights, labels = make_batch(seed=2)
    grads = []
    for mode in ("true", "detached"):
        e, w = embeddings.clone().requires_grad_(), weights.clone().requires_grad_()
        value = reference_loss(build_loss("cosface", margin_grad=mode), e, w, labels)
        grads.append((value.detach(), *torch.autograd.grad(value, (e, w))))
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


def test_margin_raises_the_loss() -> None:
    embeddings, weights, labels = make_batch(seed=3)
    values = [float(reference_loss(build_loss("cosface", margin=m), embeddings, weights, labels))
              for m in (0.0, 0.2, 0.4)]
    assert values == sorted(values) and values[0] < values[-1]


def test_init_errors() -> None:
    with pytest.raises(ValueError, match=r"cosface\.margin = 1\.5 cos is outside \[0, 1\]"):
        build_loss("cosface", margin=1.5)
