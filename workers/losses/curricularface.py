"""CurricularFace: ArcFace's positive, hard negatives re-weighted by an adaptive curriculum t."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ._base import (
    Batch,
    Interval,
    MarginGrad,
    MarginLoss,
    Target,
    hyperparameter,
    margin_grad_field,
)
from ._margins import additive_angular


@dataclass(frozen=True)
class CurricularFace(MarginLoss):
    """CurricularFace: easy negatives as in ArcFace, hard ones scaled up as training matures.

    Formula: P = s·cos(θ_y + m) for θ_y ≤ π − m, else s·(cos θ_y − m·sin m) (ArcFace);
    N_j = s·cos θ_j if cos θ_j ≤ cos(θ_y + m) (easy), s·cos θ_j·(t + cos θ_j) if
    cos θ_j > cos(θ_y + m) (hard); L = softplus(LSE_{j≠y}(N) − P). The hard mask uses
    cos(θ_y + m) without the fallback and carries no gradient. t is a state:
    t ← α·mean_batch(cos θ_y) + (1 − α)·t, t₀ = 0, updated before use, no gradient.

    Paper: Huang et al., "CurricularFace: Adaptive Curriculum Learning Loss for Deep Face
    Recognition", CVPR 2020, https://arxiv.org/abs/2004.00288; code HuangYG123/CurricularFace
    ``head/metrics.py``. Ours: the mean that updates t is over the *global* batch (every rank
    of the sharded head holds the same t; the authors' code averages the batch it sees); t is
    updated only in training mode.

    Hyperparameters:
        scale: s, dimensionless, in [1, 256]; default 64.
        margin: m, radians, in [0, 1.2]; default 0.5.
        t_alpha: α, the EMA weight of the batch mean (dimensionless), in [0, 1]; default 0.01
            (0 pins t at its current value).
        margin_grad: 'true' or 'detached'.
    """

    name: ClassVar[str] = "curricularface"
    context_in_phi: ClassVar[bool] = True
    scale: float = hyperparameter(64.0, Interval(1.0, 256.0), doc="logit scale s")
    margin: float = hyperparameter(0.5, Interval(0.0, 1.2), unit="rad", doc="angular margin m")
    t_alpha: float = hyperparameter(0.01, Interval(0.0, 1.0), doc="EMA weight α of t")
    margin_grad: MarginGrad = margin_grad_field()

    def initial_state(self, num_classes: int, sample_ratio: float) -> dict[str, float]:
        return {"t": 0.0}

    @torch.no_grad()
    def prepare(self, batch: Batch, state: Any) -> torch.Tensor:
        """Update t from the batch; context ``[cos(θ_y + m) (no fallback), t]`` per row."""
        cos = batch.target
        if batch.update:
            state.t.copy_(self.t_alpha * cos.mean() + (1.0 - self.t_alpha) * state.t)
        sin = torch.sqrt(1.0 - cos.clamp(-1.0, 1.0) ** 2)
        threshold = cos * math.cos(self.margin) - sin * math.sin(self.margin)
        return torch.stack([threshold, state.t.to(cos.dtype).expand_as(cos)], dim=1)

    def psi(self, target: Target) -> torch.Tensor:
        cos = target.logit
        return self.scale * additive_angular(cos, self.margin, self.clamp_cos(cos))

    def phi(self, logits: torch.Tensor, context: torch.Tensor | None = None) -> torch.Tensor:
        if context is None:
            raise ValueError("curricularface.phi needs the per-row context of prepare()")
        threshold, t = context[:, :1].to(logits.dtype), context[:, 1:].to(logits.dtype)
        return self.scale * torch.where(logits > threshold, logits * (t + logits), logits)
