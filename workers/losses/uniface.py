"""UniFace: the unified cross-entropy (UCE) loss, one threshold b for every class."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ._base import Batch, Interval, MarginLoss, Target, hyperparameter, softplus


@dataclass(frozen=True)
class UniFace(MarginLoss):
    """UniFace (UCE with margin): every sample-to-class pair is a binary decision against one
    learnable bias b, so a single threshold separates positives from negatives.

    Formula: P = s·(cos θ_y − m) − b; per negative class T_j = softplus(s·cos θ_j − b);
    L = softplus(−P) + λ·Σ_{j≠y, j sampled} T_j — a *sum* of per-class terms, not a
    log-sum-exp (the head's ``'sum'`` reduction). Following the code, both arguments are
    clipped to [−s, s] before softplus (no gradient beyond). b is a learnable scalar state,
    b₀ = log(10·r·C) with C the number of classes and r the head's sample ratio.

    Paper: Zhou et al., "UniFace: Unified Cross-Entropy Loss for Deep Face Recognition", ICCV
    2023,
    https://openaccess.thecvf.com/content/ICCV2023/html/Zhou_UniFace_Unified_Cross-Entropy_Loss_for_Deep_Face_Recognition_ICCV_2023_paper.html
    — code CVI-SZU/UniFace ``head.py`` (``Unified_Cross_Entropy_Loss``: m = 0.4, s = 64, λ = 1,
    b₀ = log(C·r·10), the clip) and ``train.py`` (Partial FC sampling with ratio r). Sampled
    negatives: like the authors' Partial FC training, the sum runs over the sampled classes
    only, with no 1/r correction — b₀ already counts the r·C sampled classes. Ours: b lives in
    the head's loss state; every rank holds it and its all-reduced gradient.

    Hyperparameters:
        scale: s, dimensionless, in [1, 256]; default 64.
        margin: m, cosine units, in [0, 1]; default 0.4.
        lambda_n: λ, weight of the negatives' sum (dimensionless), in [0, 100]; default 1.
    ``margin_grad`` does not apply: the margin shifts the logit by a constant.
    """

    name: ClassVar[str] = "uniface"
    context_in_phi: ClassVar[bool] = True
    reduction: ClassVar[str] = "sum"  # type: ignore[misc]
    learnable_state: ClassVar[tuple[str, ...]] = ("bias",)
    scale: float = hyperparameter(64.0, Interval(1.0, 256.0), doc="logit scale s")
    margin: float = hyperparameter(0.4, Interval(0.0, 1.0), unit="cos", doc="cosine margin m")
    lambda_n: float = hyperparameter(1.0, Interval(0.0, 100.0), doc="weight λ of the negatives")

    def initial_state(self, num_classes: int, sample_ratio: float) -> dict[str, float]:
        return {"bias": math.log(10.0 * sample_ratio * num_classes)}

    def prepare(self, batch: Batch, state: Any) -> torch.Tensor:
        """Context: the bias b on every row (differentiable: b is learned)."""
        return state.bias.to(batch.target.dtype).expand(len(batch.target), 1)

    def psi(self, target: Target) -> torch.Tensor:
        bias = self.context_for(target)[:, 0].to(target.logit.dtype)
        return self.scale * (target.logit - self.margin) - bias

    def phi(self, logits: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            raise ValueError("uniface.phi needs the per-row context (the bias) of prepare()")
        logit = self.scale * logits - context.to(logits.dtype)
        return softplus(logit.clamp(-self.scale, self.scale))

    def combine(self, positive: torch.Tensor, lse_negative: torch.Tensor) -> torch.Tensor:
        return softplus(-positive.clamp(-self.scale, self.scale)) + self.lambda_n * lse_negative
