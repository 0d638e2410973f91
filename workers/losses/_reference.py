"""The single-process reference: every loss computed the plain way, logits materialised.

This is the ground truth the distributed head is tested against: one process, the full (or a
given subset of the) class-centre matrix, a ``B × C`` logit matrix, any dtype. Sub-centres: a
loss with ``subcenters = K`` takes centres of width ``K·D`` (class c's K rows side by side) and
``z_{ic} = max_k x̃·W̃_{c,k}``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ._base import Batch, MarginLoss, Target
from ._state import LossState


def raw_logits(loss: MarginLoss, embeddings: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """``z = x̃·W̃ᵀ`` with ``x̃``/``W̃`` L2-normalised where the loss asks for it (for K
    sub-centres, the maximum over each class's K rows)."""
    x = F.normalize(embeddings, dim=1) if loss.normalize_embeddings else embeddings
    w = _subcenter_rows(loss, weights, embeddings.shape[1])
    w = F.normalize(w, dim=-1) if loss.normalize_weights else w
    if loss.subcenters == 1:
        return x @ w.T
    return (x @ w.flatten(0, 1).T).unflatten(1, w.shape[:2]).max(dim=2).values


def _subcenter_rows(loss: MarginLoss, weights: torch.Tensor, dim: int) -> torch.Tensor:
    """``weights`` (C, K·D) as (C, K, D) for K > 1 sub-centres; unchanged for K = 1."""
    k = loss.subcenters
    if weights.shape[1] != k * dim:
        raise ValueError(f"{loss.name} with {k} centre row(s) per class needs centres of width "
                         f"{k}·{dim} = {k * dim}, got {weights.shape[1]}")
    return weights if k == 1 else weights.unflatten(1, (k, dim))


def check_filter_threshold(loss: MarginLoss, threshold: float) -> None:
    """One-line ``ValueError`` unless the inter-class filter ``threshold`` fits ``loss``."""
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"filter_threshold = {threshold!r} is outside [0, 1] (cosine units)")
    if threshold > 0 and not loss.cosine_logits:
        raise ValueError(f"filter_threshold = {threshold} needs cosine logits, but {loss.name} "
                         "does not normalise both embeddings and centres")


def filter_negatives(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Partial FC's inter-class filter: a logit above ``threshold`` becomes 0 (no gradient);
    ``threshold = 0`` is off. The target column is masked by the caller afterwards."""
    return logits if threshold == 0 else logits.masked_fill(logits > threshold, 0.0)


def reference_loss(
    loss: MarginLoss,
    embeddings: torch.Tensor,
    weights: torch.Tensor,
    labels: torch.Tensor,
    *,
    step: int = 0,
    classes: torch.Tensor | None = None,
    reduction: str = "mean",
    state: LossState | None = None,
    seed: int = 0,
    filter_threshold: float = 0.0,
) -> torch.Tensor:
    """The loss over a batch with materialised logits.

    ``classes`` restricts the negatives to a subset of class indices (every label must be in
    it) — the reference for a sampled head. ``reduction`` is ``'mean'``, ``'sum'`` or ``'none'``.
    A stateful loss uses and updates ``state`` (a ``LossState``) as one training step would;
    with ``state=None`` it starts from a fresh one (``num_classes = len(weights)``, sample ratio
    1). ``seed``: the run seed of per-row random draws (ElasticFace). ``filter_threshold``:
    Partial FC's inter-class filter τ (negatives with cos θ_j > τ count with cos θ_j = 0).
    """
    check_filter_threshold(loss, filter_threshold)
    num_classes = len(weights)
    if classes is not None:
        sorted_classes = torch.sort(classes).values
        position = torch.searchsorted(sorted_classes, labels)
        if bool((sorted_classes[position.clamp_max(len(sorted_classes) - 1)] != labels).any()):
            raise ValueError("reference_loss: every label must be among `classes`")
        weights, labels = weights[sorted_classes], position
    logits = raw_logits(loss, embeddings, weights)
    rows = torch.arange(len(labels), device=labels.device)
    norm = embeddings.norm(dim=1)
    context = None
    if loss.needs_batch:
        if state is None:
            acc = torch.float64 if embeddings.dtype == torch.float64 else torch.float32
            state = LossState(loss, num_classes, 1.0, device=embeddings.device, dtype=acc)
        batch = Batch(logits[rows, labels].detach(), norm.detach(), step, seed)
        context = loss.prepare(batch, state)
    target = Target(
        logit=logits[rows, labels],
        embedding_norm=norm,
        weight_norm=_target_weight_norm(loss, embeddings, weights, labels),
        step=step,
        context=context,
    )
    negatives = filter_negatives(logits, filter_threshold)
    negatives = loss.negatives(negatives, context)
    own = F.one_hot(labels, logits.shape[1]).bool()
    if loss.reduction == "sum":
        negative = negatives.masked_fill(own, 0.0).sum(dim=1)
    else:
        negative = torch.logsumexp(negatives.masked_fill(own, float("-inf")), dim=1)
    virtual = loss.virtual_logit(target)
    if virtual is not None:
        negative = torch.logaddexp(negative, virtual)
    per_sample = loss.combine(loss.positive_logit(target), negative)
    extra = loss.regularizer(target)
    if extra is not None:
        per_sample = per_sample + extra
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.mean()


def _target_weight_norm(loss: MarginLoss, embeddings: torch.Tensor, weights: torch.Tensor,
                        labels: torch.Tensor) -> torch.Tensor:
    """‖W_y‖ (for K sub-centres: of the sub-centre closest to the embedding)."""
    if loss.subcenters == 1:
        return weights[labels].norm(dim=1)
    centres = _subcenter_rows(loss, weights, embeddings.shape[1])[labels]
    closest = (F.normalize(centres, dim=2) @ F.normalize(embeddings, dim=1).unsqueeze(2)).argmax(1)
    return centres.norm(dim=2).gather(1, closest).squeeze(1)
