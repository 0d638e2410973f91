"""UniFace (UCE): softplus(−P) + λ·Σ_j softplus(s·cos θ_j − b), b a learnable state."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from _cases import make_batch
from _formulas import naive_loss

from workers.losses import LossState, build_loss, reference_loss


def test_bias_starts_at_log_of_ten_sampled_classes() -> None:
    loss = build_loss("uniface")
    state = LossState(loss, 10_000, 0.2)
    assert float(state.bias.detach()) == pytest.approx(math.log(10 * 0.2 * 10_000), rel=1e-7)
    assert [name for name, _ in state.named_parameters()] == ["bias"]
    assert state.bias.requires_grad and dict(state.named_buffers()) == {}


def test_negatives_are_summed_not_log_sum_exped() -> None:
    loss = build_loss("uniface", scale=4.0, margin=0.3, lambda_n=0.5)
    embeddings, weights, labels = make_batch(seed=2)
    state = LossState(loss, 7, 1.0, dtype=torch.float64)
    with torch.no_grad():
        state.bias.fill_(1.5)
    got = reference_loss(loss, embeddings, weights, labels, state=state, reduction="none")
    cos = F.normalize(embeddings, dim=1) @ F.normalize(weights, dim=1).T
    own = F.one_hot(labels, 7).bool()
    positive = 4.0 * (cos[own] - 0.3) - 1.5
    terms = F.softplus((4.0 * cos - 1.5).clamp(-4, 4)).masked_fill(own, 0.0).sum(dim=1)
    want = F.softplus(-positive.clamp(-4, 4)) + 0.5 * terms
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)


def test_bias_gradient_matches_the_naive_loop() -> None:
    loss = build_loss("uniface", scale=8.0)
    embeddings, weights, labels = make_batch(seed=3)
    state = LossState(loss, 7, 1.0, dtype=torch.float64)
    reference_loss(loss, embeddings, weights, labels, state=state).backward()
    bias = torch.tensor(math.log(70.0), dtype=torch.float64, requires_grad=True)
    naive_loss("uniface", loss.hyperparameter_values(), embeddings, weights, labels,
               state={"bias": bias}).backward()
    assert float(state.bias.grad) == pytest.approx(float(bias.grad), abs=1e-12)
    assert float(state.bias.grad) != 0.0


def test_sampled_negatives_are_not_rescaled() -> None:
    """With a class subset the sum runs over the sampled negatives only (no 1/r)."""
    loss = build_loss("uniface", scale=8.0)
    embeddings, weights, labels = make_batch(seed=4)
    classes = torch.tensor([0, 2, 3, 6])
    got = reference_loss(loss, embeddings, weights, labels, classes=classes, reduction="none")
    want = naive_loss("uniface", loss.hyperparameter_values(), embeddings, weights, labels,
                      classes=classes, reduction="none")
    torch.testing.assert_close(got, want, atol=1e-10, rtol=0)


def test_clip_stops_gradients_beyond_the_scale() -> None:
    loss = build_loss("uniface", scale=2.0)
    context = torch.tensor([[-1.0]], dtype=torch.float64)
    logits = torch.tensor([[0.9, -0.9]], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(loss.phi(logits, context).sum(), logits)
    assert float(grad[0, 0]) == 0.0 and float(grad[0, 1]) > 0.0  # 2·0.9 + 1 > s = 2: clipped


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"margin": 1.5}, r"uniface\.margin = 1\.5 cos is outside \[0, 1\]"),
    ({"lambda_n": 101.0}, r"uniface\.lambda_n = 101\.0 is outside \[0, 100\]"),
])
def test_init_errors(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}$"):
        build_loss("uniface", **kwargs)
