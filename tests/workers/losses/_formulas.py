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

import numpy as np
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
    **zoo: Any,
) -> Tensor:
    """Per-sample loop: negatives are every class of ``classes`` (default: all) but the label.

    The modern zoo (``ZOO``) takes ``state``/``seed``/``filter_threshold`` too (``zoo_loss``).
    """
    if name in ZOO:
        return zoo_loss(name, hyperparameters, embeddings, weights, labels, step=step,
                        classes=classes, reduction=reduction, **zoo)
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


# --- the modern zoo (LOSSES.md "The modern zoo"): batch-level state and context ---------------
#
# These need the whole batch before any sample (t, μ, σ, the sorted ElasticFace+ margins), so
# each is one function over the batch: a plain pass computing the batch quantities from
# detached values, then the per-sample loop. Per-row random margins use the same derivation as
# the library (``workers.seeding.row_normals``), which is not part of any loss.

ZOO = ("curricularface", "magface", "adaface", "elasticface_arc", "elasticface_cos",
       "subcenter_arcface", "uniface")
ELASTIC_DRAWS = "elasticface-margin"


def _class_cos(x: Tensor, W: Tensor, j: int, k: int) -> Tensor:
    """max over class j's k sub-centres (row j holds them side by side) of cos(x, W_jk)."""
    d = x.shape[0]
    return torch.stack([_cos(x, W[j, i * d : (i + 1) * d]) for i in range(k)]).max()


def _arc(c: Tensor, m: Any) -> Tensor:
    """cos(θ + m) up to θ = π − m, then c − m·sin m (LOSSES.md's ArcFace)."""
    theta = torch.acos(c)
    m_value = float(m.detach()) if isinstance(m, Tensor) else float(m)
    if theta.item() <= math.pi - m_value:
        return torch.cos(theta + m)
    return c - m * (torch.sin(m) if isinstance(m, Tensor) else math.sin(m))


def _bce(logit: Tensor) -> Tensor:
    return _softplus(logit)


def initial_zoo_state(name: str, num_classes: int) -> dict[str, Any]:
    """The LOSSES.md starting values (UniFace: b₀ = log(10·r·C) at r = 1)."""
    return {"curricularface": {"t": 0.0}, "adaface": {"mu": 20.0, "sigma": 100.0},
            "uniface": {"bias": math.log(10.0 * num_classes)}}.get(name, {})


