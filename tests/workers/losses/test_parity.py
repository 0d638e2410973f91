"""``reference_loss`` against the independent formulas of ``_formulas.py``, in float64.

Values and gradients w.r.t. embeddings and class centres must agree to 1e-10 for every
registered loss under several hyperparameter settings, and the analytical gradients must pass
``torch.autograd.gradcheck`` (STYLE item 6). The batches put every target angle away from the
kinks: ArcFace's θ = π − m switch, Combined's θ_b, SphereFace's k boundaries, the ±1 clamps.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _cases import CASES, Case, case_params, expand_centres, make_batch
from _formulas import FORMULAS, naive_loss

from workers.losses import build_loss, list_losses, reference_loss

ATOL = 1e-10


def _inputs(seed: int = 0, loss: Any = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    embeddings, weights, labels = make_batch(seed=seed)
    weights = weights if loss is None else expand_centres(loss, weights)
    return embeddings.requires_grad_(), weights.requires_grad_(), labels


def test_every_registered_loss_has_a_formula_and_cases() -> None:
    assert set(FORMULAS) == set(list_losses())
    assert {case.name for case in CASES} == set(list_losses())


@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("case", case_params())
def test_value_matches_formula(case: Case, seed: int) -> None:
    loss = build_loss(case.name, **case.hyperparameters)
    embeddings, weights, labels = make_batch(seed=seed)
    weights = expand_centres(loss, weights)
    got = reference_loss(loss, embeddings, weights, labels, step=case.step, reduction="none")
    want = naive_loss(case.name, loss.hyperparameter_values(), embeddings, weights, labels,
                      step=case.step, reduction="none")
    assert got.dtype == torch.float64
    torch.testing.assert_close(got, want, atol=ATOL, rtol=0)


@pytest.mark.parametrize("case", case_params())
def test_gradients_match_formula(case: Case) -> None:
    loss = build_loss(case.name, **case.hyperparameters)
    embeddings, weights, labels = _inputs(loss=loss)
    got = torch.autograd.grad(
        reference_loss(loss, embeddings, weights, labels, step=case.step), (embeddings, weights)
    )
    want = torch.autograd.grad(
        naive_loss(case.name, loss.hyperparameter_values(), embeddings, weights, labels,
                   step=case.step),
        (embeddings, weights),
    )
    for g, w, what in zip(got, want, ("embeddings", "weights"), strict=True):
        assert float(w.abs().max()) > 1e-3, f"degenerate test: no gradient for {what}"
        torch.testing.assert_close(g, w, atol=ATOL, rtol=0, msg=lambda m, what=what: f"{what}: {m}")


@pytest.mark.parametrize("case", case_params(tuple(c for c in CASES
                                                    if c.margin_grad == "true" and c.gradcheck)))
def test_gradcheck(case: Case) -> None:
    loss = build_loss(case.name, **case.hyperparameters)
    embeddings, weights, labels = _inputs(loss=loss)
    assert torch.autograd.gradcheck(
        lambda e, w: reference_loss(loss, e, w, labels, step=case.step, reduction="sum"),
        (embeddings, weights), eps=1e-6, atol=1e-6,
    )


# CosFace is left out: its ψ(c) − s·c = −s·m is a constant, so both modes have one gradient.
@pytest.mark.parametrize("case", case_params(
    tuple(c for c in CASES if c.margin_grad == "detached" and c.name != "cosface")
))
def test_detached_margin_fails_gradcheck(case: Case) -> None:
    """The detached mode's backward is deliberately not the forward's derivative."""
    loss = build_loss(case.name, **case.hyperparameters)
    embeddings, weights, labels = _inputs(loss=loss)
    assert not torch.autograd.gradcheck(
        lambda e, w: reference_loss(loss, e, w, labels, step=case.step, reduction="sum"),
        (embeddings, weights), eps=1e-6, atol=1e-6, raise_exception=False,
    )


@pytest.mark.parametrize("name", list_losses())
def test_defaults_match_formula_at_scale_64(name: str) -> None:
    """Default hyperparameters (s = 64 mostly): float64 values and gradients still agree."""
    loss = build_loss(name)
    embeddings, weights, labels = _inputs(seed=3, loss=loss)
    got = reference_loss(loss, embeddings, weights, labels, reduction="none")
    want = naive_loss(name, loss.hyperparameter_values(), embeddings, weights, labels,
                      reduction="none")
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-12)
    got_grads = torch.autograd.grad(got.sum(), (embeddings, weights))
    want_grads = torch.autograd.grad(want.sum(), (embeddings, weights))
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, atol=1e-9, rtol=1e-9)
