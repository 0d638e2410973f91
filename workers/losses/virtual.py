"""Virtual Softmax: one virtual negative class per sample."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from ._base import Choice, Interval, MarginLoss, Target, hyperparameter


@dataclass(frozen=True)
class VirtualSoftmax(MarginLoss):
    """Virtual Softmax: add the virtual class W_virt = ‖W_y‖·x/‖x‖ as one extra negative.

    Formula: unnormalised, P = W_y·x, N_j = W_j·x and the virtual logit v = ‖W_y‖·‖x‖ ≥ P;
    normalised (``normalized=True``), P = s·cos θ_y, N_j = s·cos θ_j and v = s.
    L = softplus(logaddexp(LSE_{j≠y}(N), v) − P) ≥ log 2. Used in training only.

    Paper: Chen et al., "Virtual Class Enhanced Discriminative Embedding Learning", NeurIPS
    2018, https://arxiv.org/abs/1811.12611.

    Hyperparameters:
        normalized: False (the paper) or True (features and centres on the sphere, scale s).
        scale: s, dimensionless, in [1, 256]; default 64; used only when normalized.
    """

    name: ClassVar[str] = "virtual"
    normalized: bool = hyperparameter(False, Choice((False, True)), doc="normalise x and W")
    scale: float = hyperparameter(64.0, Interval(1.0, 256.0), doc="logit scale s (normalised)")

    @property
    def normalize_embeddings(self) -> bool:  # type: ignore[override]
        return self.normalized

    @property
    def normalize_weights(self) -> bool:  # type: ignore[override]
        return self.normalized

    def scale_value(self) -> float:
        return self.scale if self.normalized else 1.0

    def psi(self, target: Target) -> torch.Tensor:
        return self.scale_value() * target.logit

    def virtual_logit(self, target: Target) -> torch.Tensor:
        if self.normalized:
            return torch.full_like(target.logit, self.scale)
        return target.weight_norm * target.embedding_norm
