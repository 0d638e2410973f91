"""Contiguous, uneven class partition."""

from __future__ import annotations

import itertools

import pytest

from workers.head import HeadShard, partition_n_into_range


@pytest.mark.parametrize("world_size", [1, 3, 7, 8])
@pytest.mark.parametrize("n", [10, 1023, 10575])
def test_ranges_tile_contiguously_and_differ_by_at_most_one(n: int, world_size: int) -> None:
    ranges = partition_n_into_range(n, world_size)
    assert len(ranges) == world_size
    assert ranges[0][0] == 0 and ranges[-1][1] == n
    assert all(stop == start for (_, stop), (start, _) in itertools.pairwise(ranges))
    sizes = [stop - start for start, stop in ranges]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


def test_fewer_items_than_ranks_gives_empty_ranges() -> None:
    assert partition_n_into_range(2, 3) == [(0, 1), (1, 2), (2, 2)]


@pytest.mark.parametrize(("n", "world_size", "match"), [
    (5, 0, r"^world_size = 0 must be >= 1$"),
    (-1, 2, r"^n = -1 must be >= 0$"),
])
def test_partition_errors(n: int, world_size: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        partition_n_into_range(n, world_size)


def test_shard_without_group_is_the_whole_range() -> None:
    shard = HeadShard.from_num_classes(11, None)
    assert (shard.start, shard.stop, shard.rank, shard.world_size, shard.size) == (0, 11, 0, 1, 11)
    assert shard.group is None


def test_shard_needs_a_class_per_rank() -> None:
    with pytest.raises(ValueError, match=r"^num_classes = 0 must be >= the world size 1$"):
        HeadShard.from_num_classes(0, None)
