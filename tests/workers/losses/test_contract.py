"""Contract tests over everything registered (STYLE items 1, 9, 10, 15).

Numerics (finite at cos = ±1, dtype, determinism, gradients everywhere), the identities that
tie the zoo together, the margin-gradient policy, monotone target logits, and the shape of
every loss module (docstring, size budgets).
"""

from __future__ import annotations

import ast
import inspect
import re
from pathlib import Path

import pytest
import torch
from _cases import assert_non_increasing, expand_centres, grid_target, make_batch, random_batch
from _formulas import naive_loss

from workers.losses import (
    MarginLoss,
    build_loss,
    get_loss_class,
    list_losses,
    reference_loss,
)

LOSSES = list_losses()
MARGIN_GRAD_LOSSES = [n for n in LOSSES
                      if "margin_grad" in {s.name for s in get_loss_class(n).hyperparameters()}]
HOOKS = ("psi", "phi", "combine", "scale_value", "virtual_logit")


def _grads(loss: MarginLoss, embeddings: torch.Tensor, weights: torch.Tensor,
           labels: torch.Tensor, **kw: object) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    e = embeddings.detach().clone().requires_grad_()
    w = expand_centres(loss, weights).detach().clone().requires_grad_()
    value = reference_loss(loss, e, w, labels, **kw)  # type: ignore[arg-type]
    value.sum().backward()
    assert e.grad is not None and w.grad is not None
    return value.detach(), e.grad, w.grad


