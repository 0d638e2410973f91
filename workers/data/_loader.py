"""This rank's batches of one epoch, decoded in data-loader processes or in this process.

``EpochBatches`` is a map-style dataset whose item ``s`` is step ``s`` of one epoch on one rank:
the sample indices ``epoch_batches`` gives it, read as raw inputs (``uint8`` pixels for decoded
images) and flipped with a generator seeded from ``(seed, epoch, rank, s)``. The flips are a
function of the step alone, so every process that builds step ``s`` builds it bitwise alike.

``batch_loader`` yields the steps in order: from ``torch.utils.data.DataLoader`` worker
processes that decode ahead of the training thread (``workers > 0``: prefetching, pinned
memory on accelerators), or in this process (``workers = 0``). ``to_device`` moves a raw batch
to the device and normalises it there, so only ``uint8`` pixels cross process boundaries.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch.utils.data import DataLoader, Dataset

from workers.seeding import derive_seed

from ._dataset import LabelledDataset, normalise_inputs
from ._split import epoch_batches

#: batches each loader process prepares ahead of the training thread
PREFETCH_BATCHES = 4

Batch = tuple[torch.Tensor, torch.Tensor]


class EpochBatches(Dataset):
    """Step ``s`` of ``epoch`` on ``rank``: ``(raw inputs, labels)`` (see the module docstring)."""

    def __init__(self, dataset: LabelledDataset, batch_size: int, rank: int, world_size: int,
                 epoch: int, seed: int) -> None:
        self.dataset, self.rank, self.epoch, self.seed = dataset, rank, epoch, seed
        self.indices = epoch_batches(len(dataset), batch_size, rank, world_size, epoch, seed)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, step: int) -> Batch:
        generator = torch.Generator().manual_seed(
            derive_seed("augment", self.seed, self.epoch, self.rank, step))
        return self.dataset.raw_batch(self.indices[step], generator)


def batch_loader(batches: EpochBatches, workers: int, device: torch.device) -> Iterable[Batch]:
    """The steps of ``batches`` in order, from ``workers`` loader processes (0: in process)."""
    if workers == 0:
        return (batches[step] for step in range(len(batches)))
    return DataLoader(batches, batch_size=None, shuffle=False, num_workers=workers,
                      pin_memory=device.type == "cuda", prefetch_factor=PREFETCH_BATCHES)


def to_device(batch: Batch, device: torch.device) -> Batch:
    """``(model inputs, labels)`` on ``device``, normalised there (``normalise_inputs``)."""
    inputs, labels = batch
    return (normalise_inputs(inputs.to(device, non_blocking=True)),
            labels.to(device, non_blocking=True))


def loader_workers(configured: int | None, cpus_per_worker: float) -> int:
    """``data.loader_workers``, or auto: one loader process per whole CPU a Train worker has
    beyond the one its training thread uses (so 0, in process, below 2 CPUs)."""
    return configured if configured is not None else max(0, int(cpus_per_worker) - 1)
