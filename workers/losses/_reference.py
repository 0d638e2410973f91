"""The single-process reference: every loss computed the plain way, logits materialised.

This is the ground truth the distributed head is tested against: one process, the full (or a
given subset of the) class-centre matrix, a ``B × C`` logit matrix, any dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._base import MarginLoss, Target


def raw_logits(loss: MarginLoss, embeddings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``z = x̃·W̃ᵀ`` with ``x̃``/``W̃`` L2-normalised where the loss asks for it."""
    x = F.normalize(embeddings, dim=1) if loss.normalize_embeddings else embeddings
    w = F.normalize(weights, dim=1) if loss.normalize_weights else weights
    return x @ w.T


def reference_loss(
    loss: MarginLoss,
    embeddings: torch.Tensor,
    weights: torch.Tensor,
    labels: torch.Tensor,
    *,
    step: int = 0,
    classes: torch.Tensor | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """The loss over a batch with materialised logits.

    ``classes`` restricts the negatives to a subset of class indices (every label must be in
    it) — the reference for a sampled head. ``reduction`` is ``'mean'``, ``'sum'`` or ``'none'``.
    """
    if classes is not None:
        sorted_classes = torch.sort(classes).values
        position = torch.searchsorted(sorted_classes, labels)
        if bool((sorted_classes[position.clamp_max(len(sorted_classes) - 1)] != labels).any()):
            raise ValueError("reference_loss: every label must be among `classes`")
        weights, labels = weights[sorted_classes], position
    logits = raw_logits(loss, embeddings, weights)
    rows = torch.arange(len(labels), device=labels.device)
    target = Target(
        logit=logits[rows, labels],
        embedding_norm=embeddings.norm(dim=1),
        weight_norm=weights[labels].norm(dim=1),
        step=step,
    )
    negatives = loss.phi(logits).masked_fill(F.one_hot(labels, logits.shape[1]).bool(),
                                             float("-inf"))
    lse = torch.logsumexp(negatives, dim=1)
    virtual = loss.virtual_logit(target)
    if virtual is not None:
        lse = torch.logaddexp(lse, virtual)
    per_sample = loss.combine(loss.positive_logit(target), lse)
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()
