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
