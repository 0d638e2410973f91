"""AdaFace: a margin that adapts to image quality, proxied by the feature norm."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ._base import (
    Batch,
    Interval,
    MarginGrad,
    MarginLoss,
    Target,
    hyperparameter,
    margin_grad_field,
)


@dataclass(frozen=True)
class AdaFace(MarginLoss):
    """AdaFace: high-norm (good-quality) samples get an angular margin, low-norm ones a cosine
    margin that emphasises easy samples.

    Formula: ã = clip(‖x‖, 0.001, 100), detached; μ ← α·mean(ã) + (1 − α)·μ and
    σ ← α·std(ã) + (1 − α)·σ (unbiased std over the global batch, updated before use;
    μ₀ = 20, σ₀ = 100); ẑ = clip(h·(ã − μ)/(σ + ε), −1, 1); g_ang = −m·ẑ, g_add = m + m·ẑ;
    P = s·(cos(clip(θ_y + g_ang, ε, π − ε)) − g_add) with θ_y = arccos(clip(cos θ_y, −1 + ε,
    1 − ε)); N_j = s·clip(cos θ_j, −1 + ε, 1 − ε); L = softplus(LSE_{j≠y}(N) − P); ε = 10⁻³.

    Paper: Kim et al., "AdaFace: Quality Adaptive Margin for Face Recognition", CVPR 2022,
    https://arxiv.org/abs/2204.00964; code mk-minchul/AdaFace ``head.py`` (ε, the clips, μ₀,
    σ₀; α = 0.01 is its training default). Following the code, the negatives' cosines are
    clipped to [−1 + ε, 1 − ε] too (the paper writes s·cos θ_j). Ours: μ and σ come from the
    *global* batch (identical on every rank), are updated only in training mode, and a
    one-row batch (no unbiased std) leaves σ unchanged.

    Hyperparameters:
        scale: s, dimensionless, in [1, 256]; default 64.
        margin: m, radians for g_ang and cosine units for g_add, in [0, 1]; default 0.4.
        h: concentration of the norm scaler (dimensionless), in [0, 2]; default 0.333
            (0: ẑ = 0, AdaFace is CosFace at margin m).
        t_alpha: α, the EMA weight of the batch statistics, in [0, 1]; default 0.01.
        margin_grad: 'true' or 'detached'.
    """

    name: ClassVar[str] = "adaface"
    eps: ClassVar[float] = 1e-3
    scale: float = hyperparameter(64.0, Interval(1.0, 256.0), doc="logit scale s")
    margin: float = hyperparameter(0.4, Interval(0.0, 1.0), unit="rad",
                                   doc="margin m (angular in g_ang, cosine in g_add)")
    h: float = hyperparameter(0.333, Interval(0.0, 2.0), doc="norm-scaler concentration h")
    t_alpha: float = hyperparameter(0.01, Interval(0.0, 1.0), doc="EMA weight α of μ, σ")
    margin_grad: MarginGrad = margin_grad_field()

    def initial_state(self, num_classes: int, sample_ratio: float) -> dict[str, float]:
        return {"mu": 20.0, "sigma": 100.0}

    @torch.no_grad()
    def prepare(self, batch: Batch, state: Any) -> torch.Tensor:
        """Update μ, σ from the batch's norms; context ẑ per row."""
        norm = batch.embedding_norm.clamp(0.001, 100.0)
        if batch.update:
            alpha = self.t_alpha
            state.mu.copy_(alpha * norm.mean() + (1.0 - alpha) * state.mu)
            if len(norm) > 1:
                state.sigma.copy_(alpha * norm.std() + (1.0 - alpha) * state.sigma)
        mu, sigma = state.mu.to(norm.dtype), state.sigma.to(norm.dtype)
        return (self.h * (norm - mu) / (sigma + self.eps)).clamp(-1.0, 1.0).unsqueeze(1)

    def psi(self, target: Target) -> torch.Tensor:
        scaler = self.context_for(target)[:, 0].to(target.logit.dtype)
        theta = torch.acos(self.clamp_cos(target.logit))
        angle = (theta - self.margin * scaler).clamp(self.eps, math.pi - self.eps)
        return self.scale * (torch.cos(angle) - (self.margin + self.margin * scaler))

    def phi(self, logits: torch.Tensor) -> torch.Tensor:
        return self.scale * self.clamp_cos(logits)
