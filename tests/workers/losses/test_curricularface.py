"""CurricularFace: ArcFace's positive; hard negatives c·(t + c) above cos(θ_y + m); t an EMA."""

from __future__ import annotations

import math

import pytest
import torch
from _cases import make_batch
from _formulas import naive_loss

from workers.losses import Batch, LossState, build_loss, reference_loss


def _state(loss: object, t: float | None = None) -> LossState:
    state = LossState(loss, 7, 1.0, dtype=torch.float64)
    if t is not None:
        state.t.fill_(t)
    return state


def test_t_is_an_ema_of_the_batch_mean_updated_before_use() -> None:
    """Three steps: t and the loss equal the naive per-sample loop with its own t."""
    loss = build_loss("curricularface", scale=8.0, t_alpha=0.3)
    state, naive_state = _state(loss), {"t": 0.0}
    assert float(state.t) == 0.0
    t = 0.0
    for step in range(3):
        embeddings, weights, labels = make_batch(seed=step)
        got = reference_loss(loss, embeddings, weights, labels, step=step, state=state,
                             reduction="none")
        updated: dict = {}
        want = naive_loss("curricularface", loss.hyperparameter_values(), embeddings, weights,
                          labels, step=step, state=naive_state, new_state=updated,
                          reduction="none")
        naive_state = updated
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
        cos_y = torch.nn.functional.cosine_similarity(embeddings, weights[labels])
        t = 0.3 * float(cos_y.mean()) + 0.7 * t
        assert float(state.t) == pytest.approx(t, abs=1e-14)
        assert naive_state["t"] == pytest.approx(t, abs=1e-14)


def test_phi_reweights_only_the_hard_negatives() -> None:
    loss = build_loss("curricularface", scale=2.0)
    logits = torch.tensor([[0.1, 0.5, 0.9], [0.1, 0.5, 0.9]], dtype=torch.float64)
    context = torch.tensor([[0.4, 0.25], [0.95, 0.25]], dtype=torch.float64)  # [cos(θ+m), t]
    want = 2.0 * torch.tensor([[0.1, 0.5 * 0.75, 0.9 * 1.15], [0.1, 0.5, 0.9]],
                              dtype=torch.float64)
    torch.testing.assert_close(loss.phi(logits, context), want, atol=1e-15, rtol=0)


def test_hard_mask_uses_cos_theta_plus_m_without_the_fallback() -> None:
    """Past θ_y = π − m the positive falls back to c − m·sin m, the mask stays cos(θ_y + m)."""
    loss = build_loss("curricularface", margin=0.5)
    state = _state(loss)
    cos = torch.tensor([0.8, -0.98], dtype=torch.float64)
    context = loss.prepare(Batch(cos, torch.ones_like(cos), update=False), state)
    expected = torch.cos(torch.acos(cos) + 0.5)
    torch.testing.assert_close(context[:, 0], expected, atol=1e-14, rtol=0)
    assert float(context[1, 0]) > -1.0  # cos(2.94 + 0.5) rises again: no fallback applied


def _easy_batch() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Centres on the first 5 axes, embeddings off-axis: every negative has cos θ_j = 0 below
    cos(θ_y + m) (θ_y + m < π/2) — no hard negatives."""
    weights = 1.5 * torch.eye(5, 8, dtype=torch.float64)
    labels = torch.tensor([0, 3, 4, 1])
    embeddings = torch.zeros(4, 8, dtype=torch.float64)
    for row, (label, cos) in enumerate(zip(labels.tolist(), (0.95, 0.9, 0.99, 0.92),
                                           strict=True)):
        embeddings[row, label] = cos
        embeddings[row, 5 + row % 3] = math.sqrt(1 - cos**2)
    return 2.0 * embeddings, weights, labels


def test_t_pinned_to_one_without_hard_negatives_is_arcface() -> None:
    embeddings, weights, labels = _easy_batch()
    curricular = build_loss("curricularface", scale=16.0, t_alpha=0.0)
    arcface = build_loss("arcface", scale=16.0)
    grads = []
    for loss, state in ((curricular, _state(curricular, 1.0)), (arcface, None)):
        e, w = embeddings.clone().requires_grad_(), weights.clone().requires_grad_()
        value = reference_loss(loss, e, w, labels, state=state, reduction="none")
        grads.append((value.detach(), *torch.autograd.grad(value.sum(), (e, w))))
    for got, want in zip(*grads, strict=True):
        torch.testing.assert_close(got, want, atol=1e-10, rtol=0)
    # with hard negatives (make_batch has them) t = 1 is not ArcFace
    embeddings, weights, labels = make_batch(seed=0)
    assert not torch.allclose(
        reference_loss(curricular, embeddings, weights, labels, state=_state(curricular, 1.0)),
        reference_loss(arcface, embeddings, weights, labels))


def test_gradcheck_with_t_pinned() -> None:
    """t_alpha = 0 keeps the context a function of detached values only: finite differences
    of the loss then match its analytical gradient (the hard mask is piecewise constant)."""
    loss = build_loss("curricularface", scale=6.0, t_alpha=0.0)
    embeddings, weights, labels = make_batch(seed=1)
    assert torch.autograd.gradcheck(
        lambda e, w: reference_loss(loss, e, w, labels, state=_state(loss, 0.6),
                                    reduction="sum"),
        (embeddings.requires_grad_(), weights.requires_grad_()), eps=1e-6, atol=1e-6)


def test_state_needs_no_gradient_and_ignores_evaluation_batches() -> None:
    loss = build_loss("curricularface")
    state = _state(loss)
    embeddings, weights, labels = make_batch(seed=2)
    reference_loss(loss, embeddings.requires_grad_(), weights, labels, state=state).backward()
    assert not state.t.requires_grad and float(state.t) != 0.0
    before = float(state.t)
    loss.prepare(Batch(torch.ones(3, dtype=torch.float64), torch.ones(3), update=False), state)
    assert float(state.t) == before


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"margin": 1.3}, r"curricularface\.margin = 1\.3 rad is outside \[0, 1\.2\]"),
    ({"t_alpha": 1.5}, r"curricularface\.t_alpha = 1\.5 is outside \[0, 1\]"),
    ({"scale": 0.5}, r"curricularface\.scale = 0\.5 is outside \[1, 256\]"),
])
def test_init_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        build_loss("curricularface", **kwargs)
