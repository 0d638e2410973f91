"""Margin maps several losses share (ArcFace's additive angular margin, per row or not)."""

from __future__ import annotations

import math

import torch


def additive_angular(cos: torch.Tensor, margin: float | torch.Tensor,
                     clamped: torch.Tensor) -> torch.Tensor:
    """``cos(θ + m)`` while ``θ ≤ π − m``, past it ArcFace's monotone fallback ``cos θ − m·sin m``.

    ``cos(θ + m) = c·cos m − √(1 − c²)·sin m`` with the root taken of ``clamped`` (the cosine
    clamped to ``[−1 + ε, 1 − ε]``, finite gradient at ±1). ``margin`` is a float (radians) or
    a per-row tensor of margins broadcasting against ``cos``. For a float this is exactly
    ``ArcFace.psi / s``.
    """
    sin = torch.sqrt(1.0 - clamped**2)
    if isinstance(margin, torch.Tensor):
        cos_m, sin_m = torch.cos(margin), torch.sin(margin)
        switch = torch.cos(math.pi - margin)
    else:
        cos_m, sin_m, switch = math.cos(margin), math.sin(margin), math.cos(math.pi - margin)
    shifted = cos * cos_m - sin * sin_m
    fallback = cos - margin * sin_m
    return torch.where(cos >= switch, shifted, fallback)
