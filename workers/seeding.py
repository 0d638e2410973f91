"""One seed derivation for everything that draws random numbers in a worker."""

from __future__ import annotations

import zlib

import numpy as np


def derive_seed(purpose: str, *values: int) -> int:
    """A 63-bit seed mixed (numpy ``SeedSequence``) from a purpose tag and integers.

    Stable across platforms and processes; distinct purposes or value tuples give unrelated
    streams, e.g. ``("sample", seed, step, rank)`` for the head's negatives,
    ``("init", seed, block)`` for its initial centres, ``("epoch", seed, epoch)`` for the data
    order.
    """
    entropy = [zlib.crc32(purpose.encode()), len(values), *(int(v) for v in values)]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 ^ int(state[1])


_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix64(values: np.ndarray) -> np.ndarray:
    """SplitMix64's finaliser: a bijective, well-mixed map of 64-bit words (wraps mod 2⁶⁴)."""
    with np.errstate(over="ignore"):
        values = (values ^ (values >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        values = (values ^ (values >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def row_normals(purpose: str, seed: int, step: int, rows: np.ndarray) -> np.ndarray:
    """One standard normal draw per row index, a function of ``(purpose, seed, step, row)`` only.

    ``key = derive_seed(purpose, seed, step)``; row ``i`` takes the SplitMix64 outputs number
    ``2i + 1`` and ``2i + 2`` of the stream starting at ``key`` as two 53-bit uniforms in (0, 1)
    and turns them into ``N(0, 1)`` by Box–Muller. So the draw of global row ``i`` is the same
    however the batch is split over ranks, and costs O(rows) vectorised (``derive_seed`` per
    row would cost ~20 µs each). Returns float64.
    """
    key = np.uint64(derive_seed(purpose, seed, step) & (2**64 - 1))
    counters = 2 * np.asarray(rows, dtype=np.uint64)
    with np.errstate(over="ignore"):
        first = _mix64(key + (counters + np.uint64(1)) * _GOLDEN)
        second = _mix64(key + (counters + np.uint64(2)) * _GOLDEN)
    scale = 2.0**-53
    u1 = ((first >> np.uint64(11)).astype(np.float64) + 0.5) * scale
    u2 = ((second >> np.uint64(11)).astype(np.float64) + 0.5) * scale
    return np.sqrt(-2.0 * np.log(u1)) * np.cos(2.0 * np.pi * u2)