def zoo_loss(name: str, hp: dict[str, Any], embeddings: Tensor, weights: Tensor, labels: Tensor,
             *, step: int = 0, classes: Sequence[int] | Tensor | None = None,
             reduction: str = "mean", state: dict[str, Any] | None = None, seed: int = 0,
             filter_threshold: float = 0.0, new_state: dict[str, Any] | None = None) -> Tensor:
    """The modern zoo, per sample. ``state``: the values before this step (default: the
    initial ones); the step's updated values are written into ``new_state`` when given."""
    n, num_classes = embeddings.shape[0], weights.shape[0]
    k = int(hp.get("subcenters", 1))
    pool = range(num_classes) if classes is None else [int(c) for c in classes]
    state = dict(initial_zoo_state(name, num_classes) if state is None else state)
    s = hp.get("scale", 1.0)
    xs = [embeddings[i] for i in range(n)]
    ys = [int(labels[i]) for i in range(n)]
    cos_y = [_class_cos(xs[i], weights, ys[i], k) for i in range(n)]
    plain_y = [c.detach().item() for c in cos_y]

    def negatives(i: int) -> list[tuple[int, Tensor]]:
        out = []
        for j in pool:
            if j == ys[i]:
                continue
            c = _class_cos(xs[i], weights, j, k)
            if filter_threshold > 0 and c.item() > filter_threshold:
                c = c * 0.0  # the inter-class filter: counts, with cos θ_j = 0, no gradient
            out.append((j, c))
        return out

    losses = []
    if name == "curricularface":
        t = hp["t_alpha"] * sum(plain_y) / n + (1 - hp["t_alpha"]) * float(state["t"])
        state["t"] = t
        m = hp["margin"]
        for i in range(n):
            hard_from = math.cos(math.acos(max(-1.0, min(1.0, plain_y[i]))) + m)
            negs = [s * (c * (t + c) if c.item() > hard_from else c) for _, c in negatives(i)]
            positive = _margin_policy(s * _arc(cos_y[i], m), s * cos_y[i], hp["margin_grad"])
            losses.append(_cross_entropy(positive, negs))
    elif name == "magface":
        for i in range(n):
            a = torch.clamp(_norm(xs[i]), hp["l_a"], hp["u_a"])
            m = hp["l_m"] + (hp["u_m"] - hp["l_m"]) * (a - hp["l_a"]) / (hp["u_a"] - hp["l_a"])
            if hp["easy_margin"]:
                target = torch.cos(torch.acos(cos_y[i]) + m) if plain_y[i] > 0 else cos_y[i]
            else:
                target = _arc(cos_y[i], m)
            positive = _margin_policy(s * target, s * cos_y[i], hp["margin_grad"])
            ce = _cross_entropy(positive, [s * c for _, c in negatives(i)])
            losses.append(ce + hp["lambda_g"] * (a / hp["u_a"] ** 2 + 1.0 / a))
    elif name == "adaface":
        eps, m, alpha = 1e-3, hp["margin"], hp["t_alpha"]
        norms = [min(100.0, max(0.001, _norm(x).detach().item())) for x in xs]
        mean = sum(norms) / n
        mu = alpha * mean + (1 - alpha) * float(state["mu"])
        sigma = float(state["sigma"])
        if n > 1:
            std = math.sqrt(sum((a - mean) ** 2 for a in norms) / (n - 1))
            sigma = alpha * std + (1 - alpha) * sigma
        state.update(mu=mu, sigma=sigma)
        for i in range(n):
            z = max(-1.0, min(1.0, hp["h"] * (norms[i] - mu) / (sigma + eps)))
            theta = torch.acos(torch.clamp(cos_y[i], -1 + eps, 1 - eps))
            angle = torch.clamp(theta - m * z, eps, math.pi - eps)
            target = torch.cos(angle) - (m + m * z)
            positive = _margin_policy(s * target, s * cos_y[i], hp["margin_grad"])
            negs = [s * torch.clamp(c, -1 + eps, 1 - eps) for _, c in negatives(i)]
            losses.append(_cross_entropy(positive, negs))
    elif name in ("elasticface_arc", "elasticface_cos"):
        from workers.seeding import row_normals

        drawn = [hp["margin"] + hp["sigma"] * float(v)
                 for v in row_normals(ELASTIC_DRAWS, seed, step, np.arange(n))]
        if hp["plus"]:  # the highest cos θ_y gets the smallest margin
            by_cos = sorted(range(n), key=lambda i: -plain_y[i])
            drawn_sorted = sorted(drawn)
            drawn = [0.0] * n
            for rank, i in enumerate(by_cos):
                drawn[i] = drawn_sorted[rank]
        for i in range(n):
            if name == "elasticface_arc":
                positive = _margin_policy(s * _arc(cos_y[i], drawn[i]), s * cos_y[i],
                                          hp["margin_grad"])
            else:
                positive = s * (cos_y[i] - drawn[i])
            losses.append(_cross_entropy(positive, [s * c for _, c in negatives(i)]))
    elif name == "subcenter_arcface":
        for i in range(n):
            positive = _margin_policy(s * _arc(cos_y[i], hp["margin"]), s * cos_y[i],
                                      hp["margin_grad"])
            losses.append(_cross_entropy(positive, [s * c for _, c in negatives(i)]))
    elif name == "uniface":
        b = state["bias"]
        for i in range(n):
            positive = torch.clamp(s * (cos_y[i] - hp["margin"]) - b, -s, s)
            total = _bce(-positive)
            for _, c in negatives(i):
                total = total + hp["lambda_n"] * _bce(torch.clamp(s * c - b, -s, s))
            losses.append(total)
    else:
        raise KeyError(name)
    if new_state is not None:
        new_state.update(state)
    per_sample = torch.stack(losses)
    if reduction == "none":
        return per_sample
    return per_sample.sum() if reduction == "sum" else per_sample.sum() / n


FORMULAS.update({name: zoo_loss for name in ZOO})
