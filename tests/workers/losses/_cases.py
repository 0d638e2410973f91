"""Shared test material: hyperparameter settings per loss and batches with chosen angles."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import pytest
import torch

from workers.losses import MarginLoss, Target

# Small shapes for gradcheck (STYLE item 6): B = 4, C = 7, D = 5.
LABELS = (0, 3, 6, 2)
NUM_CLASSES = 7
DIM = 5
# cos θ_y per sample. θ = 0.64, 1.27, 1.98, 2.94 rad: away from ±1 (the clamps), the last one
# past ArcFace's switch π − m (m ≤ 0.5) and past Combined's θ_b for the settings below;
# m·θ/π for SphereFace m = 2, 3, 4 and SphereFace-R m = 1.35, 1.7 stays ≥ 0.07 from an integer.
TARGET_COS = (0.8, 0.3, -0.4, -0.98)


@dataclass(frozen=True)
class Case:
    """One loss with one hyperparameter setting (and a step, for SphereFace's schedule)."""

    name: str
    hyperparameters: dict[str, Any]
    step: int = 0
    #: whether the reference's finite differences match its analytical gradient
    gradcheck: bool = True

    @property
    def id(self) -> str:
        parts = [f"{k}={v}" for k, v in self.hyperparameters.items()]
        if self.step:
            parts.append(f"step={self.step}")
        return "-".join([self.name, *parts])

    @property
    def margin_grad(self) -> str:
        return self.hyperparameters.get("margin_grad", "true")


_DETACHED = {"margin_grad": "detached"}

# Scales stay small (4–8) so that finite differences stay well conditioned.
CASES: tuple[Case, ...] = (
    Case("softmax", {}),
    Case("normface", {"scale": 8.0}),
    Case("normface", {"scale": 4.0}),
    Case("sphereface", {}),
    Case("sphereface", {}, step=100),
    Case("sphereface", {}, step=1700),
    Case("sphereface", {"margin": 2, "lambda_min": 0.0, "lambda_base": 0.0}),
    Case("sphereface", {"margin": 3, "lambda_min": 1.0, "lambda_gamma": 0.5,
                        "lambda_power": 2.0}, step=7),
    Case("sphereface", {"lambda_min": 2.0, **_DETACHED}, step=10_000),
    Case("sphereface_r", {"scale": 8.0}),
    Case("sphereface_r", {"scale": 6.0, "margin": 1.35}),
    Case("sphereface_r", {"scale": 8.0, **_DETACHED}),
    Case("cosface", {"scale": 8.0}),
    Case("cosface", {"scale": 4.0, "margin": 0.5}),
    Case("cosface", {"scale": 8.0, **_DETACHED}),
    Case("arcface", {"scale": 8.0}),
    Case("arcface", {"scale": 6.0, "margin": 0.3}),
    Case("arcface", {"scale": 8.0, **_DETACHED}),
    Case("combined", {"scale": 8.0}),
    Case("combined", {"scale": 8.0, "m1": 1.15, "m2": 0.1, "m3": 0.1}),
    Case("combined", {"scale": 6.0, "m1": 0.9, "m2": 0.4, "m3": 0.35}),
    Case("combined", {"scale": 8.0, **_DETACHED}),
    Case("dsoftmax", {"scale": 8.0}),
    Case("dsoftmax", {"scale": 4.0, "d": 0.5, "w_intra": 0.5, "w_inter": 2.0}),
    Case("dsoftmax", {"scale": 8.0, "w_intra": 0.0}),
    Case("sosoftmax", {"scale": 8.0}),
    Case("sosoftmax", {"scale": 6.0, "lambda_p": 1.0, "lambda_n": 0.3, "goal_n": -0.2}),
    Case("sosoftmax", {"scale": 8.0, "lambda_p": 2.0, "lambda_n": 2.0, **_DETACHED}),
    Case("virtual", {}),
    Case("virtual", {"normalized": True, "scale": 8.0}),
    # the modern zoo; ``gradcheck=False`` where the forward depends on detached batch
    # statistics of the inputs themselves (t, μ, σ, ẑ): finite differences see them move,
    # the (correct, stop-gradient) analytical gradient does not — test_zoo.py gradchecks
    # those with the context held fixed
    Case("curricularface", {"scale": 8.0, "t_alpha": 0.0}),
    Case("curricularface", {"scale": 8.0}, gradcheck=False),
    Case("curricularface", {"scale": 6.0, "margin": 0.3, **_DETACHED}, gradcheck=False),
    Case("magface", {"scale": 8.0}),
    Case("magface", {"scale": 8.0, "l_a": 0.5, "u_a": 60.0, "l_m": 0.3, "u_m": 0.9,
                     "lambda_g": 2.0}),
    Case("magface", {"scale": 8.0, "l_a": 0.5, "u_a": 60.0, "easy_margin": True}),
    Case("magface", {"scale": 8.0, "l_a": 0.5, "u_a": 60.0, **_DETACHED}),
    Case("adaface", {"scale": 8.0, "h": 0.0}),
    Case("adaface", {"scale": 8.0}, gradcheck=False),
    Case("adaface", {"scale": 6.0, "margin": 0.5, "h": 1.0, "t_alpha": 1.0}, gradcheck=False),
    Case("elasticface_arc", {"scale": 8.0}, step=3),
    Case("elasticface_arc", {"scale": 8.0, "sigma": 0.1, "plus": True}, step=5),
    Case("elasticface_arc", {"scale": 8.0, **_DETACHED}, step=3),
    Case("elasticface_cos", {"scale": 8.0}, step=3),
    Case("elasticface_cos", {"scale": 8.0, "sigma": 0.1, "plus": True}, step=7),
    Case("subcenter_arcface", {"scale": 8.0}),
    Case("subcenter_arcface", {"scale": 6.0, "margin": 0.3, "subcenters": 2}),
    Case("subcenter_arcface", {"scale": 8.0, "subcenters": 1}),
    Case("subcenter_arcface", {"scale": 8.0, **_DETACHED}),
    Case("uniface", {"scale": 8.0}),
    Case("uniface", {"scale": 6.0, "margin": 0.2, "lambda_n": 0.5}),
)


def case_params(cases: tuple[Case, ...] = CASES) -> list[Any]:
    return [pytest.param(case, id=case.id) for case in cases]


def _unit(v: torch.Tensor) -> torch.Tensor:
    return v / torch.sqrt((v * v).sum())


def make_batch(
    target_cos: tuple[float, ...] = TARGET_COS,
    labels: tuple[int, ...] = LABELS,
    *,
    num_classes: int = NUM_CLASSES,
    dim: int = DIM,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Embeddings whose cosine to their own class centre is exactly ``target_cos[i]``.

    Centres and embeddings get random norms in [0.7, 2.5] (the unnormalised losses see them);
    the other cosines are random. Built in float64, then cast to ``dtype``.
    """
    gen = torch.Generator().manual_seed(seed)
    weights = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    weights = torch.stack([_unit(w) for w in weights])
    weights = weights * (0.7 + 1.8 * torch.rand(num_classes, 1, generator=gen, dtype=torch.float64))
    rows = []
    for c, y in zip(target_cos, labels, strict=True):
        w = _unit(weights[y])
        u = torch.randn(dim, generator=gen, dtype=torch.float64)
        u = _unit(u - (u * w).sum() * w)
        norm = 0.7 + 1.8 * float(torch.rand((), generator=gen, dtype=torch.float64))
        rows.append(norm * (c * w + math.sqrt(1.0 - c * c) * u))
    embeddings = torch.stack(rows)
    return embeddings.to(dtype), weights.to(dtype), torch.tensor(labels)


def expand_centres(loss: MarginLoss, weights: torch.Tensor, *, seed: int = 0) -> torch.Tensor:
    """Centres for ``loss``: ``weights`` (C, D) itself, or for K sub-centres a (C, K·D) matrix
    whose sub-centre 0 of each class is ``weights``' row and the others random rows of the
    same norm (so a batch built around ``weights`` keeps its chosen target angles as a
    lower bound, and cos θ_y = 1 where an embedding equals its centre)."""
    k = int(loss.subcenters)
    if k == 1:
        return weights
    gen = torch.Generator().manual_seed(seed + 1000)
    others = torch.randn(weights.shape[0], k - 1, weights.shape[1], generator=gen,
                         dtype=torch.float64).to(weights.dtype)
    others = others / others.norm(dim=2, keepdim=True) * weights.norm(dim=1)[:, None, None]
    return torch.cat([weights.unsqueeze(1), others], dim=1).flatten(1).detach()


def random_batch(
    batch: int, num_classes: int, dim: int, *, seed: int, dtype: torch.dtype = torch.float64
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Plain Gaussian embeddings and centres with random labels."""
    gen = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(batch, dim, generator=gen, dtype=torch.float64)
    weights = torch.randn(num_classes, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, num_classes, (batch,), generator=gen)
    return embeddings.to(dtype), weights.to(dtype), labels


# --- target logits on a dense grid of angles ------------------------------------------------

THETA = torch.linspace(0.0, math.pi, 20_001, dtype=torch.float64)


def grid_target(loss: MarginLoss, theta: torch.Tensor = THETA, *, step: int = 0,
                embedding_norm: float = 1.7, weight_norm: float = 0.6) -> Target:
    """A ``Target`` for cos θ on a grid, raw logit scaled the way the loss's head would."""
    logit = torch.cos(theta)
    if not loss.normalize_embeddings:
        logit = logit * embedding_norm
    if not loss.normalize_weights:
        logit = logit * weight_norm
    return Target(logit=logit, embedding_norm=torch.full_like(theta, embedding_norm),
                  weight_norm=torch.full_like(theta, weight_norm), step=step)


def assert_non_increasing(values: torch.Tensor, what: str, theta: torch.Tensor = THETA) -> None:
    """``values`` (on the grid ``theta``) never rise by more than float64 rounding."""
    rises = torch.diff(values)
    worst = int(rises.argmax())
    assert float(rises.max()) <= 1e-12, (
        f"{what}: rises by {float(rises.max()):.3g} at θ = {float(theta[worst]):.6f}")
