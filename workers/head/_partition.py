"""Contiguous, uneven-safe partition of the classes over the ranks of a process group."""

from __future__ import annotations

from dataclasses import dataclass

import torch.distributed as dist


def partition_n_into_range(n: int, world_size: int) -> list[tuple[int, int]]:
    """Split ``[0, n)`` into ``world_size`` contiguous ``(start, stop)`` ranges.

    The first ``n mod world_size`` ranges hold ``⌊n / world_size⌋ + 1`` items, the others
    ``⌊n / world_size⌋``: sizes differ by at most one and the ranges tile ``[0, n)`` in rank order.
    """
    if world_size < 1:
        raise ValueError(f"world_size = {world_size} must be >= 1")
    if n < 0:
        raise ValueError(f"n = {n} must be >= 0")
    base, extra = divmod(n, world_size)
    ranges = []
    for rank in range(world_size):
        start = rank * base + min(rank, extra)
        ranges.append((start, start + base + (rank < extra)))
    return ranges


@dataclass(frozen=True)
class HeadShard:
    """The class rows ``[start, stop)`` this rank owns, and the group the shards live in.

    ``group=None`` means a single-process head: ``rank = 0``, ``world_size = 1`` and no
    collective is ever called, even when ``torch.distributed`` is initialised.
    """

    start: int
    stop: int
    rank: int = 0
    world_size: int = 1
    group: dist.ProcessGroup | None = None

    @property
    def size(self) -> int:
        """Number of classes in this shard."""
        return self.stop - self.start

    @classmethod
    def from_num_classes(cls, num_classes: int, group: dist.ProcessGroup | None) -> HeadShard:
        """This rank's shard of ``num_classes`` classes over ``group`` (``None``: one process)."""
        rank, world_size = (0, 1) if group is None else (dist.get_rank(group),
                                                         dist.get_world_size(group))
        if num_classes < world_size:
            raise ValueError(f"num_classes = {num_classes} must be >= the world size {world_size}")
        start, stop = partition_n_into_range(num_classes, world_size)[rank]
        return cls(start, stop, rank, world_size, group)
