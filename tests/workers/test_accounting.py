"""Analytic compute and communication against hand counts."""

from __future__ import annotations

import pytest

from workers.accounting import (
    data_parallel_bytes_per_step,
    head_bytes_per_step,
    head_flops_per_sample,
)


def test_head_flops_are_four_products_of_2dk() -> None:
    assert head_flops_per_sample(512, 1000) == 4 * 2 * 512 * 1000
    # a sample ratio of 0.1 costs a tenth of the head
    assert head_flops_per_sample(128, 100) / head_flops_per_sample(128, 1000) == pytest.approx(0.1)


def test_single_process_communicates_nothing() -> None:
    assert head_bytes_per_step(1, 256, 512, 4) == 0.0
    assert data_parallel_bytes_per_step(1, 10_000) == 0.0


def test_head_bytes_by_hand_for_two_ranks() -> None:
    batch, dim = 8, 4
    # ring share (W-1)/W = 1/2 of: embeddings B·D forward + B·D backward, 5B per-row scalars
    floats = 0.5 * (2 * batch * dim + 5 * batch) * 4
    labels = 0.5 * batch * 8
    lse = 2 * 2 * 0.5 * batch * 4
    loss = 2 * 0.5 * 4
    assert head_bytes_per_step(2, batch, dim, 4) == floats + labels + lse + loss


def test_data_parallel_all_reduce_is_twice_the_ring_share() -> None:
    assert data_parallel_bytes_per_step(4, 1000) == 2 * 0.75 * 1000 * 4
