"""Independent, naive implementations of every loss, written from ``/work/shared/LOSSES.md``.

Nothing here imports ``workers.losses``: no ψ/φ/combine hook, no ``reference_loss``, no
``F.normalize``. Every loss is a per-sample loop over plain tensor arithmetic with the full set
of logits materialised, the margin written the way the table writes it (``arccos`` and
``cos(θ + m)`` rather than the library's expansions, ``cos(m·θ)`` rather than Chebyshev), and
branches taken in Python on the sample's angle. It is slow and only meant for float64 parity
on small batches.

``naive_loss(name, hyperparameters, embeddings, weights, labels, step=, classes=,
reduction=)`` mirrors ``reference_loss``; ``hyperparameters`` must name every field (pass
``loss.hyperparameter_values()``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch

Tensor = torch.Tensor


def _norm(a: Tensor) -> Tensor:
    return torch.sqrt((a * a).sum())


def _dot(a: Tensor, b: Tensor) -> Tensor:
    return (a * b).sum()


def _cos(a: Tensor, b: Tensor) -> Tensor:
    return _dot(a, b) / (_norm(a) * _norm(b))


def _logsumexp(values: Sequence[Tensor]) -> Tensor:
    stacked = torch.stack(list(values))
    top = stacked.max().detach()
    return top + torch.log(torch.exp(stacked - top).sum())


def _softplus(z: Tensor) -> Tensor:
    """log(1 + e^z), written so that neither branch overflows."""
    if z.item() > 0:
        return z + torch.log(1.0 + torch.exp(-z))
    return torch.log(1.0 + torch.exp(z))


def _cross_entropy(positive: Tensor, negatives: Sequence[Tensor]) -> Tensor:
    """−log(e^P / (e^P + Σ_j e^{N_j})): the plain softmax cross-entropy of the target."""
    return _logsumexp([positive, *negatives]) - positive


def _margin_policy(with_margin: Tensor, margin_free: Tensor, margin_grad: str) -> Tensor:
    """``true``: the margin's own gradient; ``detached``: value with margin, margin-free grad."""
    if margin_grad == "detached":
        return margin_free + (with_margin - margin_free).detach()
    if margin_grad != "true":
        raise ValueError(margin_grad)
    return with_margin


# --- one function per loss: (x, W, y, negatives, hyperparameters, step) -> scalar loss ---------

def softmax(x: Tensor, W: Tensor, y: int, neg: list[int], hp: dict, step: int) -> Tensor:
    return _cross_entropy(_dot(W[y], x), [_dot(W[j], x) for j in neg])


def normface(x: Tensor, W: Tensor, y: int, neg: list[int], hp: dict, step: int) -> Tensor:
    s = hp["scale"]
    return _cross_entropy(s * _cos(x, W[y]), [s * _cos(x, W[j]) for j in neg])


def cosface(x: Tensor, W: Tensor, y: int, neg: list[int], hp: dict, step: int) -> Tensor:
    s, m = hp["scale"], hp["margin"]
    c = _cos(x, W[y])
    positive = _margin_policy(s * (c - m), s * c, hp["margin_grad"])
    return _cross_entropy(positive, [s * _cos(x, W[j]) for j in neg])


def arcface(x: Tensor, W: Tensor, y: int, neg: list[int], hp: dict, step: int) -> Tensor:
    s, m = hp["scale"], hp["margin"]
    c = _cos(x, W[y])
    theta = torch.acos(c)
    if theta.item() <= math.pi - m:
        target = torch.cos(theta + m)
    else:  # the monotone fallback of LOSSES.md
        target = c - m * math.sin(m)
    positive = _margin_policy(s * target, s * c, hp["margin_grad"])
    return _cross_entropy(positive, [s * _cos(x, W[j]) for j in neg])


def _sphere_psi(theta: Tensor, m: float) -> Tensor:
    """(−1)^k·cos(m·θ) − 2k with k = ⌊m·θ/π⌋ taken from the value of θ."""
    k = math.floor(m * theta.item() / math.pi)
    return (-1.0) ** k * torch.cos(m * theta) - 2.0 * k


def sphereface_lambda(hp: dict, step: int) -> float:
    """λ = max(λ_min, λ_base·(1 + γ·step)^(−power)), the wy1iu/sphereface schedule."""
    annealed = hp["lambda_base"] * (1.0 + hp["lambda_gamma"] * step) ** (-hp["lambda_power"])
    return max(hp["lambda_min"], annealed)


