"""Identity-disjoint splits and per-worker epoch sharding (property-style over many sizes)."""

from __future__ import annotations

import itertools

import pytest
import torch

from workers.data import (
    LabelledDataset,
    TensorDataset,
    epoch_batches,
    split_dataset,
    split_identities,
)
from workers.seeding import derive_seed


def _reference_split_identities(groups: torch.Tensor, heldout_fraction: float,
                                seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The O(K²) split as it was before issue 14 (one ``==`` scan per group)."""
    unique = torch.unique(groups)
    generator = torch.Generator().manual_seed(derive_seed("split", seed))
    order = unique[torch.randperm(len(unique), generator=generator)]
    target = max(1, round(heldout_fraction * len(groups)))
    sizes = torch.stack([(groups == group).sum() for group in order])
    taken = int(torch.searchsorted(torch.cumsum(sizes, 0), target)) + 1
    taken = min(taken, len(order) - 1)
    heldout_mask = torch.isin(groups, order[:taken])
    identities = torch.arange(len(groups))
    return identities[~heldout_mask], identities[heldout_mask]


def _reference_split_dataset(dataset: TensorDataset, heldout_fraction: float, seed: int,
                             groups: torch.Tensor | None) -> tuple[LabelledDataset, ...]:
    """``split_dataset`` as it was before issue 14 (``isin`` + ``searchsorted`` relabelling)."""
    present = torch.unique(dataset.labels)
    group_of = present if groups is None else groups[present]
    sides = []
    for side in _reference_split_identities(group_of, heldout_fraction, seed):
        identities = present[side]
        indices = torch.nonzero(torch.isin(dataset.labels, identities)).flatten()
        sides.append(dataset.subset(indices, torch.searchsorted(identities,
                                                                dataset.labels[indices])))
    return tuple(sides)


def _grouped_inputs(case: int) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Identity labels with gaps (non-contiguous) and, for odd cases, non-contiguous group ids
    shared by several identities; ``None`` groups for even cases."""
    generator = torch.Generator().manual_seed(case)
    num_identities = int(torch.randint(2, 60, (1,), generator=generator))
    labels = torch.randint(0, 3 * num_identities, (5 * num_identities,), generator=generator)
    if case % 2 == 0:
        return labels, None
    num_groups = int(torch.randint(2, 12, (1,), generator=generator))
    group_ids = torch.randperm(1000, generator=generator)[:num_groups] * 7 - 50
    return labels, group_ids[torch.randint(0, num_groups, (3 * num_identities,),
                                           generator=generator)]


FRACTIONS = [0.01, 0.1, 0.2, 0.33, 0.5, 0.77, 0.99]


@pytest.mark.parametrize("fraction", FRACTIONS)
def test_split_identities_equals_the_reference(fraction: float) -> None:
    for seed in range(25):
        generator = torch.Generator().manual_seed(seed)
        num = int(torch.randint(2, 300, (1,), generator=generator))
        group_count = int(torch.randint(2, num + 1, (1,), generator=generator))
        cases = [torch.arange(num),  # plain identities
                 torch.randint(0, group_count, (num,), generator=generator),
                 torch.randint(-10**6, 10**6, (group_count,), generator=generator)[
                     torch.randint(0, group_count, (num,), generator=generator)]]
        for groups in cases:
            if len(torch.unique(groups)) < 2:
                continue
            expected = _reference_split_identities(groups, fraction, seed)
            actual = split_identities(groups, fraction, seed)
            assert all(torch.equal(a, e) for a, e in zip(actual, expected, strict=True)), (
                seed, groups)


@pytest.mark.parametrize("case", range(12))
def test_split_dataset_equals_the_reference(case: int) -> None:
    labels, groups = _grouped_inputs(case)
    dataset = TensorDataset(torch.arange(len(labels), dtype=torch.float32).unsqueeze(1), labels)
    present_groups = groups[torch.unique(labels)] if groups is not None else torch.unique(labels)
    if len(torch.unique(present_groups)) < 2:
        pytest.fail("the case generator must give ≥ 2 groups")
    for fraction, seed in itertools.product(FRACTIONS, range(6)):
        expected = _reference_split_dataset(dataset, fraction, seed, groups)
        actual = split_dataset(dataset, fraction, seed, groups)
        for part, reference in zip(actual, expected, strict=True):
            assert torch.equal(part.data, reference.data)
            assert torch.equal(part.labels, reference.labels)


@pytest.mark.parametrize(("num_identities", "fraction"), [(2, 0.5), (10, 0.2), (97, 0.3),
                                                          (1000, 0.05), (5, 0.99)])
def test_split_identities_is_a_disjoint_cover(num_identities: int, fraction: float) -> None:
    train, heldout = split_identities(torch.arange(num_identities), fraction, seed=1)
    assert torch.equal(torch.sort(torch.cat([train, heldout])).values,
                       torch.arange(num_identities))
    assert len(heldout) == max(1, min(num_identities - 1, round(fraction * num_identities)))
    assert torch.equal(train, torch.sort(train).values)
    again = split_identities(torch.arange(num_identities), fraction, seed=1)
    assert torch.equal(again[1], heldout)


def test_split_depends_on_seed() -> None:
    splits = {tuple(split_identities(torch.arange(50), 0.2, seed)[1].tolist()) for seed in range(5)}
    assert len(splits) == 5


def test_whole_groups_are_held_out() -> None:
    groups = torch.tensor([0] * 5 + [1] * 3 + [2] * 7 + [3] * 5)
    for seed in range(10):
        train, heldout = split_identities(groups, 0.3, seed)
        assert not set(groups[train].tolist()) & set(groups[heldout].tolist())
        assert len(heldout) >= 6 and len(train) > 0


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5])
def test_bad_fraction(bad: float) -> None:
    with pytest.raises(ValueError, match="heldout_fraction"):
        split_identities(torch.arange(4), bad, 0)


