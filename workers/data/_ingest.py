"""Ray Data ingest of packed shards (``data.source: shards``): the driver's dataset, a worker's
batches.

Driver (``train_ingest``, where the ``TorchTrainer`` is built): one input row per train shard
(from the manifest), in a new seeded order every epoch; one Ray task per shard reads it row
group by row group and decodes + randomly flips its images, on any node's CPUs, within
``data.ray_data_cpus`` logical CPUs per trial; the output is ``uint8`` pixels (normalised on
the device by ``to_device``). Worker (``shard_batches``): ``iter_torch_batches(drop_last=True)``
on its split, exactly ``shard_steps`` batches per epoch on every rank.

Ray 2.60, verified in the installed source and the docs (``search``), and by
``tests/workers/test_shards_train.py`` and ``tests/study/test_shards_study.py``:

- ``TorchTrainer(datasets=, dataset_config=)`` (ray/train/v2/torch/torch_trainer.py). Train V2
  builds the splits in a ``DatasetManager`` actor started by the controller, also when the
  trainer runs inside a Tune function trainable; ``ray.train.get_dataset_shard("train")`` is a
  barrier across the ranks on first call, then cached.
- ``ray.train.DataConfig.configure`` splits "train" with ``streaming_split(world_size,
  equal=True)`` (ray/train/_internal/data_config.py); the ``OutputSplitter`` then gives every
  rank exactly ⌊N/W⌋ rows (the remainder is dropped), so ``drop_last`` batches of B give
  ⌊⌊N/W⌋/B⌋ equal steps on every rank, known before training from the manifest.
- ``DataConfig(execution_options=ExecutionOptions(resource_limits=
  ExecutionResources.for_limits(cpu=L)))`` replaces the ``DataContext`` defaults for that
  dataset (``_resolve_execution_options``); the streaming executor keeps its tasks within L
  logical CPUs (``ResourceManager.get_global_limits``: ``min(limits, cluster)``).
- Not ``ray.data.read_parquet``: in 2.60 it plans ``ListFiles → ReadFiles`` (DataSourceV2,
  ``DataContext.use_datasource_v2`` defaults to True) and the ``ListFiles`` task of every
  execution takes 1 whole CPU whatever ``num_cpus`` says (plan_list_files_op.py passes no
  ``num_cpus``; ``MapOperator`` defaults to 1). With fractional budgets (two trials of 0.4 CPU
  on 2 cores) it never schedules: the concurrent study hung with ``ray status`` showing
  ``{'CPU': 1.0}`` pending ``ListFiles``. The V1 reader samples files in 1-CPU tasks when
  called. ``from_items`` makes no task, ``randomize_block_order(RandomSeedConfig(seed,
  reseed_after_execution=True))`` only reorders block references (a seeded new order per
  execution), and ``map_batches(num_cpus=)`` is the only task, so the budget holds exactly.
- ``map_batches`` takes a generator function (several output batches per input row).
- ``iter_torch_batches(batch_size, drop_last, prefetch_batches, local_shuffle_buffer_size,
  local_shuffle_seed, device, pin_memory)``; a string column cannot become a tensor, so the
  decode outputs numeric columns only.
- An exception in a UDF reaches the consumer as a multi-line
  ``RayTaskError(UserCodeException)`` without the original exception object, so the decode
  does not raise on a corrupt image: it marks it (column ``corrupt``) and the worker raises
  the one-line error naming the shard and row.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from workers.seeding import derive_seed

from ._dataset import decode_image_pixels, random_flip
from ._load import parse_data_config
from ._loader import PREFETCH_BATCHES, Batch
from ._shards import PackedShards, open_shards

#: rows decoded into one output block (this many images cross to a worker at a time)
DECODE_BATCH_ROWS = 256
#: a worker's local shuffle buffer, in batches (on top of the pack's global shuffle and the
#: per-epoch file order)
SHUFFLE_BUFFER_BATCHES = 8
#: ``corrupt`` holds ``shard << 32 | row`` for an image that did not decode, else this
_DECODED = -1


def ingest_cpus(data: dict[str, Any]) -> float:
    """Logical CPUs one trial's Ray Data ingest may use at once: ``data.ray_data_cpus`` for
    source ``shards``, 0 for every other source (they decode in the Train workers)."""
    config = parse_data_config(data)
    return config.ray_data_cpus if config.source == "shards" else 0.0


def train_ingest(data: dict[str, Any], seed: int) -> tuple[dict[str, Any] | None, Any]:
    """``(datasets, dataset_config)`` for ``TorchTrainer``: the decoded train shards and
    their CPU budget for source ``shards``, ``(None, None)`` otherwise."""
    config = parse_data_config(data)
    if config.source != "shards":
        return None, None
    import ray.data
    import ray.train
    from ray.data import ExecutionOptions, ExecutionResources, RandomSeedConfig

    shards = open_shards(config.path or "")
    files = [{"file": str(path)} for path in shards.files("train")]
    order = RandomSeedConfig(seed=derive_seed("shard-files", seed) % 2**32,
                             reseed_after_execution=True)
    dataset = ray.data.from_items(files, override_num_blocks=len(files))
    dataset = dataset.randomize_block_order(seed=order).map_batches(
        read_shards, batch_size=1, batch_format="numpy", num_cpus=min(1.0, config.ray_data_cpus),
        fn_kwargs={"image_size": shards.manifest.image_size,
                   "channels": shards.manifest.channels, "flip": config.flip})
    limits = ExecutionResources.for_limits(cpu=config.ray_data_cpus)
    return {"train": dataset}, ray.train.DataConfig(
        execution_options=ExecutionOptions(resource_limits=limits))


def read_shards(batch: dict[str, np.ndarray], image_size: int, channels: int,
                flip: bool) -> Iterator[dict[str, np.ndarray]]:
    """The rows of each shard ``file`` in ``batch``, row group by row group, decoded
    ``DECODE_BATCH_ROWS`` at a time (``decode_shard_rows``)."""
    for file in batch["file"]:
        parquet = pq.ParquetFile(str(file))
        for group in range(parquet.num_row_groups):
            table = parquet.read_row_group(group, columns=["image", "label", "shard", "row"])
            for start in range(0, table.num_rows, DECODE_BATCH_ROWS):
                yield decode_shard_rows(table.slice(start, DECODE_BATCH_ROWS), image_size,
                                        channels, flip)


def decode_shard_rows(table: pa.Table, image_size: int, channels: int,
                      flip: bool) -> dict[str, np.ndarray]:
    """Shard rows → ``image`` ``(B, C, S, S)`` uint8 (flipped at random when ``flip``),
    ``label`` and ``corrupt`` (``shard << 32 | row`` where an image did not decode, else −1;
    its pixels are zero).

    Flips draw fresh entropy: Ray Data hands blocks to ranks as they ask for them, so this
    path is not bitwise reproducible anyway, and each epoch flips anew.
    """
    count = table.num_rows
    images = np.zeros((count, channels, image_size, image_size), dtype=np.uint8)
    corrupt = np.full(count, _DECODED, dtype=np.int64)
    shards, rows = (table.column(name).to_numpy() for name in ("shard", "row"))
    for index, data in enumerate(table.column("image").to_pylist()):
        try:
            images[index] = decode_image_pixels(data, image_size, channels, "").numpy()
        except ValueError:
            corrupt[index] = int(shards[index]) << 32 | int(rows[index])
    pixels = torch.from_numpy(images)
    if flip:
        generator = torch.Generator()
        generator.seed()
        pixels = random_flip(pixels, generator)
    return {"image": pixels.numpy(), "label": table.column("label").to_numpy().astype(np.int64),
            "corrupt": corrupt}


def shard_steps(rows: int, world_size: int, batch_size: int) -> int:
    """Batches per epoch on every rank: ⌊⌊rows / world_size⌋ / batch_size⌋ (equal split,
    ``drop_last``); ``ValueError`` when that is 0."""
    steps = rows // world_size // batch_size
    if steps == 0:
        raise ValueError(f"{rows} train rows give each of {world_size} workers "
                         f"{rows // world_size}, fewer than batch_size = {batch_size}")
    return steps


def shard_batches(iterator: Any, shards: PackedShards, batch_size: int, steps: int, seed: int,
                  epoch: int, rank: int, device: torch.device) -> Iterator[Batch]:
    """This rank's ``steps`` raw ``(uint8 images, labels)`` batches of ``epoch`` from its Ray
    Data split (``ray.train.get_dataset_shard("train")``), locally shuffled with a seed of
    ``(seed, epoch, rank)``, on the CPU (pinned for a CUDA ``device``).

    The stream is drained with the last batch (it ends there: equal splits, ``drop_last``);
    a batch count other than ``steps``, or a corrupt image, is a one-line ``ValueError``.
    """
    batches = iter(iterator.iter_torch_batches(
        batch_size=batch_size, drop_last=True, prefetch_batches=PREFETCH_BATCHES,
        local_shuffle_buffer_size=SHUFFLE_BUFFER_BATCHES * batch_size,
        local_shuffle_seed=derive_seed("shard-shuffle", seed, epoch, rank) % 2**32,
        device="cpu", pin_memory=device.type == "cuda"))
    for step in range(steps):
        batch = next(batches, None)
        if batch is None or (step == steps - 1 and next(batches, None) is not None):
            got = step if batch is None else f"more than {steps}"
            raise ValueError(f"rank {rank} got {got} batches in epoch {epoch} from the shards "
                             f"at {shards.root}, expected {steps} (equal splits)")
        _raise_on_corrupt(batch["corrupt"], shards)
        yield batch["image"], batch["label"]


def _raise_on_corrupt(corrupt: torch.Tensor, shards: PackedShards) -> None:
    marked = corrupt[corrupt != _DECODED]
    if len(marked):
        code = int(marked[0])
        path = shards.files("train")[code >> 32]
        raise ValueError(f"{path}: row {code & 0xFFFFFFFF}: cannot decode image")
