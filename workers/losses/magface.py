"""MagFace: an ArcFace margin that grows with the feature norm, plus a norm regulariser."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ._base import (
    Choice,
    Interval,
    MarginGrad,
    MarginLoss,
    Target,
    hyperparameter,
    margin_grad_field,
)
from ._margins import additive_angular


@dataclass(frozen=True)
class MagFace(MarginLoss):
    """MagFace: the margin and a regulariser are functions of the embedding's norm a = ‖x‖.

    Formula: ã = clamp(a, l_a, u_a), m(ã) = l_m + (u_m − l_m)·(ã − l_a)/(u_a − l_a);
    P = s·cos(θ_y + m(ã)) for θ_y ≤ π − m(ã), else s·(cos θ_y − m(ã)·sin m(ã)) (ArcFace's
    fallback; ``easy_margin``: P = s·cos θ_y whenever cos θ_y ≤ 0); N_j = s·cos θ_j;
    L = softplus(LSE_{j≠y}(N) − P) + λ_g·g(ã), g(ã) = ã/u_a² + 1/ã. The gradient flows
    through ã into the margin and the regulariser (zero outside [l_a, u_a], where the clamp
    holds).

    Paper: Meng et al., "MagFace: A Universal Representation for Face Recognition and Quality
    Assessment", CVPR 2021, https://arxiv.org/abs/2103.06627; code IrvingMeng/MagFace
    ``models/magface.py`` (``MagLinear``, ``MagLoss``). The code's ``MagLinear`` defaults to
    the easy margin; the default here is ArcFace's fallback (LOSSES.md; l_m = u_m, λ_g = 0 is
    then exactly ArcFace), ``easy_margin=True`` gives the code's behaviour.

    Hyperparameters:
        scale: s, dimensionless, in [1, 256]; default 64.
        l_a: lower feature norm, norm units, in [0.01, 50]; default 10.
        u_a: upper feature norm, norm units, in [60, 1000]; default 110 (the disjoint ranges
            keep l_a < u_a for every pair a study can draw).
        l_m: margin at ã = l_a, radians, in [0, 1.2]; default 0.45.
        u_m: margin at ã = u_a, radians, in [0, 1.2]; default 0.8 (u_m < l_m is allowed: a
            margin that shrinks with the norm).
        lambda_g: λ_g, weight of the regulariser, in [0, 1000]; default 35.
        easy_margin: False (ArcFace's fallback) or True (no margin for cos θ_y ≤ 0, the code).
        margin_grad: 'true' or 'detached'.
    """

    name: ClassVar[str] = "magface"
    scale: float = hyperparameter(64.0, Interval(1.0, 256.0), doc="logit scale s")
    l_a: float = hyperparameter(10.0, Interval(0.01, 50.0), unit="norm",
                                doc="lower feature norm l_a")
    u_a: float = hyperparameter(110.0, Interval(60.0, 1000.0), unit="norm",
                                doc="upper feature norm u_a")
    l_m: float = hyperparameter(0.45, Interval(0.0, 1.2), unit="rad", doc="margin at l_a")
    u_m: float = hyperparameter(0.8, Interval(0.0, 1.2), unit="rad", doc="margin at u_a")
    lambda_g: float = hyperparameter(35.0, Interval(0.0, 1000.0), doc="regulariser weight λ_g")
    easy_margin: bool = hyperparameter(False, Choice((False, True)),
                                       doc="no margin where cos θ_y ≤ 0 (the code's default)")
    margin_grad: MarginGrad = margin_grad_field()

    def clamped_norm(self, target: Target) -> torch.Tensor:
        """ã = clamp(‖x‖, l_a, u_a)."""
        return target.embedding_norm.clamp(self.l_a, self.u_a)

    def adaptive_margin(self, norm: torch.Tensor) -> torch.Tensor:
        """m(ã) = l_m + (u_m − l_m)·(ã − l_a)/(u_a − l_a), radians."""
        return self.l_m + (self.u_m - self.l_m) * (norm - self.l_a) / (self.u_a - self.l_a)

    def psi(self, target: Target) -> torch.Tensor:
        cos, margin = target.logit, self.adaptive_margin(self.clamped_norm(target))
        if self.easy_margin:
            sin = torch.sqrt(1.0 - self.clamp_cos(cos) ** 2)
            shifted = cos * torch.cos(margin) - sin * torch.sin(margin)
            return self.scale * torch.where(cos > 0, shifted, cos)
        return self.scale * additive_angular(cos, margin, self.clamp_cos(cos))

    def regularizer(self, target: Target) -> torch.Tensor | None:
        if self.lambda_g == 0:
            return None
        norm = self.clamped_norm(target)
        return self.lambda_g * (norm / self.u_a**2 + 1.0 / norm)
