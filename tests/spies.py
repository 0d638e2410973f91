"""Spies on ``torch.distributed`` collectives, for tests that run inside gloo ranks."""

from __future__ import annotations

from typing import Any

import torch.distributed as dist

#: the collectives the head and the sharded evaluation call
COLLECTIVES = ("all_gather", "all_reduce", "reduce_scatter")


def record_collective_groups(group: dist.ProcessGroup) -> list[bool]:
    """Wrap every collective in ``COLLECTIVES`` (in this process, from now on); the returned
    list grows by one entry per call: whether the call was given ``group=group``."""
    seen: list[bool] = []

    def recording(original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            seen.append(kwargs.get("group") is group)
            return original(*args, **kwargs)
        return wrapper

    for name in COLLECTIVES:
        setattr(dist, name, recording(getattr(dist, name)))
    return seen