def sphereface(x: Tensor, W: Tensor, y: int, neg: list[int], hp: dict, step: int) -> Tensor:
    norm = _norm(x)
    c = _cos(x, W[y])
    lam = sphereface_lambda(hp, step)
    psi = _sphere_psi(torch.acos(c), hp["margin"])
    positive = _margin_policy(norm * (lam * c + psi) / (1.0 + lam), norm * c, hp["margin_grad"])
    return _cross_entropy(positive, [norm * _cos(x, W[j]) for j in neg])


def sphereface_r(x: Tensor, W: Tensor, y: int, neg: list[int], hp: dict, step: int) -> Tensor:
    s = hp["scale"]
    c = _cos(x, W[y])
    positive = _margin_policy(s * _sphere_psi(torch.acos(c), hp["margin"]), s * c,
                              hp["margin_grad"])
    return _cross_entropy(positive, [s * _cos(x, W[j]) for j in neg])


def combined(x: Tensor, W: Tensor, y: int, neg: list[int], hp: dict, step: int) -> Tensor:
    s, m1, m2, m3 = hp["scale"], hp["m1"], hp["m2"], hp["m3"]
    c = _cos(x, W[y])
    theta = torch.acos(c)
    if m1 * theta.item() + m2 <= math.pi:
        target = torch.cos(m1 * theta + m2) - m3
    else:  # the continuation documented in combined.py: c − cos θ_b − 1 − m3
        theta_b = (math.pi - m2) / m1
        target = c - math.cos(theta_b) - 1.0 - m3
    positive = _margin_policy(s * target, s * c, hp["margin_grad"])
    return _cross_entropy(positive, [s * _cos(x, W[j]) for j in neg])


def dsoftmax(x: Tensor, W: Tensor, y: int, neg: list[int], hp: dict, step: int) -> Tensor:
    s, d = hp["scale"], hp["d"]
    intra = _softplus(s * (d - _cos(x, W[y])))
    inter = _softplus(_logsumexp([s * _cos(x, W[k]) for k in neg])) if neg else x.new_zeros(())
    return hp["w_intra"] * intra + hp["w_inter"] * inter


def sosoftmax(x: Tensor, W: Tensor, y: int, neg: list[int], hp: dict, step: int) -> Tensor:
    s, lp, ln, g = hp["scale"], hp["lambda_p"], hp["lambda_n"], hp["goal_n"]
    c = _cos(x, W[y])
    positive = _margin_policy(s * (c - lp * (1.0 - c) ** 2), s * c, hp["margin_grad"])
    negatives = []
    for j in neg:
        cj = _cos(x, W[j])
        excess = cj - g if cj.item() > g else cj * 0.0
        negatives.append(s * (cj + ln * excess**2))
    return _cross_entropy(positive, negatives)


def virtual(x: Tensor, W: Tensor, y: int, neg: list[int], hp: dict, step: int) -> Tensor:
    if hp["normalized"]:
        s = hp["scale"]
        negatives = [s * _cos(x, W[j]) for j in neg]
        return _cross_entropy(s * _cos(x, W[y]), [*negatives, x.new_tensor(float(s))])
    negatives = [_dot(W[j], x) for j in neg]
    return _cross_entropy(_dot(W[y], x), [*negatives, _norm(W[y]) * _norm(x)])


FORMULAS: dict[str, Callable[..., Tensor]] = {
    "softmax": softmax,
    "normface": normface,
    "sphereface": sphereface,
    "sphereface_r": sphereface_r,
    "cosface": cosface,
    "arcface": arcface,
    "combined": combined,
    "dsoftmax": dsoftmax,
    "sosoftmax": sosoftmax,
    "virtual": virtual,
}


def naive_loss(
    name: str,
    hyperparameters: dict[str, Any],
    embeddings: Tensor,
    weights: Tensor,
    labels: Tensor,
    *,
    step: int = 0,
    classes: Sequence[int] | Tensor | None = None,
    reduction: str = "mean",
) -> Tensor:
    """Per-sample loop: negatives are every class of ``classes`` (default: all) but the label."""
    formula = FORMULAS[name]
    pool = range(weights.shape[0]) if classes is None else [int(c) for c in classes]
    losses = []
    for i in range(embeddings.shape[0]):
        y = int(labels[i])
        if y not in pool:
            raise ValueError(f"label {y} not among the classes")
        negatives = [j for j in pool if j != y]
        losses.append(formula(embeddings[i], weights, y, negatives, hyperparameters, step))
    per_sample = torch.stack(losses)
    if reduction == "none":
        return per_sample
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.sum() / len(losses)
    raise ValueError(reduction)
