"""The data-loader path delivers bitwise the batches of the in-process path.

A RecordIO set with real JPEG payloads (flip augmentation on) is read through
``EpochBatches`` by ``batch_loader`` with 0 (in process) and 2 loader processes, at world sizes
1 and 2; inputs, labels and flips must be identical, steps depend only on (seed, epoch, rank,
step) so a resumed run sees the same batches, and only ``uint8`` pixels come out of the loader.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.workers.data._data_helpers import random_jpegs
from workers.data import (
    EpochBatches,
    batch_loader,
    load_recordio,
    loader_workers,
    to_device,
    write_recordio,
)

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def jpeg_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("jpeg-rec")
    labels = [index % 7 for index in range(45)]
    write_recordio(directory, random_jpegs(45), labels, (16, 16))
    return directory


def _collect(batches: EpochBatches, workers: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [to_device(batch, CPU) for batch in batch_loader(batches, workers, CPU)]


@pytest.mark.parametrize("world_size", [1, 2])
def test_loader_processes_yield_the_in_process_batches(jpeg_set: Path, world_size: int) -> None:
    dataset = load_recordio(jpeg_set, image_size=12, channels=3, flip=True)
    for rank in range(world_size):
        batches = EpochBatches(dataset, 8, rank, world_size, epoch=3, seed=5)
        raw = [batches[step][0] for step in range(len(batches))]
        assert all(images.dtype == torch.uint8 for images in raw)
        in_process, loaded = _collect(batches, 0), _collect(batches, 2)
        assert len(in_process) == len(loaded) == len(batches) >= 2
        for (expected, expected_labels), (got, got_labels) in zip(in_process, loaded,
                                                                  strict=True):
            assert got.dtype == torch.float32 and torch.equal(got, expected)
            assert torch.equal(got_labels, expected_labels)
        # the same as the dataset's own normalised, flipped batch for that step's generator
        first_indices = batches.indices[0]
        assert torch.equal(in_process[0][1], dataset.labels[first_indices])


def test_flips_happen_and_depend_only_on_the_step(jpeg_set: Path) -> None:
    dataset = load_recordio(jpeg_set, image_size=12, channels=3, flip=True)
    plain = load_recordio(jpeg_set, image_size=12, channels=3)
    batches = EpochBatches(dataset, 45, 0, 1, epoch=0, seed=1)
    images, _ = batches[0]
    unflipped = plain.raw_inputs(batches.indices[0])
    flipped = (images != unflipped).flatten(1).any(1)
    assert torch.equal(images[flipped], unflipped[flipped].flip(-1))
    assert 0 < int(flipped.sum()) < len(images)
    # a resumed run rebuilds the step from scratch: bitwise the same batch
    again = EpochBatches(dataset, 45, 0, 1, epoch=0, seed=1)[0][0]
    assert torch.equal(again, images)
    assert not torch.equal(EpochBatches(dataset, 45, 0, 1, epoch=1, seed=1)[0][0], images)


def test_auto_loader_workers_from_cpus_per_worker() -> None:
    assert [loader_workers(None, cpus) for cpus in (0.45, 1.0, 2.0, 4.5)] == [0, 0, 1, 3]
    assert loader_workers(2, 0.5) == 2
