"""Plain softmax cross-entropy over unnormalised logits."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ._base import MarginLoss, Target


@dataclass(frozen=True)
class Softmax(MarginLoss):
    """Softmax cross-entropy on raw inner products (no bias, as in face-recognition heads).

    Formula: L = softplus(LSE_{j≠y}(W_j·x) − W_y·x), i.e. −log(e^{W_y·x} / Σ_j e^{W_j·x}).

    Paper: the classical multinomial logistic regression; the baseline of every table in
    https://arxiv.org/abs/1801.07698. No hyperparameters.
    """

    name: ClassVar[str] = "softmax"
    normalize_embeddings: ClassVar[bool] = False
    normalize_weights: ClassVar[bool] = False

    def psi(self, target: Target) -> torch.Tensor:
        return target.logit

    def margin_free_positive(self, target: Target) -> torch.Tensor:
        return target.logit
