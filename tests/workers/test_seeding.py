"""``workers.seeding``: one derivation for every random draw of a worker."""

from __future__ import annotations

import numpy as np
import pytest

from workers.seeding import derive_seed, row_normals


def test_derive_seed_is_stable_and_separates_purposes() -> None:
    assert derive_seed("sample", 1, 2, 3) == derive_seed("sample", 1, 2, 3)
    assert derive_seed("sample", 1, 2, 3) != derive_seed("init", 1, 2, 3)
    assert 0 <= derive_seed("x", 0) < 2**63


def test_row_normals_depend_on_the_row_only() -> None:
    full = row_normals("p", 7, 3, np.arange(100))
    assert np.array_equal(row_normals("p", 7, 3, np.arange(40, 60)), full[40:60])
    assert np.array_equal(row_normals("p", 7, 3, np.array([99, 0])), full[[99, 0]])
    for other in (row_normals("p", 7, 4, np.arange(100)), row_normals("p", 8, 3, np.arange(100)),
                  row_normals("q", 7, 3, np.arange(100))):
        assert not np.allclose(other, full)


def test_row_normals_are_standard_normal() -> None:
    draws = row_normals("p", 0, 0, np.arange(200_000))
    assert draws.dtype == np.float64 and np.isfinite(draws).all()
    assert draws.mean() == pytest.approx(0.0, abs=0.01)
    assert draws.std() == pytest.approx(1.0, abs=0.01)
    assert np.mean(np.abs(draws) < 1.0) == pytest.approx(0.6827, abs=0.005)
    assert abs(np.corrcoef(draws[:-1], draws[1:])[0, 1]) < 0.01
