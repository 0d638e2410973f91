"""The distributed, sampled, chunked softmax head (Partial FC for every loss of the zoo).

``SampledSoftmaxHead(embedding_dim, num_classes, loss, sample_ratio, sampling, process_group)``
then ``loss_value = head(local_embeddings, local_labels)``; ``save_head_checkpoint`` /
``load_head_checkpoint`` (collective) write and restore it at any world size.
"""

from __future__ import annotations

from ._checkpoint import (
    HeadManifest,
    export_head_weights,
    load_head_checkpoint,
    merge_head_checkpoint,
    read_head_manifest,
    save_head_checkpoint,
)
from ._collectives import all_gather_rows, all_reduce_sum
from ._function import ChunkedLSE, LSEOptions
from ._partition import HeadShard, partition_n_into_range
from ._sampling import SampledClasses, sample_classes
from .head import SampledSoftmaxHead, initial_rows

__all__ = [
    "ChunkedLSE",
    "HeadManifest",
    "HeadShard",
    "LSEOptions",
    "SampledClasses",
    "SampledSoftmaxHead",
    "all_gather_rows",
    "all_reduce_sum",
    "export_head_weights",
    "initial_rows",
    "load_head_checkpoint",
    "merge_head_checkpoint",
    "partition_n_into_range",
    "read_head_manifest",
    "sample_classes",
    "save_head_checkpoint",
]
