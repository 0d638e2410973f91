"""Partial FC's inter-class filter τ: a negative with cos θ_j > τ counts with cos θ_j = 0."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _cases import expand_centres, make_batch
from _formulas import ZOO, naive_loss

from workers.losses import build_loss, get_loss_class, list_losses, reference_loss

COSINE_LOSSES = [name for name in list_losses()
                 if build_loss(name).cosine_logits]


def _small(name: str) -> object:
    has_scale = any(s.name == "scale" for s in get_loss_class(name).hyperparameters())
    return build_loss(name, scale=8.0) if has_scale else build_loss(name)


def _run(loss: object, threshold: float, seed: int = 0) -> tuple[torch.Tensor, ...]:
    embeddings, weights, labels = make_batch(seed=seed)
    e = embeddings.clone().requires_grad_()
    w = expand_centres(loss, weights).clone().requires_grad_()
    value = reference_loss(loss, e, w, labels, step=2, filter_threshold=threshold,
                           reduction="none")
    return (value.detach(), *torch.autograd.grad(value.sum(), (e, w)))


@pytest.mark.parametrize("name", COSINE_LOSSES)
def test_threshold_one_is_the_base_loss(name: str) -> None:
    loss = _small(name)
    for got, want in zip(_run(loss, 1.0), _run(loss, 0.0), strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


def _filtered_arcface(embeddings: torch.Tensor, weights: torch.Tensor, labels: torch.Tensor,
                      threshold: float, s: float, m: float) -> torch.Tensor:
    """insightface's filter, written out per sample for ArcFace."""
    losses = []
    for x, y in zip(embeddings, labels.tolist(), strict=True):
        cos = torch.stack([F.cosine_similarity(x, w, dim=0) for w in weights])
        theta = math.acos(cos[y].detach().item())
        positive = s * (torch.cos(torch.acos(cos[y]) + m) if theta <= math.pi - m
                        else cos[y] - m * math.sin(m))
        negatives = [s * (c * 0.0 if c.item() > threshold else c)
                     for j, c in enumerate(cos) if j != y]
        losses.append(torch.logsumexp(torch.stack([positive, *negatives]), 0) - positive)
    return torch.stack(losses)


def test_filter_matches_a_per_sample_arcface() -> None:
    embeddings, weights, labels = make_batch(seed=1)
    e, w = embeddings.clone().requires_grad_(), weights.clone().requires_grad_()
    got = reference_loss(build_loss("arcface", scale=8.0), e, w, labels, filter_threshold=0.2,
                         reduction="none")
    e2, w2 = embeddings.clone().requires_grad_(), weights.clone().requires_grad_()
    want = _filtered_arcface(e2, w2, labels, 0.2, 8.0, 0.5)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    for a, b in zip(torch.autograd.grad(got.sum(), (e, w)), torch.autograd.grad(
            want.sum(), (e2, w2)), strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0)
    cos = F.normalize(embeddings, dim=1) @ F.normalize(weights, dim=1).T
    own = F.one_hot(labels, 7).bool()
    assert bool(((cos > 0.2) & ~own).any()), "degenerate test: nothing filtered"
    assert not torch.allclose(got, reference_loss(build_loss("arcface", scale=8.0), embeddings,
                                                  weights, labels, reduction="none"))


@pytest.mark.parametrize("name", ZOO)
def test_filter_matches_the_naive_zoo(name: str) -> None:
    loss = _small(name)
    embeddings, weights, labels = make_batch(seed=2)
    e = embeddings.clone().requires_grad_()
    w = expand_centres(loss, weights).clone().requires_grad_()
    got = reference_loss(loss, e, w, labels, step=2, filter_threshold=0.3, reduction="none")
    want = naive_loss(name, loss.hyperparameter_values(), e, w, labels, step=2,
                      filter_threshold=0.3, reduction="none")
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


@pytest.mark.parametrize(("name", "threshold", "message"), [
    ("arcface", 1.5, r"^filter_threshold = 1\.5 is outside \[0, 1\] \(cosine units\)$"),
    ("arcface", -0.1, r"^filter_threshold = -0\.1 is outside \[0, 1\]"),
    ("softmax", 0.4, r"^filter_threshold = 0\.4 needs cosine logits, but softmax does not "
                     r"normalise both embeddings and centres$"),
    ("sphereface", 0.4, r"needs cosine logits, but sphereface"),
])
def test_filter_errors(name: str, threshold: float, message: str) -> None:
    embeddings, weights, labels = make_batch()
    with pytest.raises(ValueError, match=message):
        reference_loss(build_loss(name), embeddings, weights, labels, filter_threshold=threshold)
    reference_loss(build_loss(name), embeddings, weights, labels, filter_threshold=0.0)
