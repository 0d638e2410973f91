"""D-Softmax: the dissected softmax with independent intra- and inter-class terms."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ._base import Interval, MarginLoss, Target, hyperparameter, softplus


@dataclass(frozen=True)
class DSoftmax(MarginLoss):
    """D-Softmax: intra-class and inter-class objectives as two separate terms.

    Formula: L = w_intra·softplus(s·(d − cos θ_y)) + w_inter·softplus(LSE_{k≠y}(s·cos θ_k)).
    The intra term stops pulling once cos θ_y passes d, whatever the negatives; the inter term
    does not depend on cos θ_y. ε = e^{s·d} in the paper's notation (ours: the reference
    implementations disagree); the weights w_intra, w_inter are ours. The paper's fast variants
    are this loss under the head's ``sampling='batch'`` or ``sample_ratio < 1``.
    ``margin_grad`` does not apply: d is a threshold of its own term, not a logit correction.

    Paper: He et al., "Softmax Dissection: Towards Understanding Intra- and Inter-class
    Objective for Embedding Learning", AAAI 2020, https://arxiv.org/abs/1908.01281.

    Hyperparameters:
        scale: s, dimensionless, in [1, 256]; default 64.
        d: intra-class target cosine (dimensionless), in [0, 1]; default 0.9.
        w_intra: weight of the intra-class term, in [0, 100]; default 1.
        w_inter: weight of the inter-class term, in [0, 100]; default 1 (not both zero).
    """

    name: ClassVar[str] = "dsoftmax"
    scale: float = hyperparameter(64.0, Interval(1.0, 256.0), doc="logit scale s")
    d: float = hyperparameter(0.9, Interval(0.0, 1.0), unit="cos", doc="intra-class target")
    w_intra: float = hyperparameter(1.0, Interval(0.0, 100.0), doc="intra-class weight")
    w_inter: float = hyperparameter(1.0, Interval(0.0, 100.0), doc="inter-class weight")

    def _check_consistency(self) -> None:
        if self.w_intra == 0 and self.w_inter == 0:
            raise ValueError("dsoftmax.w_intra = 0 and dsoftmax.w_inter = 0: at least one "
                             "weight must be in (0, 100]")

    def psi(self, target: Target) -> torch.Tensor:
        return self.scale * target.logit

    def combine(self, positive: torch.Tensor, lse_negative: torch.Tensor) -> torch.Tensor:
        intra = softplus(self.scale * self.d - positive)
        inter = softplus(lse_negative)
        return self.w_intra * intra + self.w_inter * inter

