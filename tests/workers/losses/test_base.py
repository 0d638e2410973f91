"""``_base``: domains and their text, the exact softplus, the dtype-aware cosine clamp."""

from __future__ import annotations

import math

import pytest
import torch

from workers.losses import Choice, Interval, build_loss
from workers.losses._base import softplus


def test_interval_and_choice_text() -> None:
    assert str(Interval(0.0, 1.2)) == "[0, 1.2]"
    assert str(Interval(0.0, 1.0, low_open=True)) == "(0, 1]"
    assert str(Interval(1, 6, integer=True)) == "{1, …, 6}"
    assert str(Choice(("true", "detached"))) == "{'true', 'detached'}"


def test_interval_contains() -> None:
    closed, half_open = Interval(0.0, 1.0), Interval(0.0, 1.0, low_open=True)
    assert closed.contains(0.0) and closed.contains(1.0) and not closed.contains(1.0 + 1e-12)
    assert not half_open.contains(0.0) and half_open.contains(1e-300)
    assert not closed.contains(math.nan)


def test_choice_contains_checks_the_type() -> None:
    flags = Choice((False, True))
    assert flags.contains(True) and flags.contains(False)
    assert not flags.contains(1) and not flags.contains(0.0) and not flags.contains("True")
    modes = Choice(("true", "detached"))
    assert modes.contains("true") and not modes.contains(True)


def test_softplus_is_exact_beyond_twenty() -> None:
    """``F.softplus`` returns z itself past z = 20 (an error of e^-20 ≈ 2e-9)."""
    z = torch.tensor([-50.0, -1.0, 0.0, 19.0, 20.5, 23.0, 35.0, 800.0], dtype=torch.float64)
    want = [math.log1p(math.exp(v)) if v < 700 else v for v in z.tolist()]
    assert softplus(z).tolist() == pytest.approx(want, rel=1e-15, abs=1e-300)
    assert softplus(z.float()).dtype == torch.float32


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16],
                         ids=str)
def test_clamp_cos_stays_inside_the_open_interval(dtype: torch.dtype) -> None:
    """1 − 1e-7 rounds to 1 in bf16 / fp16: the clamp must use at least the dtype's eps."""
    loss = build_loss("arcface")
    clamped = loss.clamp_cos(torch.tensor([-1.0, 1.0, 0.5], dtype=dtype))
    assert clamped.dtype == dtype
    assert float(clamped[0]) > -1.0 and float(clamped[1]) < 1.0 and float(clamped[2]) == 0.5
    if dtype == torch.float64:
        assert float(clamped[1]) == 1.0 - 1e-7
