"""Virtual Softmax: one virtual negative v = ‖W_y‖·‖x‖ (= s normalised); loss ≥ log 2."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _cases import random_batch

from workers.losses import build_loss, reference_loss


@pytest.mark.parametrize("normalized", [False, True])
def test_loss_at_least_log_two(normalized: bool) -> None:
    loss = build_loss("virtual", normalized=normalized, scale=16.0)
    worst = math.inf
    for seed in range(60):
        gen = torch.Generator().manual_seed(seed)
        dim = int(torch.randint(2, 40, (), generator=gen))
        embeddings, weights, labels = random_batch(32, 10, dim, seed=seed)
        # norms spread over three orders of magnitude; some embeddings on their centre
        spread = (3 * torch.rand(42, 1, generator=gen, dtype=torch.float64)).exp()
        embeddings, weights = embeddings * spread[:32], weights * spread[32:]
        embeddings[:4] = weights[labels[:4]] * (1.0 + torch.rand(4, 1, generator=gen,
                                                                 dtype=torch.float64))
        values = reference_loss(loss, embeddings, weights, labels, reduction="none")
        worst = min(worst, float(values.min()))
    # logits reach ~1e4 here: rounding of W_y·x vs ‖W_y‖‖x‖ is ~1e-12 of log 2, a violation
    # of the bound (a wrong virtual logit) is O(1)
    assert worst >= math.log(2.0) - 1e-10
    assert worst == pytest.approx(math.log(2.0), abs=1e-2)  # reached where x ∥ W_y dominates


def test_equals_softmax_with_an_explicit_virtual_class() -> None:
    """Append W_virt = ‖W_y‖·x/‖x‖ as an extra class per sample and run F.cross_entropy."""
    embeddings, weights, labels = random_batch(6, 9, 7, seed=3)
    got = reference_loss(build_loss("virtual"), embeddings, weights, labels, reduction="none")
    want = []
    for x, y in zip(embeddings, labels, strict=True):
        virtual_class = weights[y].norm() * x / x.norm()
        logits = torch.cat([weights, virtual_class[None]]) @ x
        want.append(F.cross_entropy(logits[None], y[None]))
    torch.testing.assert_close(got, torch.stack(want), atol=1e-12, rtol=0)


def test_normalised_virtual_logit_is_the_scale() -> None:
    embeddings, weights, labels = random_batch(6, 9, 7, seed=4)
    got = reference_loss(build_loss("virtual", normalized=True, scale=12.0), embeddings, weights,
                         labels, reduction="none")
    logits = 12.0 * F.normalize(embeddings, dim=1) @ F.normalize(weights, dim=1).T
    logits = torch.cat([logits, torch.full((6, 1), 12.0, dtype=torch.float64)], dim=1)
    torch.testing.assert_close(got, F.cross_entropy(logits, labels, reduction="none"),
                               atol=1e-12, rtol=0)


def test_scale_unused_when_unnormalised() -> None:
    embeddings, weights, labels = random_batch(6, 9, 7, seed=5)
    a, b = (reference_loss(build_loss("virtual", scale=s), embeddings, weights, labels)
            for s in (2.0, 200.0))
    assert torch.equal(a, b)
