"""Precomputed features in Parquet: an integer ``label`` column and an ``embedding`` column of
float32 lists (fixed-size or all of one length), for training only the head.

The writer stores ``num_classes`` in the schema metadata (key ``marginlab.num_classes``); the
reader checks every label against it (or against ``num_classes`` given explicitly) and that
every embedding is present, of one length and finite.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ._dataset import TensorDataset

NUM_CLASSES_KEY = b"marginlab.num_classes"


def write_parquet_features(path: str | Path, embeddings: np.ndarray | torch.Tensor,
                           labels: np.ndarray | torch.Tensor,
                           num_classes: int | None = None) -> None:
    """Write ``(N, D)`` float32 embeddings and ``N`` labels as one Parquet file."""
    features = np.ascontiguousarray(np.asarray(embeddings, dtype=np.float32))
    labels_np = np.asarray(labels, dtype=np.int64)
    if features.ndim != 2 or len(features) != len(labels_np):
        raise ValueError(f"expected embeddings (N, D) and N labels, got {features.shape} and "
                         f"{labels_np.shape}")
    num_classes = int(labels_np.max()) + 1 if num_classes is None else num_classes
    column = pa.FixedSizeListArray.from_arrays(pa.array(features.reshape(-1)), features.shape[1])
    table = pa.table({"label": pa.array(labels_np), "embedding": column})
    table = table.replace_schema_metadata({NUM_CLASSES_KEY: str(num_classes).encode()})
    pq.write_table(table, str(path))


def check_parquet_features(path: str | Path) -> torch.Tensor:
    """The check before any loading: the footer's schema has an integer ``label`` and a list
    ``embedding`` column, and the label column (read alone, O(N)) is non-null, non-empty and
    within ``num_classes``; returns the labels. ``read_parquet_features`` also checks every
    embedding value."""
    try:
        schema = pq.read_schema(str(path))
    except (pa.ArrowException, OSError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path}: not a Parquet file ({message})") from None
    missing = sorted({"label", "embedding"} - set(schema.names))
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; need 'label' and 'embedding'")
    embedding = schema.field("embedding").type
    if not (pa.types.is_fixed_size_list(embedding) or pa.types.is_list(embedding)) \
            or not pa.types.is_floating(embedding.value_type):
        raise ValueError(f"{path}: 'embedding' must be a list of floats column, got {embedding}")
    labels = pq.read_table(str(path), columns=["label"]).column("label")
    return torch.from_numpy(_checked_labels(path, labels, None, schema.metadata or {}))


def _checked_labels(path: str | Path, column: pa.ChunkedArray, num_classes: int | None,
                    metadata: dict[bytes, bytes]) -> np.ndarray:
    """The label column as int64, after checking its type, nulls, length and range (against
    ``num_classes``, else the schema's ``marginlab.num_classes``)."""
    if num_classes is None and NUM_CLASSES_KEY in metadata:
        num_classes = int(metadata[NUM_CLASSES_KEY])
    if not pa.types.is_integer(column.type) or column.null_count:
        raise ValueError(f"{path}: 'label' must be a non-null integer column, got {column.type}")
    labels = column.to_numpy().astype(np.int64)
    if len(labels) == 0:
        raise ValueError(f"{path}: no rows")
    bad = labels < 0 if num_classes is None else (labels < 0) | (labels >= num_classes)
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        bound = f"[0, {num_classes})" if num_classes is not None else "≥ 0"
        raise ValueError(f"{path}: row {row} has label {labels[row]}; labels must be in {bound}")
    return labels


def read_parquet_features(path: str | Path, num_classes: int | None = None) -> TensorDataset:
    """Load features ``(N, D)`` and labels; every check happens here, up front."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: parquet features not found")
    try:
        table = pq.read_table(str(path), columns=["label", "embedding"])
    except (pa.ArrowException, OSError, KeyError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path}: cannot read 'label' and 'embedding' columns ({message})") \
            from None
    labels = _checked_labels(path, table.column("label"), num_classes,
                             table.schema.metadata or {})
    embedding_col = table.column("embedding")
    if not (pa.types.is_fixed_size_list(embedding_col.type) or pa.types.is_list(
            embedding_col.type)) or embedding_col.null_count:
        raise ValueError(f"{path}: 'embedding' must be a non-null list column, got "
                         f"{embedding_col.type}")
    embeddings = embedding_col.combine_chunks()
    lengths = pc.list_value_length(embeddings).to_numpy()
    if lengths.min() != lengths.max() or lengths[0] == 0:
        raise ValueError(f"{path}: embeddings must be non-empty and of one length, got lengths "
                         f"{lengths.min()}..{lengths.max()}")
    values = embeddings.flatten().to_numpy(zero_copy_only=False).astype(np.float32)
    features = values.reshape(len(labels), int(lengths[0]))
    if not np.isfinite(features).all():
        row = int(np.flatnonzero(~np.isfinite(features).all(1))[0])
        raise ValueError(f"{path}: row {row} has a non-finite embedding value")
    return TensorDataset(torch.from_numpy(features), torch.from_numpy(labels))
