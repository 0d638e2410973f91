"""Each differentiable collective against its definition, forward and backward (adjoint).

Rank ``r`` holds ``SIZES[r]`` rows (one rank holds none). The global objective is the sum of
every rank's local objective ``L_r = ⟨op(input_r), upstream_r⟩``, so the correct gradient of
``input_r`` is written out from every rank's data, regenerated deterministically in each rank.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed as dist

from workers.head import HeadShard
from workers.head._collectives import all_reduce_sum, gather_rows, local_rows, scatter_rows_sum
from workers.seeding import derive_seed

SIZES = [2, 0, 3]
WIDTH = 3


def _data(kind: str, rank: int, rows: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(derive_seed(kind, rank))
    return torch.randn(rows, WIDTH, generator=generator, dtype=torch.float64)


def _worker(rank: int, world_size: int) -> None:
    shard = HeadShard(0, 1, rank, world_size, dist.group.WORLD)
    total, start = sum(SIZES), sum(SIZES[:rank])
    mine = slice(start, start + SIZES[rank])
    check = torch.testing.assert_close

    local = _data("local", rank, SIZES[rank]).requires_grad_()
    gathered = gather_rows(local, SIZES, shard)
    check(gathered, torch.cat([_data("local", q, n) for q, n in enumerate(SIZES)]))
    (gathered * _data("up", rank, total)).sum().backward()
    check(local.grad, sum(_data("up", q, total)[mine] for q in range(world_size)))

    full = _data("full", rank, total).requires_grad_()
    scattered = scatter_rows_sum(full, SIZES, shard)
    check(scattered, sum(_data("full", q, total)[mine] for q in range(world_size)))
    (scattered * _data("down", rank, SIZES[rank])).sum().backward()
    check(full.grad, torch.cat([_data("down", q, n) for q, n in enumerate(SIZES)]))

    replicated = _data("replicated", 0, total).requires_grad_()
    sliced = local_rows(replicated, SIZES, shard)
    check(sliced, replicated.detach()[mine])
    (sliced * _data("down", rank, SIZES[rank])).sum().backward()
    check(replicated.grad, torch.cat([_data("down", q, n) for q, n in enumerate(SIZES)]))

    value = _data("scalar", rank, 1).sum().requires_grad_()
    reduced = all_reduce_sum(value, shard)
    check(reduced, sum(_data("scalar", q, 1).sum() for q in range(world_size)))
    (3.0 * reduced).backward()
    check(value.grad, torch.tensor(3.0, dtype=torch.float64))


@pytest.mark.slow
def test_collectives_match_their_definitions_on_three_ranks(gloo_runner: Any) -> None:
    gloo_runner(_worker, len(SIZES))


def test_single_rank_ops_are_the_identity() -> None:
    shard = HeadShard(0, 4)
    tensor = torch.randn(4, WIDTH)
    for op in (gather_rows, scatter_rows_sum, local_rows):
        assert op(tensor, [4], shard) is tensor
    assert all_reduce_sum(tensor, shard) is tensor
