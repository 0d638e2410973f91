"""Sub-center ArcFace: K centres per class, the closest one counts."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ._base import Interval, MarginGrad, MarginLoss, Target, hyperparameter, margin_grad_field
from ._margins import additive_angular


@dataclass(frozen=True)
class SubcenterArcFace(MarginLoss):
    """Sub-center ArcFace: every class holds K sub-centres; a sample is compared with the
    closest sub-centre of each class, so noisy samples can gather around a non-dominant one.

    Formula: cos θ_j = max_k cos(x, W_{j,k}) for every class j (its gradient reaches the
    arg-max sub-centre only); then ArcFace: P = s·cos(θ_y + m) for θ_y ≤ π − m, else
    s·(cos θ_y − m·sin m); N_j = s·cos θ_j; L = softplus(LSE_{j≠y}(N) − P). K = 1 is ArcFace.
    The head holds the K rows of a class side by side (a C × K·D matrix), samples by class (a
    sampled class brings all its K rows) and takes the max over K inside its chunk pass.

    Paper: Deng et al., "Sub-center ArcFace: Boosting Face Recognition by Large-scale Noisy
    Web Faces", ECCV 2020,
    https://www.ecva.net/papers/eccv_2020/papers_ECCV/papers/123560715.pdf
    — code deepinsight/insightface ``recognition/SubCenter-ArcFace`` (max over the K cosines,
    K = 3). Ours: the dominant-sub-centre pruning step of the paper is not part of the loss.

    Hyperparameters:
        scale: s, dimensionless, in [1, 256]; default 64.
        margin: m, radians, in [0, 1.2]; default 0.5.
        subcenters: K, sub-centres per class (integer), in {1, …, 16}; default 3.
        margin_grad: 'true' or 'detached'.
    """

    name: ClassVar[str] = "subcenter_arcface"
    scale: float = hyperparameter(64.0, Interval(1.0, 256.0), doc="logit scale s")
    margin: float = hyperparameter(0.5, Interval(0.0, 1.2), unit="rad", doc="angular margin m")
    subcenters: int = hyperparameter(3, Interval(1, 16, integer=True),  # type: ignore[misc]
                                     doc="sub-centres per class K")
    margin_grad: MarginGrad = margin_grad_field()

    def psi(self, target: Target) -> torch.Tensor:
        cos = target.logit
        return self.scale * additive_angular(cos, self.margin, self.clamp_cos(cos))
