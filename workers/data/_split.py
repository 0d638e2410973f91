"""Identity-disjoint train / held-out splits and per-worker epoch sharding."""

from __future__ import annotations

import itertools
import math

import torch

from workers.seeding import derive_seed

from ._dataset import LabelledDataset


def split_identities(groups: torch.Tensor, heldout_fraction: float,
                     seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Split identities ``0 … K−1`` into sorted ``(train, heldout)`` identity ids.

    ``groups[k]`` is the group of identity ``k`` (e.g. its alphabet; ``arange(K)`` for plain
    identities); whole groups are held out, in a seeded random order, until at least
    ``round(heldout_fraction · K)`` identities (≥ 1) are held out. At least one group stays
    in training; ``heldout_fraction = 0`` holds out nothing. Cost O(K log K): one
    ``unique`` with counts, a permutation of the G groups and a cumulative sum of their sizes.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise ValueError(f"`0 <= heldout_fraction < 1` must hold, but got {heldout_fraction=}")
    identities = torch.arange(len(groups))
    if heldout_fraction == 0.0:
        return identities, identities[:0]
    unique, group_index, sizes = torch.unique(groups, return_inverse=True, return_counts=True)
    if len(unique) < 2:
        raise ValueError(f"an identity-disjoint split needs ≥ 2 identity groups, got "
                         f"{len(unique)}")
    generator = torch.Generator().manual_seed(derive_seed("split", seed))
    order = torch.randperm(len(unique), generator=generator)
    target = max(1, round(heldout_fraction * len(groups)))
    taken = int(torch.searchsorted(torch.cumsum(sizes[order], 0), target)) + 1
    taken = min(taken, len(order) - 1)
    heldout_group = torch.zeros(len(unique), dtype=torch.bool)
    heldout_group[order[:taken]] = True
    heldout_mask = heldout_group[group_index]
    return identities[~heldout_mask], identities[heldout_mask]


def _relabel(dataset: LabelledDataset, identity_of: torch.Tensor, identities: torch.Tensor,
             num_identities: int, flip: bool) -> LabelledDataset:
    """The samples whose identity (``identity_of[n]`` in ``[0, num_identities)``) is in
    ``identities`` (sorted), labelled by position there: O(N + K)."""
    position = torch.full((num_identities,), -1, dtype=torch.int64)
    position[identities] = torch.arange(len(identities))
    labels = position[identity_of]
    indices = torch.nonzero(labels >= 0).flatten()
    return dataset.subset(indices, labels[indices], flip)


def split_dataset(dataset: LabelledDataset, heldout_fraction: float, seed: int,
                  groups: torch.Tensor | None = None,
                  flip: bool = False) -> tuple[LabelledDataset, LabelledDataset]:
    """Identity-disjoint ``(train, heldout)``; each side relabelled to ``[0, its classes)``.

    Identities are the distinct labels present; ``groups`` (indexed by original label) makes
    whole groups go together. ``flip`` turns on flip augmentation for the train side only.
    One ``unique`` over the N labels, then O(N + K).
    """
    present, identity_of = torch.unique(dataset.labels, return_inverse=True)
    group_of = present if groups is None else groups[present]
    train, heldout = split_identities(group_of, heldout_fraction, seed)
    return (_relabel(dataset, identity_of, train, len(present), flip),
            _relabel(dataset, identity_of, heldout, len(present), False))


def epoch_batches(num_samples: int, batch_size_per_worker: int, rank: int, world_size: int,
                  epoch: int, seed: int) -> list[torch.Tensor]:
    """This rank's sample indices for every step of ``epoch``.

    A seeded permutation of ``0 … N−1`` per ``(seed, epoch)`` is cut into global batches of
    ``B·W`` samples; a final partial batch stays a step of its own when it gives every rank
    at least ``max(1, ⌈B/2⌉)`` samples and is merged into the previous step otherwise. Each
    global batch is split over the ranks in contiguous pieces whose sizes differ by ≤ 1. So
    every rank gets the same number of non-empty batches and each sample appears exactly once
    per epoch over all ranks and steps.
    """
    if batch_size_per_worker < 1 or world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need batch_size_per_worker ≥ 1 and 0 ≤ rank < world_size, got "
                         f"{batch_size_per_worker=}, {rank=}, {world_size=}")
    if num_samples < world_size:
        raise ValueError(f"{num_samples} samples cannot give each of {world_size} workers a "
                         f"non-empty batch")
    global_batch = batch_size_per_worker * world_size
    steps, remainder = divmod(num_samples, global_batch)
    if remainder >= world_size * max(1, math.ceil(batch_size_per_worker / 2)) or steps == 0:
        steps += 1
    bounds = [step * global_batch for step in range(steps)] + [num_samples]
    generator = torch.Generator().manual_seed(derive_seed("epoch", seed, epoch))
    permutation = torch.randperm(num_samples, generator=generator)
    return [torch.tensor_split(permutation[start:stop], world_size)[rank]
            for start, stop in itertools.pairwise(bounds)]
