"""Loss-zoo tests run on one intra-op thread.

The tensors here are tiny; on a shared, busy machine torch's thread pool costs far more than it
gives (a 2-thread forward+backward of an 8 × 50 batch took 50× longer than a 1-thread one).
The previous setting is restored after each module.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="module")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
