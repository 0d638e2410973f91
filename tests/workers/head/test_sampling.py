"""Partial FC sampling: a pure function of the global labels, the shard and a generator."""

from __future__ import annotations

import pytest
import torch

from workers.head import HeadShard, sample_classes
from workers.seeding import derive_seed

SHARD = HeadShard(start=10, stop=30)


def _generator(seed: int = 0, step: int = 0, rank: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed("sample", seed, step, rank))


def _positives(labels: torch.Tensor, shard: HeadShard) -> torch.Tensor:
    return labels[(labels >= shard.start) & (labels < shard.stop)].unique() - shard.start


@pytest.mark.parametrize("num_sample", [0, 3, 8, 15, 20, 25])
@pytest.mark.parametrize("labels", [[], [0, 5, 9], [12, 12, 29, 3, 17, 10, 40, 29],
                                    list(range(10, 30)) * 2])
def test_invariants(labels: list[int], num_sample: int) -> None:
    """Positives kept; sorted unique; ``min(shard, max(num_sample, #pos))`` rows; remapping."""
    labels_t = torch.tensor(labels, dtype=torch.long)
    before = labels_t.clone()
    index, target = sample_classes(labels_t, SHARD, num_sample, _generator())
    assert torch.equal(labels_t, before)
    positives = _positives(labels_t, SHARD)
    assert len(index) == min(SHARD.size, max(num_sample, len(positives)))
    assert torch.equal(index, index.unique())
    assert bool(((index >= 0) & (index < SHARD.size)).all())
    assert bool(torch.isin(positives, index).all())
    weight = torch.randn(SHARD.size, 3)
    own = (labels_t >= SHARD.start) & (labels_t < SHARD.stop)
    assert torch.equal(target >= 0, own)
    assert torch.equal(weight[index][target[own]], weight[labels_t[own] - SHARD.start])


def test_batch_strategy_is_only_the_positives() -> None:
    labels = torch.tensor([29, 11, 11, 3, 40, 20])
    index, _ = sample_classes(labels, SHARD, 0, None)
    assert index.tolist() == [1, 10, 19]


def test_whole_shard_draws_nothing() -> None:
    index, _ = sample_classes(torch.tensor([15]), SHARD, SHARD.size, None)
    assert torch.equal(index, torch.arange(SHARD.size))


def test_random_fill_needs_a_generator() -> None:
    with pytest.raises(ValueError, match="generator"):
        sample_classes(torch.tensor([15]), SHARD, 5, None)


def test_reproducible_and_different_across_steps_and_ranks() -> None:
    labels = torch.tensor([12, 25])
    draw = lambda **key: sample_classes(labels, SHARD, 8, _generator(**key)).index  # noqa: E731
    assert torch.equal(draw(seed=1, step=4, rank=2), draw(seed=1, step=4, rank=2))
    others = [draw(seed=1, step=5, rank=2), draw(seed=1, step=4, rank=3),
              draw(seed=2, step=4, rank=2)]
    assert all(not torch.equal(draw(seed=1, step=4, rank=2), other) for other in others)
    assert len({derive_seed("sample", 0, step, rank) for step in range(50) for rank in range(8)}) \
        == 400


def test_fill_is_uniform_over_the_other_classes() -> None:
    """Over 3000 draws, each of the 18 non-positive rows is picked ≈ 6/18 of the time."""
    labels = torch.tensor([10, 29])
    counts = torch.zeros(SHARD.size)
    for step in range(3000):
        counts[sample_classes(labels, SHARD, 8, _generator(step=step)).index] += 1
    assert counts[0] == counts[19] == 3000
    frequency = counts[1:19] / 3000
    assert bool(((frequency - 6 / 18).abs() < 0.04).all()), frequency
