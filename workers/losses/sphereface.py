"""SphereFace (A-Softmax): multiplicative angular margin with λ annealing."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ._base import Interval, MarginGrad, MarginLoss, Target, hyperparameter, margin_grad_field


def chebyshev(cos: torch.Tensor, degree: int) -> torch.Tensor:
    """``T_m(c) = cos(m·arccos c)`` by the recurrence ``T_{n+1} = 2c·T_n − T_{n−1}``."""
    previous, current = torch.ones_like(cos), cos
    if degree == 0:
        return previous
    for _ in range(int(degree) - 1):
        previous, current = current, 2.0 * cos * current - previous
    return current


@dataclass(frozen=True)
class SphereFace(MarginLoss):
    """SphereFace / A-Softmax: class centres normalised, the feature norm kept as the scale.

    Formula: ψ(θ) = (−1)^k·cos(m·θ) − 2k with k = ⌊m·θ/π⌋ (k from a detached θ, cos(mθ) as the
    Chebyshev polynomial T_m(cos θ)); P = ‖x‖·(λ·cos θ_y + ψ(θ_y)) / (1 + λ) with the annealed
    λ = max(λ_min, λ_base·(1 + γ·step)^(−power)); N_j = ‖x‖·cos θ_j = W̃_j·x;
    L = softplus(LSE_{j≠y}(N) − P). ``step`` is the optimisation step the caller passes.

    Paper: Liu et al., "SphereFace: Deep Hypersphere Embedding for Face Recognition", CVPR 2017,
    https://arxiv.org/abs/1704.08063; schedule from the authors' code (λ_base 1000, γ 0.12,
    power 1, λ_min 5).

    Hyperparameters:
        margin: m, integer multiplicative angular margin, in {1, …, 6}; default 4.
        lambda_base: λ_base, dimensionless, in [0, 1e5]; default 1000.
        lambda_min: λ_min, dimensionless, in [0, 1e5]; default 5.
        lambda_gamma: γ, per step, in [0, 10]; default 0.12.
        lambda_power: power, dimensionless, in [0, 10]; default 1.
        margin_grad: 'true' or 'detached'.
    """

    name: ClassVar[str] = "sphereface"
    normalize_embeddings: ClassVar[bool] = False
    margin: int = hyperparameter(4, Interval(1, 6, integer=True), doc="multiplicative margin m")
    lambda_base: float = hyperparameter(1000.0, Interval(0.0, 1e5), doc="λ at step 0")
    lambda_min: float = hyperparameter(5.0, Interval(0.0, 1e5), doc="floor of annealed λ")
    lambda_gamma: float = hyperparameter(0.12, Interval(0.0, 10.0), unit="1/step", doc="γ")
    lambda_power: float = hyperparameter(1.0, Interval(0.0, 10.0), doc="annealing power")
    margin_grad: MarginGrad = margin_grad_field()

    def annealed_lambda(self, step: int) -> float:
        """λ = max(λ_min, λ_base·(1 + γ·step)^(−power))."""
        return max(self.lambda_min, self.lambda_base * (1.0 + self.lambda_gamma * step)
                   ** -self.lambda_power)

    def psi(self, target: Target) -> torch.Tensor:
        norm = target.embedding_norm
        cos = self.clamp_cos(target.logit / norm.clamp_min(1e-12))
        k = torch.floor(self.margin * torch.acos(cos.detach()) / math.pi)
        psi = (1.0 - 2.0 * torch.remainder(k, 2.0)) * chebyshev(cos, self.margin) - 2.0 * k
        lam = self.annealed_lambda(target.step)
        return norm * (lam * cos + psi) / (1.0 + lam)

    def phi(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def margin_free_positive(self, target: Target) -> torch.Tensor:
        return target.logit