def _aligned_batch(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rows 0–2 have cos θ_y = +1, −1, +1 exactly (embedding = ±centre, CCE's c[:k] = e[:k])."""
    embeddings, weights, labels = random_batch(6, 11, 16, seed=5, dtype=torch.float64)
    embeddings[0] = weights[labels[0]]
    embeddings[1] = -weights[labels[1]]
    embeddings[2] = 2.5 * weights[labels[2]]
    return embeddings.to(dtype), weights.to(dtype), labels


# --- numerics ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16],
                         ids=str)
@pytest.mark.parametrize("name", LOSSES)
def test_finite_at_cos_plus_minus_one(name: str, dtype: torch.dtype) -> None:
    """Default hyperparameters (s = 64): value and every gradient finite at cos θ_y = ±1."""
    loss = build_loss(name)
    embeddings, weights, labels = _aligned_batch(dtype)
    value, g_emb, g_w = _grads(loss, embeddings, weights, labels)
    assert value.dtype == dtype
    assert torch.isfinite(value), f"{name}: loss {value}"
    assert torch.isfinite(g_emb).all(), f"{name}: non-finite embedding grad {g_emb}"
    assert torch.isfinite(g_w).all(), f"{name}: non-finite centre grad {g_w}"


@pytest.mark.parametrize("name", LOSSES)
def test_every_input_gets_a_gradient(name: str) -> None:
    loss = build_loss(name)
    embeddings, weights, labels = random_batch(8, 13, 16, seed=1)
    _, g_emb, g_w = _grads(loss, embeddings, weights, labels)
    for what, g in (("embeddings", g_emb), ("weights", g_w)):
        assert torch.isfinite(g).all() and float(g.abs().sum()) > 0, f"No gradient for {what}"


@pytest.mark.parametrize("name", LOSSES)
def test_deterministic_and_inputs_untouched(name: str) -> None:
    loss = build_loss(name)
    embeddings, weights, labels = random_batch(8, 13, 16, seed=2, dtype=torch.float32)
    copies = [t.clone() for t in (embeddings, weights, labels)]
    first = _grads(loss, embeddings, weights, labels)
    second = _grads(build_loss(name), embeddings, weights, labels)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
    for original, copy in zip((embeddings, weights, labels), copies, strict=True):
        assert torch.equal(original, copy), "reference_loss modified its input"


@pytest.mark.parametrize("name", LOSSES)
def test_float32_preserved_and_close_to_float64(name: str) -> None:
    loss = build_loss(name)
    embeddings, weights, labels = random_batch(16, 50, 32, seed=3)
    v64, e64, w64 = _grads(loss, embeddings, weights, labels)
    v32, e32, w32 = _grads(loss, embeddings.float(), weights.float(), labels)
    assert (v32.dtype, e32.dtype, w32.dtype) == (torch.float32,) * 3
    torch.testing.assert_close(v32.double(), v64, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(e32.double(), e64, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w32.double(), w64, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", LOSSES)
def test_bfloat16_preserved(name: str) -> None:
    loss = build_loss(name)
    embeddings, weights, labels = random_batch(16, 50, 32, seed=4)
    v, e, w = _grads(loss, embeddings.bfloat16(), weights.bfloat16(), labels)
    assert (v.dtype, e.dtype, w.dtype) == (torch.bfloat16,) * 3
    assert torch.isfinite(v) and torch.isfinite(e).all() and torch.isfinite(w).all()
    v64 = reference_loss(loss, embeddings, expand_centres(loss, weights), labels)
    torch.testing.assert_close(v.double(), v64, rtol=1e-2, atol=1e-2)  # STYLE 15: bf16 1e-2


# --- identities ----------------------------------------------------------------------------

NORMFACE_EQUIVALENTS = [
    ("cosface", {"margin": 0.0}),
    ("arcface", {"margin": 0.0}),
    ("combined", {"m1": 1.0, "m2": 0.0, "m3": 0.0}),
    ("sosoftmax", {"lambda_p": 0.0, "lambda_n": 0.0}),
    ("sphereface_r", {"margin": 1.0}),
]


@pytest.mark.parametrize("margin_grad", ["true", "detached"])
@pytest.mark.parametrize("scale", [8.0, 64.0])
@pytest.mark.parametrize(("name", "zero_margin"), NORMFACE_EQUIVALENTS,
                         ids=[n for n, _ in NORMFACE_EQUIVALENTS])
def test_zero_margin_is_normface(name: str, zero_margin: dict, scale: float,
                                 margin_grad: str) -> None:
    embeddings, weights, labels = make_batch(seed=7)
    want = _grads(build_loss("normface", scale=scale), embeddings, weights, labels,
                  reduction="none")
    loss = build_loss(name, scale=scale, margin_grad=margin_grad, **zero_margin)
    got = _grads(loss, embeddings, weights, labels, reduction="none")
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, atol=1e-10, rtol=0)


# --- the margin-gradient policy --------------------------------------------------------------


@pytest.mark.parametrize("name", MARGIN_GRAD_LOSSES)
def test_margin_grad_default_is_true(name: str) -> None:
    assert build_loss(name).margin_grad == "true"


@pytest.mark.parametrize("name", MARGIN_GRAD_LOSSES)
def test_detached_margin_has_margin_value_and_margin_free_gradient(name: str) -> None:
    """``detached``: forward = the margin's value; backward = the margin-free logit's (s·c_y,
    ‖x‖·c_y for SphereFace), i.e. NormFace's gradient with the margin held as a constant."""
    embeddings, weights, labels = make_batch(seed=11)
    true_loss, detached_loss = build_loss(name), build_loss(name, margin_grad="detached")
    v_true, e_true, _ = _grads(true_loss, embeddings, weights, labels, step=50)
    v_det, e_det, w_det = _grads(detached_loss, embeddings, weights, labels, step=50)
    torch.testing.assert_close(v_det, v_true, atol=1e-10, rtol=0)

    e = embeddings.clone().requires_grad_()
    w = expand_centres(detached_loss, weights).clone().requires_grad_()
    naive = naive_loss(name, detached_loss.hyperparameter_values(), e, w, labels, step=50)
    torch.testing.assert_close(v_det, naive.detach(), atol=1e-10, rtol=0)
    want_e, want_w = torch.autograd.grad(naive, (e, w))
    torch.testing.assert_close(e_det, want_e, atol=1e-10, rtol=0)
    torch.testing.assert_close(w_det, want_w, atol=1e-10, rtol=0)
    if name != "cosface":  # CosFace's margin is a constant shift: both modes agree
        assert not torch.allclose(e_det, e_true, atol=1e-6)


# --- the target logit is monotone in the angle ---------------------------------------------

@pytest.mark.parametrize("normalized", [False, True])
@pytest.mark.parametrize("name", LOSSES)
def test_target_logit_non_increasing_in_theta(name: str, normalized: bool) -> None:
    kwargs = {"normalized": normalized} if name == "virtual" else {}
    loss = build_loss(name, **kwargs)
    for step in (0, 100, 10_000):
        positive = loss.positive_logit(grid_target(loss, step=step))
        assert torch.isfinite(positive).all()
        assert_non_increasing(positive, f"{loss.describe()} at step {step}")


# --- the shape of a loss module -------------------------------------------------------------


@pytest.mark.parametrize("name", LOSSES)
def test_docstring_has_formula_paper_and_every_hyperparameter(name: str) -> None:
    cls = get_loss_class(name)
    doc = inspect.getdoc(cls) or ""
    assert "Formula:" in doc
    assert re.search(r"https?://\S+", doc), "no paper URL"
    for spec in cls.hyperparameters():
        lines = [line for line in doc.splitlines() if line.strip().startswith(f"{spec.name}:")]
        assert lines, f"hyperparameter {spec.name} is not documented"
        if spec.unit == "rad":
            assert "radian" in lines[0], f"{spec.name}: unit 'rad' not said in {lines[0]!r}"


def _module_tree(cls: type) -> tuple[Path, ast.Module]:
    path = Path(inspect.getsourcefile(cls) or "")
    return path, ast.parse(path.read_text())


@pytest.mark.parametrize("name", LOSSES)
def test_module_within_150_lines(name: str) -> None:
    path, _ = _module_tree(get_loss_class(name))
    lines = len(path.read_text().splitlines())
    assert lines <= 150, f"{path.name}: {lines} lines"


@pytest.mark.parametrize("name", LOSSES)
def test_hooks_within_25_lines(name: str) -> None:
    """psi/phi/combine (and scale_value, virtual_logit where overridden) take ≤ 25 lines."""
    cls = get_loss_class(name)
    _, tree = _module_tree(cls)
    (node,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__]
    total = 0
    for fn in node.body:
        if isinstance(fn, ast.FunctionDef) and fn.name in HOOKS:
            body = fn.body
            if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
                body = body[1:]  # docstring
            total += (body[-1].end_lineno or 0) - body[0].lineno + 1 if body else 0
    assert "psi" in {fn.name for fn in node.body if isinstance(fn, ast.FunctionDef)}
    assert total <= 25, f"{name}: hooks take {total} lines"
