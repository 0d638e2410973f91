"""ElasticFace: ArcFace / CosFace with a margin drawn per sample and per step."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch

from workers.seeding import row_normals

from ._base import (
    Batch,
    Choice,
    Interval,
    MarginGrad,
    MarginLoss,
    Target,
    hyperparameter,
    margin_grad_field,
)
from ._margins import additive_angular

#: the purpose tag of the margin draws: ``row_normals(MARGIN_DRAWS, seed, step, rows)``
MARGIN_DRAWS = "elasticface-margin"


def elastic_margins(loss: Any, batch: Batch) -> torch.Tensor:
    """The (B, 1) margins m_i = m + σ·n_i of the global batch, n_i ~ N(0, 1) a function of
    ``(seed, step, global row i)`` only; with ``plus`` the drawn margins are re-assigned in
    ascending order to the rows by descending cos θ_y. Without a seed (a Target outside a
    head or reference step) every m_i = m."""
    target = batch.target
    if batch.seed is None or loss.sigma == 0:
        noise = torch.zeros_like(target)
    else:
        draws = row_normals(MARGIN_DRAWS, batch.seed, batch.step, np.arange(len(target)))
        noise = torch.from_numpy(draws).to(device=target.device, dtype=target.dtype)
    margins = loss.margin + loss.sigma * noise
    if loss.plus:
        order = torch.argsort(target, descending=True, stable=True)
        margins = torch.empty_like(margins).index_put_((order,), torch.sort(margins).values)
    return margins.unsqueeze(1)


@dataclass(frozen=True)
class ElasticFaceArc(MarginLoss):
    """ElasticFace-Arc: ArcFace whose angular margin is drawn from N(m, σ) per sample and step.

    Formula: m_i = m + σ·n_i, n_i ~ N(0, 1) from (seed, step, global row i);
    P = s·cos(θ_y + m_i) for θ_y ≤ π − m_i, else s·(cos θ_y − m_i·sin m_i); N_j = s·cos θ_j;
    L = softplus(LSE_{j≠y}(N) − P). ``plus`` (ElasticFace+): the batch's drawn margins are
    sorted and handed out so the highest cos θ_y gets the smallest margin.

    Paper: Boutros et al., "ElasticFace: Elastic Margin Loss for Deep Face Recognition",
    CVPRW 2022, https://arxiv.org/abs/2109.09416; code fdbtrs/ElasticFace ``utils/losses.py``
    (σ = 0.05; "+" configs σ = 0.0175). Ours, where the code differs: ArcFace's monotone
    fallback past π − m_i (the code has none, so cos(θ + m_i) rises again there; with σ = 0
    this loss is exactly ArcFace); "+" follows the paper's rule — the code indexes the sorted
    margins with the cosines' sort order, applying that permutation instead of its inverse,
    which does not rank margins by cos θ_y; the draws come from ``row_normals`` (not the
    device RNG), so they agree on every rank however the batch is split.

    Hyperparameters:
        scale: s, dimensionless, in [1, 256]; default 64.
        margin: m, radians, in [0, 1.2]; default 0.5.
        sigma: σ, standard deviation of the margin, radians, in [0, 0.5]; default 0.05.
        plus: False (ElasticFace) or True (ElasticFace+).
        margin_grad: 'true' or 'detached'.
    """

    name: ClassVar[str] = "elasticface_arc"
    scale: float = hyperparameter(64.0, Interval(1.0, 256.0), doc="logit scale s")
    margin: float = hyperparameter(0.5, Interval(0.0, 1.2), unit="rad", doc="mean margin m")
    sigma: float = hyperparameter(0.05, Interval(0.0, 0.5), unit="rad", doc="margin std σ")
    plus: bool = hyperparameter(False, Choice((False, True)), doc="ElasticFace+ ordering")
    margin_grad: MarginGrad = margin_grad_field()

    def prepare(self, batch: Batch, state: Any) -> torch.Tensor:
        return elastic_margins(self, batch)

    def psi(self, target: Target) -> torch.Tensor:
        margins = self.context_for(target)[:, 0].to(target.logit.dtype)
        cos = target.logit
        return self.scale * additive_angular(cos, margins, self.clamp_cos(cos))


@dataclass(frozen=True)
class ElasticFaceCos(MarginLoss):
    """ElasticFace-Cos: CosFace whose cosine margin is drawn from N(m, σ) per sample and step.

    Formula: m_i = m + σ·n_i, n_i ~ N(0, 1) from (seed, step, global row i);
    P = s·(cos θ_y − m_i); N_j = s·cos θ_j; L = softplus(LSE_{j≠y}(N) − P). ``plus``
    (ElasticFace+): highest cos θ_y, smallest margin, as for ``elasticface_arc``.
    ``margin_grad`` does not apply: the margin shifts the logit by a constant.

    Paper: Boutros et al., ElasticFace, CVPRW 2022, https://arxiv.org/abs/2109.09416; code
    fdbtrs/ElasticFace ``utils/losses.py`` (σ = 0.05; "+" configs σ = 0.02). Ours: as for
    ``elasticface_arc`` ("+" by the paper's rule, draws from ``row_normals``).

    Hyperparameters:
        scale: s, dimensionless, in [1, 256]; default 64.
        margin: m, cosine units, in [0, 1]; default 0.35.
        sigma: σ, standard deviation of the margin, cosine units, in [0, 0.5]; default 0.05.
        plus: False (ElasticFace) or True (ElasticFace+).
    """

    name: ClassVar[str] = "elasticface_cos"
    scale: float = hyperparameter(64.0, Interval(1.0, 256.0), doc="logit scale s")
    margin: float = hyperparameter(0.35, Interval(0.0, 1.0), unit="cos", doc="mean margin m")
    sigma: float = hyperparameter(0.05, Interval(0.0, 0.5), unit="cos", doc="margin std σ")
    plus: bool = hyperparameter(False, Choice((False, True)), doc="ElasticFace+ ordering")

    def prepare(self, batch: Batch, state: Any) -> torch.Tensor:
        return elastic_margins(self, batch)

    def psi(self, target: Target) -> torch.Tensor:
        margins = self.context_for(target)[:, 0].to(target.logit.dtype)
        return self.scale * (target.logit - margins)
