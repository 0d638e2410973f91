"""``LossState``: a loss's buffers and learnable scalars as one small module."""

from __future__ import annotations

import torch

from workers.losses import LossState, build_loss


def test_buffers_parameters_and_values() -> None:
    curricular = LossState(build_loss("curricularface"), 100, 0.5, dtype=torch.float64)
    assert dict(curricular.named_parameters()) == {}
    assert [n for n, _ in curricular.named_buffers()] == ["t"] and len(curricular) == 1
    assert curricular.t.dtype == torch.float64 and curricular.t.shape == ()
    ada = LossState(build_loss("adaface"), 100, 0.5)
    assert ada.values() == {"mu": 20.0, "sigma": 100.0} and ada.mu.dtype == torch.float32
    uni = LossState(build_loss("uniface"), 100, 0.5)
    assert list(uni.state_dict()) == ["bias"] and uni.bias.requires_grad
    assert len(LossState(build_loss("arcface"), 100, 0.5)) == 0


def test_state_dict_round_trip() -> None:
    loss = build_loss("adaface")
    state, other = LossState(loss, 10, 1.0), LossState(loss, 10, 1.0)
    state.mu.fill_(3.5)
    other.load_state_dict(state.state_dict())
    assert other.values() == {"mu": 3.5, "sigma": 100.0}
