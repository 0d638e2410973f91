"""NormFace: cross-entropy over scaled cosines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ._base import Interval, MarginLoss, Target, hyperparameter


@dataclass(frozen=True)
class NormFace(MarginLoss):
    """NormFace (normalised softmax): features and class centres on the unit sphere.

    Formula: L = softplus(LSE_{j≠y}(s·cos θ_j) − s·cos θ_y).

    Paper: Wang et al., "NormFace: L2 Hypersphere Embedding for Face Verification", 2017,
    https://arxiv.org/abs/1704.06369 (there s is learnable; here it is a fixed knob).

    Hyperparameters:
        scale: s, dimensionless logit scale, in [1, 256]; default 64.
    """

    name: ClassVar[str] = "normface"
    scale: float = hyperparameter(64.0, Interval(1.0, 256.0), doc="logit scale s")

    def psi(self, target: Target) -> torch.Tensor:
        return self.scale * target.logit
