"""``python -m workers.losses``: the demonstration table."""

from __future__ import annotations

import math

import pytest

from workers.losses import list_losses
from workers.losses.__main__ import main, run


def test_run_is_deterministic_and_finite() -> None:
    first = run(batch=8, dim=16, classes=50, seed=1, repeats=1)
    second = run(batch=8, dim=16, classes=50, seed=1, repeats=1)
    assert [r["name"] for r in first] == list_losses()
    for a, b in zip(first, second, strict=True):
        for key in ("loss", "grad_embeddings", "grad_weights"):
            assert a[key] == b[key]
            assert math.isfinite(float(a[key])) and float(a[key]) > 0  # type: ignore[arg-type]


def test_main_prints_one_row_per_loss(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--batch", "8", "--dim", "16", "--classes", "50", "--repeats", "1"])
    lines = capsys.readouterr().out.splitlines()
    assert "B=8, D=16, C=50" in lines[0]
    rows = lines[2:]
    assert [row.split()[0] for row in rows] == list_losses()
