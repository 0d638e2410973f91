"""CosFace: additive cosine margin."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ._base import Interval, MarginGrad, MarginLoss, Target, hyperparameter, margin_grad_field


@dataclass(frozen=True)
class CosFace(MarginLoss):
    """CosFace / AM-Softmax: subtract a margin from the target cosine.

    Formula: P = s·(cos θ_y − m), N_j = s·cos θ_j, L = softplus(LSE_{j≠y}(N) − P).

    Paper: Wang et al., "CosFace: Large Margin Cosine Loss for Deep Face Recognition", CVPR
    2018, https://arxiv.org/abs/1801.09414.

    Hyperparameters:
        scale: s, dimensionless, in [1, 256]; default 64.
        margin: m, in cosine units (dimensionless), in [0, 1]; default 0.35.
        margin_grad: 'true' or 'detached' (see ``MarginLoss.positive_logit``).
    """

    name: ClassVar[str] = "cosface"
    scale: float = hyperparameter(64.0, Interval(1.0, 256.0), doc="logit scale s")
    margin: float = hyperparameter(0.35, Interval(0.0, 1.0), unit="cos", doc="cosine margin m")
    margin_grad: MarginGrad = margin_grad_field()

    def psi(self, target: Target) -> torch.Tensor:
        return self.scale * (target.logit - self.margin)
