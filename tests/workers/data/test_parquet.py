"""Parquet features: round trip, accepted list layouts, up-front validation."""

from __future__ import annotations

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _data_helpers import assert_one_line

from workers.data import read_parquet_features, write_parquet_features


def test_round_trip(tmp_path) -> None:
    features = np.random.default_rng(0).standard_normal((12, 5)).astype(np.float32)
    labels = np.arange(12) % 4
    path = tmp_path / "features.parquet"
    write_parquet_features(path, features, labels, num_classes=6)
    table = pq.read_table(path)
    assert pa.types.is_fixed_size_list(table.schema.field("embedding").type)
    dataset = read_parquet_features(path)
    assert torch.equal(dataset.data, torch.from_numpy(features))
    assert dataset.labels.tolist() == labels.tolist()
    assert dataset.input_shape == (5,)
    assert dataset.labels.dtype == torch.int64


def test_variable_length_lists_of_one_length_are_accepted(tmp_path) -> None:
    path = tmp_path / "lists.parquet"
    pq.write_table(pa.table({"label": [0, 1], "embedding": [[1.0, 2.0], [3.0, 4.0]]}), path)
    dataset = read_parquet_features(path)
    assert dataset.data.tolist() == [[1.0, 2.0], [3.0, 4.0]]


def _table(path, labels, embeddings, num_classes: int | None = None) -> None:
    table = pa.table({"label": pa.array(labels, pa.int64()), "embedding": embeddings})
    if num_classes is not None:
        table = table.replace_schema_metadata({b"marginlab.num_classes": str(num_classes)})
    pq.write_table(table, path)


@pytest.mark.parametrize(("labels", "embeddings", "num_classes", "match"), [
    ([0, -1], [[1.0], [2.0]], None, "row 1 has label -1"),
    ([0, 3], [[1.0], [2.0]], 3, r"row 1 has label 3; labels must be in \[0, 3\)"),
    ([0, 1], [[1.0, 2.0], [3.0]], None, "one length"),
    ([0, 1], [[1.0], [float("nan")]], None, "row 1 has a non-finite"),
    ([0, 1], [[1.0], None], None, "non-null list"),
    ([0, None], [[1.0], [2.0]], None, "non-null integer"),
    ([], pa.array([], pa.list_(pa.float32())), None, "no rows"),
])
def test_bad_content(tmp_path, labels, embeddings, num_classes, match) -> None:
    path = tmp_path / "bad.parquet"
    _table(path, labels, embeddings, num_classes)
    with pytest.raises(ValueError, match=match) as error:
        read_parquet_features(path)
    assert_one_line(error, path)


def test_explicit_num_classes_overrides_metadata(tmp_path) -> None:
    path = tmp_path / "f.parquet"
    write_parquet_features(path, np.zeros((3, 2)), [0, 1, 2])
    with pytest.raises(ValueError, match=r"\[0, 2\)") as error:
        read_parquet_features(path, num_classes=2)
    assert_one_line(error, path)


def test_missing_column_and_file(tmp_path) -> None:
    path = tmp_path / "nolabel.parquet"
    pq.write_table(pa.table({"embedding": [[1.0]]}), path)
    with pytest.raises(ValueError, match="'label' and 'embedding'") as error:
        read_parquet_features(path)
    assert_one_line(error, path)
    with pytest.raises(FileNotFoundError) as error:
        read_parquet_features(tmp_path / "absent.parquet")
    assert_one_line(error, tmp_path / "absent.parquet")
