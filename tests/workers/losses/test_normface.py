"""NormFace: F.cross_entropy on s·cos θ."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from _cases import random_batch

from workers.losses import build_loss, reference_loss


@pytest.mark.parametrize("scale", [1.0, 8.0, 64.0, 256.0])
def test_equals_torch_cross_entropy(scale: float) -> None:
    embeddings, weights, labels = random_batch(10, 13, 6, seed=1)
    embeddings = embeddings.requires_grad_()
    weights = weights.requires_grad_()
    got = reference_loss(build_loss("normface", scale=scale), embeddings, weights, labels)
    cos = F.cosine_similarity(embeddings[:, None], weights[None], dim=2)
    want = F.cross_entropy(scale * cos, labels)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-12)
    for g, w in zip(torch.autograd.grad(got, (embeddings, weights)),
                    torch.autograd.grad(want, (embeddings, weights)), strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=1e-10)


def test_scale_256_float32_no_overflow() -> None:
    embeddings, weights, labels = random_batch(10, 13, 6, seed=2, dtype=torch.float32)
    value = reference_loss(build_loss("normface", scale=256.0), embeddings, weights, labels)
    assert torch.isfinite(value)
