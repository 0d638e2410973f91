"""``HeadClock``: a span runs from the embeddings entering the head to their gradient, so
it holds the head's forward and backward and not the backbone's (a fake clock that each
stage advances by its own amount, so the sum identifies what was counted)."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from workers import train_loop
from workers.train_loop import HeadClock


class Advance(torch.autograd.Function):
    """Identity whose forward and backward advance the fake clock by given amounts."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, clock: list[float], forward: float,
                backward: float) -> torch.Tensor:
        clock[0] += forward
        ctx.clock, ctx.backward = clock, backward
        return x.clone()

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        ctx.clock[0] += ctx.backward
        return grad, None, None, None


def test_span_holds_the_head_and_not_the_backbone(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [0.0]
    monkeypatch.setattr(train_loop.time, "perf_counter", lambda: clock[0])
    head_clock = HeadClock(torch.device("cpu"))
    x = torch.ones(3, requires_grad=True)
    for _ in range(2):  # two micro-batches
        embeddings = Advance.apply(x, clock, 100.0, 1000.0)  # the backbone: not counted
        head_clock.watch(embeddings)
        loss = Advance.apply(embeddings, clock, 1.0, 2.0).sum()  # the head: counted
        clock[0] += 4.0  # between the loss and backward (the caller's work): counted
        loss.backward()
    assert head_clock.seconds() == 2 * (1.0 + 4.0 + 2.0)


def test_an_unfinished_span_is_not_counted() -> None:
    head_clock = HeadClock(torch.device("cpu"))
    head_clock.watch(torch.ones(2, requires_grad=True) * 2)
    assert head_clock.seconds() == 0.0
