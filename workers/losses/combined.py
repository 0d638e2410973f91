"""Combined margin: multiplicative angular, additive angular and additive cosine margins."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ._base import Interval, MarginGrad, MarginLoss, Target, hyperparameter, margin_grad_field


@dataclass(frozen=True)
class CombinedMargin(MarginLoss):
    """Combined margin (insightface): SphereFace-, ArcFace- and CosFace-style margins at once.

    Formula: P = s·(cos(m1·θ_y + m2) − m3) while m1·θ_y + m2 ≤ π; past that point
    (θ_y > θ_b = (π − m2)/m1) P = s·(cos θ_y − cos θ_b − 1 − m3), the continuous, monotone
    linear continuation (ours: the paper gives no fallback; insightface has none). N_j = s·cos θ_j,
    L = softplus(LSE_{j≠y}(N) − P). All three margins are always applied (insightface's
    implementation silently drops m1 and m2 whenever m3 > 0; this one never does).

    Paper: Deng et al., ArcFace, CVPR 2019, §3.3, https://arxiv.org/abs/1801.07698.

    Hyperparameters:
        scale: s, dimensionless, in [1, 256]; default 64.
        m1: multiplicative angular margin (dimensionless), in [0.5, 2]; default 1.0.
        m2: additive angular margin, radians, in [0, 1.2]; default 0.3.
        m3: additive cosine margin (cosine units), in [0, 1]; default 0.2.
        margin_grad: 'true' or 'detached'.
    """

    name: ClassVar[str] = "combined"
    scale: float = hyperparameter(64.0, Interval(1.0, 256.0), doc="logit scale s")
    m1: float = hyperparameter(1.0, Interval(0.5, 2.0), doc="multiplicative angular margin")
    m2: float = hyperparameter(0.3, Interval(0.0, 1.2), unit="rad", doc="additive angular margin")
    m3: float = hyperparameter(0.2, Interval(0.0, 1.0), unit="cos", doc="additive cosine margin")
    margin_grad: MarginGrad = margin_grad_field()

    def psi(self, target: Target) -> torch.Tensor:
        cos = target.logit
        theta = torch.acos(self.clamp_cos(cos))
        theta_b = (math.pi - self.m2) / self.m1
        margined = torch.cos(self.m1 * theta + self.m2) - self.m3
        continued = cos - math.cos(min(theta_b, math.pi)) - 1.0 - self.m3
        return self.scale * torch.where(theta <= theta_b, margined, continued)
