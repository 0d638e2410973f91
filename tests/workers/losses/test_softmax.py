"""Softmax: F.cross_entropy on raw W·x, no bias, no normalisation."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from _cases import random_batch

from workers.losses import build_loss, reference_loss


def test_equals_torch_cross_entropy() -> None:
    embeddings, weights, labels = random_batch(10, 13, 6, seed=0)
    embeddings = (3 * embeddings).requires_grad_()
    weights = weights.requires_grad_()
    got = reference_loss(build_loss("softmax"), embeddings, weights, labels)
    want = F.cross_entropy(embeddings @ weights.T, labels)
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    for g, w in zip(torch.autograd.grad(got, (embeddings, weights)),
                    torch.autograd.grad(want, (embeddings, weights)), strict=True):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


def test_no_hyperparameters_and_unit_scale() -> None:
    loss = build_loss("softmax")
    assert loss.hyperparameters() == ()
    assert loss.scale_value() == 1.0
    assert not loss.normalize_embeddings and not loss.normalize_weights
