"""SphereFace-R: the revived SphereFace with a real-valued margin and a fixed scale."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from ._base import Interval, MarginGrad, MarginLoss, Target, hyperparameter, margin_grad_field


@dataclass(frozen=True)
class SphereFaceR(MarginLoss):
    """SphereFace-R: multiplicative angular margin on the unit sphere with a fixed scale.

    Formula: ψ(θ) = (−1)^k·cos(m·θ) − 2k, k = ⌊m·θ/π⌋ (k from a detached θ), m real;
    P = s·ψ(θ_y), N_j = s·cos θ_j, L = softplus(LSE_{j≠y}(N) − P). θ = arccos(c) with c
    clamped to [−1 + ε, 1 − ε].

    Paper: Liu et al., "SphereFace Revived: Unifying Hyperspherical Face Recognition", TPAMI
    2022, https://arxiv.org/abs/2109.05565 (code: opensphere).

    Hyperparameters:
        scale: s, dimensionless, in [1, 256]; default 30.
        margin: m, multiplicative angular margin (dimensionless, real), in [1, 3]; default 1.7.
        margin_grad: 'true' or 'detached'.
    """

    name: ClassVar[str] = "sphereface_r"
    scale: float = hyperparameter(30.0, Interval(1.0, 256.0), doc="logit scale s")
    margin: float = hyperparameter(1.7, Interval(1.0, 3.0), doc="multiplicative margin m")
    margin_grad: MarginGrad = margin_grad_field()

    def psi(self, target: Target) -> torch.Tensor:
        theta = torch.acos(self.clamp_cos(target.logit))
        k = torch.floor(self.margin * theta.detach() / math.pi)
        psi = (1.0 - 2.0 * torch.remainder(k, 2.0)) * torch.cos(self.margin * theta) - 2.0 * k
        return self.scale * psi
