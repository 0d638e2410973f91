"""SO-softmax: quadratic, goal-based transforms of the positive and negative cosines."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ._base import Interval, MarginGrad, MarginLoss, Target, hyperparameter, margin_grad_field


@dataclass(frozen=True)
class SOSoftmax(MarginLoss):
    """SO-softmax: the positive cosine is pushed towards its goal 1, negatives above a goal g_n.

    Formula: (ours) P = s·(c_y − λ_p·(1 − c_y)²), N_j = s·(c_j + λ_n·max(0, c_j − g_n)²),
    L = softplus(LSE_{j≠y}(N) − P). Only the paper's abstract was available, which describes a
    generalised softmax whose positive and negative cosines pass through quadratic, goal-based
    transforms; this form is marginlab's reading of it: it reduces to NormFace at
    λ_p = λ_n = 0, ψ and φ stay monotone for every λ ≥ 0, and the push grows with the distance
    to the goal.

    Paper: "SO-softmax loss for discriminable embedding learning", Pattern Recognition 131,
    2022, https://doi.org/10.1016/j.patcog.2022.108877.

    Hyperparameters:
        scale: s, dimensionless, in [1, 256]; default 64.
        lambda_p: positive curvature λ_p, dimensionless, in [0, 2]; default 0.5.
        lambda_n: negative curvature λ_n, dimensionless, in [0, 2]; default 0.5.
        goal_n: negative goal g_n (cosine units), in [−1, 1]; default 0.1.
        margin_grad: 'true' or 'detached' (applies to the positive transform).
    """

    name: ClassVar[str] = "sosoftmax"
    scale: float = hyperparameter(64.0, Interval(1.0, 256.0), doc="logit scale s")
    lambda_p: float = hyperparameter(0.5, Interval(0.0, 2.0), doc="positive curvature λ_p")
    lambda_n: float = hyperparameter(0.5, Interval(0.0, 2.0), doc="negative curvature λ_n")
    goal_n: float = hyperparameter(0.1, Interval(-1.0, 1.0), unit="cos", doc="negative goal g_n")
    margin_grad: MarginGrad = margin_grad_field()

    def psi(self, target: Target) -> torch.Tensor:
        cos = target.logit
        return self.scale * (cos - self.lambda_p * (1.0 - cos) ** 2)

    def phi(self, logits: torch.Tensor) -> torch.Tensor:
        excess = (logits - self.goal_n).clamp_min(0.0)
        return self.scale * (logits + self.lambda_n * excess**2)
