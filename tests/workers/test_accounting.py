"""Analytic compute and communication against hand counts."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist

from workers.accounting import (
    data_parallel_bytes_per_step,
    head_bytes_per_step,
    head_flops_per_sample,
)
from workers.head import SampledSoftmaxHead
from workers.losses import build_loss

DIM, LOCAL_BATCH = 6, 5


def test_head_flops_are_four_products_of_2dk() -> None:
    assert head_flops_per_sample(512, 1000) == 4 * 2 * 512 * 1000
    # a sample ratio of 0.1 costs a tenth of the head
    assert head_flops_per_sample(128, 100) / head_flops_per_sample(128, 1000) == pytest.approx(0.1)


def test_single_process_communicates_nothing() -> None:
    assert head_bytes_per_step(1, 256, 512, 4) == 0.0
    assert data_parallel_bytes_per_step(1, 10_000) == 0.0


def test_head_bytes_by_hand_for_two_ranks() -> None:
    batch, dim = 8, 4
    # ring share (W-1)/W = 1/2 of: embeddings B·D forward + B·D backward (bf16: 2 bytes)
    embeddings = 0.5 * 2 * batch * dim * 2
    # 5 int64 of batch shape per rank, B int64 labels
    int64 = 0.5 * (5 * 2 + batch) * 8
    # float32 per-row terms: target pair forward and backward (2B each), LSE gradient (B)
    per_row = 0.5 * (2 * batch + 2 * batch + batch) * 4
    # all-reduces (twice the ring share): row max and sum-exp (B each) and the loss
    all_reduces = 2 * 0.5 * (2 * batch + 1) * 4
    assert head_bytes_per_step(2, batch, dim, 2) == embeddings + int64 + per_row + all_reduces


def _spied_head_step(rank: int, world_size: int, precision: str, out: Path) -> None:
    """One forward + backward of the head with every collective's ring bytes summed."""
    sent = []

    def spy(name: str, original: Any) -> Any:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if name == "all_gather":
                sent.append((world_size - 1) * args[1].nbytes)
            elif name == "reduce_scatter":
                sent.append((world_size - 1) * args[0].nbytes)
            else:  # all_reduce
                sent.append(2 * (world_size - 1) / world_size * args[0].nbytes)
            return original(*args, **kwargs)
        return wrapper

    for name in ("all_gather", "reduce_scatter", "all_reduce"):
        setattr(dist, name, spy(name, getattr(dist, name)))
    head = SampledSoftmaxHead(DIM, 23, build_loss("arcface"), sample_ratio=0.5,
                              process_group=dist.group.WORLD)
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(LOCAL_BATCH, DIM, generator=generator, requires_grad=True)
    labels = torch.randint(23, (LOCAL_BATCH,), generator=generator)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16")
    with autocast:
        loss = head(x, labels)
    loss.backward()
    (out / f"{rank}.json").write_text(json.dumps(sum(sent)))


@pytest.mark.slow
@pytest.mark.parametrize("world_size", [2, 3])
@pytest.mark.parametrize(("precision", "element_bytes"), [("fp32", 4), ("bf16", 2)])
def test_head_bytes_equal_what_the_collectives_send(gloo_runner: Any, tmp_path: Path,
                                                    world_size: int, precision: str,
                                                    element_bytes: int) -> None:
    gloo_runner(_spied_head_step, world_size, precision, tmp_path)
    expected = head_bytes_per_step(world_size, LOCAL_BATCH * world_size, DIM, element_bytes)
    for rank in range(world_size):
        assert json.loads((tmp_path / f"{rank}.json").read_text()) == pytest.approx(
            expected, rel=1e-12), rank


def test_data_parallel_all_reduce_is_twice_the_ring_share() -> None:
    assert data_parallel_bytes_per_step(4, 1000) == 2 * 0.75 * 1000 * 4
