"""The distributed, sampled, chunked softmax head (Partial FC for every loss of the zoo).

``SampledSoftmaxHead(embedding_dim, num_classes, loss, sample_ratio, sampling, process_group)``
then ``loss_value = head(local_embeddings, local_labels)``.
"""

from __future__ import annotations

from ._function import ChunkedLSE, LSEOptions
from ._partition import HeadShard, partition_n_into_range
from ._sampling import SampledClasses, sample_classes
from .head import SampledSoftmaxHead, initial_rows

__all__ = [
    "ChunkedLSE",
    "HeadShard",
    "LSEOptions",
    "SampledClasses",
    "SampledSoftmaxHead",
    "initial_rows",
    "partition_n_into_range",
    "sample_classes",
]