def test_zero_fraction_holds_out_nothing() -> None:
    train, heldout = split_identities(torch.tensor([3, 3, 8]), 0.0, seed=0)
    assert torch.equal(train, torch.arange(3)) and heldout.numel() == 0
    labels = torch.tensor([5, 5, 9, 2])
    train_set, heldout_set = split_dataset(TensorDataset(torch.arange(4.0).unsqueeze(1), labels),
                                           0.0, seed=0)
    assert torch.equal(train_set.labels, torch.tensor([1, 1, 2, 0]))
    assert len(heldout_set) == 0 and heldout_set.data.shape == (0, 1)


def test_split_dataset_relabels_each_side() -> None:
    labels = torch.tensor([5, 5, 9, 2, 2, 2, 7, 9, 11, 11])
    inputs = torch.arange(10.0).unsqueeze(1)
    train, heldout = split_dataset(TensorDataset(inputs, labels), 0.4, seed=3)
    for part in (train, heldout):
        classes = torch.unique(part.labels)
        assert torch.equal(classes, torch.arange(len(classes)))
    original = {int(x): int(y) for x, y in zip(inputs.flatten(), labels, strict=True)}
    train_ids = {original[int(x)] for x in train.data.flatten()}
    heldout_ids = {original[int(x)] for x in heldout.data.flatten()}
    assert not train_ids & heldout_ids and train_ids | heldout_ids == {2, 5, 7, 9, 11}
    assert len(train) + len(heldout) == 10
    for part, ids in ((train, sorted(train_ids)), (heldout, sorted(heldout_ids))):
        for x, y in zip(part.data.flatten(), part.labels, strict=True):
            assert ids[int(y)] == original[int(x)]


CASES = [(n, b, w) for n, b, w in itertools.product([1, 2, 7, 10, 64, 65, 127, 1000],
                                                    [1, 3, 8, 32], [1, 2, 3, 4]) if n >= w]


@pytest.mark.parametrize(("num_samples", "batch_size", "world_size"), CASES)
def test_epoch_batches_cover_every_sample_once(num_samples: int, batch_size: int,
                                               world_size: int) -> None:
    per_rank = [epoch_batches(num_samples, batch_size, rank, world_size, epoch=2, seed=7)
                for rank in range(world_size)]
    steps = {len(batches) for batches in per_rank}
    assert len(steps) == 1
    for step in range(steps.pop()):
        sizes = [len(batches[step]) for batches in per_rank]
        assert min(sizes) >= 1 and max(sizes) - min(sizes) <= 1
        assert max(sizes) <= 2 * batch_size
    union = torch.cat([torch.cat(batches) for batches in per_rank])
    assert torch.equal(torch.sort(union).values, torch.arange(num_samples))


def test_epoch_batches_order_depends_on_epoch_and_seed_only() -> None:
    def order(epoch: int, seed: int) -> list[int]:
        return torch.cat(epoch_batches(100, 8, 1, 3, epoch, seed)).tolist()

    assert order(0, 0) == order(0, 0)
    assert order(0, 0) != order(1, 0)
    assert order(0, 0) != order(0, 1)


def test_small_remainder_is_merged_large_remainder_kept() -> None:
    merged = epoch_batches(2 * 8 * 10 + 3, 10, 0, 2, epoch=0, seed=0)
    assert [len(b) for b in merged] == [10] * 7 + [12]
    kept = epoch_batches(2 * 8 * 10 + 12, 10, 0, 2, epoch=0, seed=0)
    assert [len(b) for b in kept] == [10] * 8 + [6]


def test_fewer_samples_than_workers() -> None:
    with pytest.raises(ValueError, match="non-empty batch"):
        epoch_batches(2, 8, 0, 3, epoch=0, seed=0)


@pytest.mark.parametrize(("rank", "world_size", "batch"), [(2, 2, 4), (-1, 2, 4), (0, 0, 4),
                                                            (0, 2, 0)])
def test_epoch_batches_rejects_bad_arguments(rank: int, world_size: int, batch: int) -> None:
    with pytest.raises(ValueError, match="rank"):
        epoch_batches(100, batch, rank, world_size, epoch=0, seed=0)
