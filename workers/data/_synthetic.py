"""Synthetic identities: small grayscale images of K identities with shared nuisance factors.

Image of sample n of identity k (all fields on an ``S × S`` grid, ``d`` = difficulty):

    x = c·A(B + a·I_k + 0.55·d·E_n) + b + g·⟨u, p⟩ + σ·ε,   ε ~ N(0, 1) per pixel

- ``B``: a base pattern shared by every identity (the "mean face"), a smooth random field;
- ``I_k``: the identity prototype, a smooth random field of unit std, scaled by ``a = 0.8``;
- ``E_n``: a per-sample smooth field (expression-like variation inside the identity);
- ``A``: an affine warp (rotation ±16.5°·d, log-scale ±0.11·d, shift ±2.2 px·d per axis);
- ``c = exp(0.275·d·N)``, ``b = 0.33·d·N``: contrast and brightness; ``g·⟨u, p⟩``: a lighting
  gradient of strength ``g = 0.44·d·N`` along a random unit direction ``u`` over pixel
  coordinates ``p ∈ [−1, 1]²``; ``σ = 0.275·d``: pixel noise.

The nuisance factors (``E``, ``A``, ``c``, ``b``, ``g``, ``ε``) follow the same law for every
identity. Train and held-out identities come from the same generator with different identity
seeds; everything is a deterministic function of ``(seed, role)`` and fully vectorised.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from workers.seeding import derive_seed

from ._dataset import TensorDataset

_ROLES = {"train": 0, "heldout": 1}
_IDENTITY_AMPLITUDE = 0.8


def _generator(purpose: str, *values: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(purpose, *values))


def _smooth_fields(count: int, size: int, cells: int, generator: torch.Generator) -> torch.Tensor:
    """``count`` smooth random fields ``(count, 1, size, size)``: a ``cells × cells`` Gaussian
    grid upsampled bicubically, each standardised to zero mean and unit std."""
    coarse = torch.randn(count, 1, cells, cells, generator=generator)
    fields = F.interpolate(coarse, size=(size, size), mode="bicubic", align_corners=False)
    fields = fields - fields.mean(dim=(2, 3), keepdim=True)
    return fields / fields.std(dim=(2, 3), keepdim=True).clamp_min(1e-6)


def _affine_warp(images: torch.Tensor, difficulty: float,
                 generator: torch.Generator) -> torch.Tensor:
    """Rotate, scale and shift each image by its own random affine map (bilinear, border)."""
    count, _, size, _ = images.shape
    angle = (torch.rand(count, generator=generator) * 2 - 1) * math.radians(16.5) * difficulty
    scale = torch.exp((torch.rand(count, generator=generator) * 2 - 1) * 0.11 * difficulty)
    shift = (torch.rand(count, 2, generator=generator) * 2 - 1) * (2.2 / (size / 2)) * difficulty
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1),
                         torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border",
                         align_corners=False)


def _photometric(images: torch.Tensor, difficulty: float,
                 generator: torch.Generator) -> torch.Tensor:
    """Contrast, brightness and a linear lighting gradient per image, plus pixel noise."""
    count, _, size, _ = images.shape
    contrast = torch.exp(0.275 * difficulty * torch.randn(count, 1, 1, 1, generator=generator))
    brightness = 0.33 * difficulty * torch.randn(count, 1, 1, 1, generator=generator)
    direction = torch.rand(count, generator=generator) * 2 * math.pi
    strength = 0.44 * difficulty * torch.randn(count, generator=generator)
    coords = torch.linspace(-1.0, 1.0, size)
    gradient = (torch.cos(direction).view(-1, 1, 1) * coords.view(1, 1, -1)
                + torch.sin(direction).view(-1, 1, 1) * coords.view(1, -1, 1))
    noise = 0.275 * difficulty * torch.randn(images.shape, generator=generator)
    return contrast * images + brightness + (strength.view(-1, 1, 1) * gradient).unsqueeze(1) \
        + noise


def synthetic_identities(num_identities: int, samples_per_identity: int, *,
                         difficulty: float = 1.0, image_size: int = 32, seed: int = 0,
                         role: str = "train", flip: bool = False) -> TensorDataset:
    """``num_identities × samples_per_identity`` images ``(1, S, S)``, labels ``0..K−1``.

    ``role`` (``'train'`` or ``'heldout'``) selects the identity seeds: the two roles share
    the base pattern and the nuisance law but never an identity.
    """
    if role not in _ROLES:
        raise ValueError(f"role = {role!r} must be one of {sorted(_ROLES)}")
    if num_identities < 1 or samples_per_identity < 1:
        raise ValueError(f"num_identities = {num_identities} and samples_per_identity = "
                         f"{samples_per_identity} must be ≥ 1")
    if difficulty < 0:
        raise ValueError(f"difficulty = {difficulty} must be ≥ 0")
    base = _smooth_fields(1, image_size, 4, _generator("synthetic-base", seed))
    identities = _generator("synthetic-identities", seed, _ROLES[role])
    nuisance = _generator("synthetic-nuisance", seed, _ROLES[role])
    prototypes = base + _IDENTITY_AMPLITUDE * _smooth_fields(num_identities, image_size, 6,
                                                             identities)
    labels = torch.arange(num_identities).repeat_interleave(samples_per_identity)
    expression = _smooth_fields(len(labels), image_size, 6, nuisance)
    images = prototypes[labels] + 0.55 * difficulty * expression
    images = _photometric(_affine_warp(images, difficulty, nuisance), difficulty, nuisance)
    return TensorDataset(images.contiguous(), labels, flip)
