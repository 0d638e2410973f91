"""ArcFace: additive angular margin with the monotone fallback."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ._base import Interval, MarginGrad, MarginLoss, Target, hyperparameter, margin_grad_field


@dataclass(frozen=True)
class ArcFace(MarginLoss):
    """ArcFace: add a margin to the target angle.

    Formula: P = s·cos(θ_y + m) for θ_y ≤ π − m, else P = s·(cos θ_y − m·sin m) (monotone
    fallback: cos(θ + m) would rise again past π − m); N_j = s·cos θ_j;
    L = softplus(LSE_{j≠y}(N) − P). cos(θ + m) = c·cos m − √(1 − c²)·sin m, c clamped to
    [−1 + ε, 1 − ε] inside the root.

    Paper: Deng et al., "ArcFace: Additive Angular Margin Loss for Deep Face Recognition",
    CVPR 2019, https://arxiv.org/abs/1801.07698.

    Hyperparameters:
        scale: s, dimensionless, in [1, 256]; default 64.
        margin: m, radians, in [0, 1.2]; default 0.5.
        margin_grad: 'true' or 'detached'.
    """

    name: ClassVar[str] = "arcface"
    scale: float = hyperparameter(64.0, Interval(1.0, 256.0), doc="logit scale s")
    margin: float = hyperparameter(0.5, Interval(0.0, 1.2), unit="rad", doc="angular margin m")
    margin_grad: MarginGrad = margin_grad_field()

    def psi(self, target: Target) -> torch.Tensor:
        cos = target.logit
        sin = torch.sqrt(1.0 - self.clamp_cos(cos) ** 2)
        shifted = cos * math.cos(self.margin) - sin * math.sin(self.margin)
        fallback = cos - self.margin * math.sin(self.margin)
        within = cos >= math.cos(math.pi - self.margin)
        return self.scale * torch.where(within, shifted, fallback)
