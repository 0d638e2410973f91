"""Data: synthetic identities, image folders, RecordIO, ``.bin`` pairs, Omniglot, Parquet
features, packed Parquet shards streamed by Ray Data; identity-disjoint splits; per-worker
epoch sharding.

The train loop needs ``parse_data_config`` (a dict → ``DataConfig``) → ``load_dataset`` →
``DatasetSplit`` and ``epoch_batches``; the driver ``check_data_config``; the readers and
writers are public for users and tests.
"""

from __future__ import annotations

from ._dataset import (
    DecodedDataset,
    LabelledDataset,
    TensorDataset,
    decode_image,
    decode_image_pixels,
    normalise_inputs,
    random_flip,
)
from ._image_folder import IMAGE_EXTENSIONS, load_image_folder
from ._ingest import (
    decode_shard_rows,
    ingest_cpus,
    read_shards,
    shard_batches,
    shard_steps,
    train_ingest,
)
from ._load import (
    DataConfig,
    DatasetSplit,
    Source,
    check_data_config,
    dataset_key,
    load_dataset,
    parse_data_config,
)
from ._loader import EpochBatches, batch_loader, loader_workers, to_device
from ._omniglot import ALPHABETS, alphabet_of_class, load_omniglot, resolve_omniglot_path
from ._pairs import PairSet, read_pairs_bin, write_pairs_bin
from ._parquet import read_parquet_features, write_parquet_features
from ._recordio import (
    MAGIC,
    RecordIOReader,
    RecordIOWriter,
    cached_labels,
    frame_record,
    load_recordio,
    pack_record,
    read_property,
    unpack_record,
    write_recordio,
)
from ._shards import (
    PackedShards,
    ShardManifest,
    ShardRows,
    check_shards,
    heldout_dataset,
    open_shards,
)
from ._split import epoch_batches, split_dataset, split_identities
from ._synthetic import synthetic_identities

__all__ = [
    "ALPHABETS",
    "IMAGE_EXTENSIONS",
    "MAGIC",
    "DataConfig",
    "DatasetSplit",
    "DecodedDataset",
    "EpochBatches",
    "LabelledDataset",
    "PackedShards",
    "PairSet",
    "RecordIOReader",
    "RecordIOWriter",
    "ShardManifest",
    "ShardRows",
    "Source",
    "TensorDataset",
    "alphabet_of_class",
    "batch_loader",
    "cached_labels",
    "check_data_config",
    "check_shards",
    "dataset_key",
    "decode_image",
    "decode_image_pixels",
    "decode_shard_rows",
    "epoch_batches",
    "frame_record",
    "heldout_dataset",
    "ingest_cpus",
    "load_dataset",
    "load_image_folder",
    "load_omniglot",
    "load_recordio",
    "loader_workers",
    "normalise_inputs",
    "open_shards",
    "pack_record",
    "parse_data_config",
    "random_flip",
    "read_pairs_bin",
    "read_parquet_features",
    "read_property",
    "read_shards",
    "resolve_omniglot_path",
    "shard_batches",
    "shard_steps",
    "split_dataset",
    "split_identities",
    "synthetic_identities",
    "to_device",
    "train_ingest",
    "unpack_record",
    "write_pairs_bin",
    "write_parquet_features",
    "write_recordio",
]
