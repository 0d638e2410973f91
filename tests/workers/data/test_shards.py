"""Packed shards without Ray: ``data.source: shards`` config, the checks before training
(truncated shard, manifest), held-out access, and the decode/batch functions Ray Data runs."""

from __future__ import annotations

import io
import json
import pickle
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from _data_helpers import assert_one_line, random_jpegs

from workers.data import (
    check_data_config,
    decode_image_pixels,
    decode_shard_rows,
    ingest_cpus,
    load_dataset,
    open_shards,
    parse_data_config,
    read_shards,
    shard_batches,
    shard_steps,
    write_recordio,
)
from workers.data.pack import main


@pytest.fixture()
def packed(tmp_path: Path) -> Path:
    """40 JPEGs of 10 identities packed into shards of a few images; record 7 is corrupt."""
    images = random_jpegs(40, size=16, seed=2)
    images[6] = b"\xff\xd8 this is not a JPEG"
    write_recordio(tmp_path / "rec", images, [i // 4 for i in range(40)], (16, 16))
    assert main(["--source", "recordio", "--input", str(tmp_path / "rec"), "--output",
                 str(tmp_path / "shards"), "--shard-mb", "0.004", "--image-size", "16"]) == 0
    return tmp_path / "shards"


@pytest.mark.parametrize(("fields", "match"), [
    ({"source": "shards"}, "needs a path"),
    ({"source": "shards", "path": "p", "image_size": 64}, r"\['image_size'\] do not apply to "
                                                          r"source 'shards' \(its manifest"),
    ({"source": "shards", "path": "p", "heldout_fraction": 0.3}, "heldout_fraction"),
    ({"source": "shards", "path": "p", "loader_workers": 2}, "loader_workers"),
    ({"source": "recordio", "path": "p", "ray_data_cpus": 2.0}, r"\['ray_data_cpus'\] do not "
                                                                "apply to source 'recordio'"),
    ({"source": "shards", "path": "p", "ray_data_cpus": 0.0}, "ray_data_cpus"),
])
def test_shards_config_errors(fields: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match) as error:
        parse_data_config(fields)
    assert "\n" not in str(error.value)


def test_ingest_cpus_counts_ray_data_only_for_shards() -> None:
    assert ingest_cpus({"source": "shards", "path": "p", "ray_data_cpus": 0.4}) == 0.4
    assert ingest_cpus({"source": "shards", "path": "p"}) == 1.0
    assert ingest_cpus({}) == 0.0


def test_load_dataset_reads_sizes_and_heldout_from_the_manifest(packed: Path) -> None:
    config = check_data_config({"source": "shards", "path": str(packed), "flip": True})
    split = load_dataset(config)
    manifest = open_shards(packed).manifest
    assert split.train is None and split.shards is not None
    assert split.num_classes == manifest.train.classes == 8
    assert split.input_shape == (3, 16, 16)
    assert len(split.heldout) == manifest.heldout.rows == 8
    assert torch.equal(torch.unique(split.heldout.labels), torch.arange(2))
    # the reader pickles (loader processes) and reads every held-out row
    reader = pickle.loads(pickle.dumps(split.heldout))
    for index in range(len(reader)):
        assert reader.raw_item(index).shape == (3, 16, 16)


def test_truncated_shard_is_one_line_before_training(packed: Path) -> None:
    shard = open_shards(packed).files("train")[1]
    data = shard.read_bytes()
    shard.write_bytes(data[:len(data) // 2])
    with pytest.raises(ValueError) as error:
        check_data_config({"source": "shards", "path": str(packed)})
    assert_one_line(error, shard, "truncated", "rows 0..", "data.source = 'shards'")


def test_rewritten_shard_and_missing_shard(packed: Path) -> None:
    first, second = open_shards(packed).files("train")[:2]
    original, manifest_text = first.read_bytes(), (packed / "manifest.json").read_text()
    manifest = json.loads(manifest_text)
    manifest["train"]["shards"][0]["bytes"] = second.stat().st_size
    first.write_bytes(second.read_bytes())  # a whole Parquet file, but another shard's rows
    manifest["train"]["shards"][0]["rows"] = manifest["train"]["shards"][1]["rows"]
    manifest["train"]["rows"] = sum(shard["rows"] for shard in manifest["train"]["shards"])
    (packed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError) as error:
        check_data_config({"source": "shards", "path": str(packed / "manifest.json")})
    assert_one_line(error, first, "are rows of shard 1, not of shard 0")
    first.write_bytes(original)
    (packed / "manifest.json").write_text(manifest_text)
    second.unlink()
    with pytest.raises(ValueError) as missing:
        check_data_config({"source": "shards", "path": str(packed)})
    assert_one_line(missing, second, "shard listed in the manifest is missing")


@pytest.mark.parametrize(("edit", "expected"), [
    (lambda m: m.update(version=2), "manifest.json: version: Input should be 1"),
    (lambda m: m["train"].update(rows=1), "manifest.json: train: rows = 1 but its shards hold"),
    (lambda m: m["heldout"]["shards"][0].update(file="../x.parquet"),
     "manifest.json: heldout.shards.0.file: String should match pattern"),
    (lambda m: m.pop("split"), "manifest.json: split: Field required"),
])
def test_bad_manifest_is_one_line_naming_the_field(packed: Path, edit: Any,
                                                   expected: str) -> None:
    manifest = json.loads((packed / "manifest.json").read_text())
    edit(manifest)
    (packed / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError) as error:
        check_data_config({"source": "shards", "path": str(packed)})
    assert_one_line(error, expected)


def test_not_json_and_no_manifest(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{")
    with pytest.raises(ValueError) as error:
        open_shards(tmp_path)
    assert_one_line(error, tmp_path / "manifest.json", "not a JSON manifest")
    with pytest.raises(FileNotFoundError) as missing:
        check_data_config({"source": "shards", "path": str(tmp_path / "none")})
    assert_one_line(missing, tmp_path / "none", "not found")


def test_decode_marks_a_corrupt_image_with_its_shard_and_row(packed: Path) -> None:
    table = pq.read_table(open_shards(packed).files("train"))
    out = decode_shard_rows(table, 16, 3, flip=False)
    assert out["image"].dtype == np.uint8 and out["image"].shape == (table.num_rows, 3, 16, 16)
    bad = np.flatnonzero(out["corrupt"] >= 0)
    assert len(bad) == 1
    code = int(out["corrupt"][bad[0]])
    assert (code >> 32, code & 0xFFFFFFFF) == (table.column("shard")[bad[0]].as_py(),
                                               table.column("row")[bad[0]].as_py())
    good = 0 if bad[0] else 1
    assert np.array_equal(out["image"][good], decode_image_pixels(
        table.column("image")[good].as_py(), 16, 3, "x").numpy())
    assert np.array_equal(out["label"], table.column("label").to_numpy())
    flipped = decode_shard_rows(table, 16, 3, flip=True)["image"]
    same = [np.array_equal(a, b) for a, b in zip(flipped, out["image"], strict=True)]
    mirrored = [np.array_equal(a, b[..., ::-1]) for a, b in zip(flipped, out["image"],
                                                               strict=True)]
    assert all(s or m for s, m in zip(same, mirrored, strict=True)) and not all(same)


def test_read_shards_yields_every_row_of_each_file(packed: Path) -> None:
    files = open_shards(packed).files("train")[:3]
    outputs = list(read_shards({"file": np.array([str(f) for f in files], dtype=object)}, 16, 3,
                               flip=False))
    labels = np.concatenate([out["label"] for out in outputs])
    expected = pq.read_table(files).column("label").to_numpy()
    assert np.array_equal(labels, expected)


class _FakeSplit:
    """Stands in for Ray's ``DataIterator``: ``iter_torch_batches`` over given batches."""

    def __init__(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self.batches = batches
        self.kwargs: dict[str, Any] = {}

    def iter_torch_batches(self, **kwargs: Any) -> Iterator[dict[str, torch.Tensor]]:
        self.kwargs = kwargs
        return iter(self.batches)


def _batch(corrupt: int = -1) -> dict[str, torch.Tensor]:
    return {"image": torch.zeros(4, 3, 16, 16, dtype=torch.uint8),
            "label": torch.arange(4), "corrupt": torch.tensor([-1, corrupt, -1, -1])}


def test_shard_batches_yield_exactly_the_steps(packed: Path) -> None:
    shards = open_shards(packed)
    split = _FakeSplit([_batch(), _batch()])
    batches = list(shard_batches(split, shards, 4, 2, seed=0, epoch=1, rank=0,
                                 device=torch.device("cpu")))
    assert len(batches) == 2 and batches[0][0].dtype == torch.uint8
    assert split.kwargs["drop_last"] and split.kwargs["batch_size"] == 4
    with pytest.raises(ValueError) as error:
        list(shard_batches(_FakeSplit([_batch()] * 3), shards, 4, 2, 0, 1, 0,
                           torch.device("cpu")))
    assert_one_line(error, "rank 0 got more than 2 batches in epoch 1", "expected 2")
    with pytest.raises(ValueError) as error:
        list(shard_batches(_FakeSplit([_batch()]), shards, 4, 2, 0, 1, 1, torch.device("cpu")))
    assert_one_line(error, "rank 1 got 1 batches in epoch 1")


def test_a_corrupt_image_is_one_line_naming_shard_and_row(packed: Path) -> None:
    shards = open_shards(packed)
    with pytest.raises(ValueError) as error:
        list(shard_batches(_FakeSplit([_batch(3 << 32 | 2)]), shards, 4, 1, 0, 0, 0,
                           torch.device("cpu")))
    assert_one_line(error, f"{shards.files('train')[3]}: row 2: cannot decode image")


def test_shard_steps_are_equal_split_drop_last() -> None:
    assert shard_steps(103, 2, 10) == 5
    assert shard_steps(40, 4, 10) == 1
    with pytest.raises(ValueError, match="fewer than batch_size = 32"):
        shard_steps(40, 2, 32)


def test_heldout_rows_decode_the_source_bytes(packed: Path) -> None:
    split = load_dataset(parse_data_config({"source": "shards", "path": str(packed)}))
    table = pq.read_table(open_shards(packed).files("heldout"))
    for index in range(len(split.heldout)):
        image = table.column("image")[index].as_py()
        if image.startswith(b"\xff\xd8 this"):
            with pytest.raises(ValueError) as error:
                split.heldout.raw_item(index)
            assert_one_line(error, "heldout-", f"row {table.column('row')[index]}",
                            "cannot decode image")
            continue
        expected = decode_image_pixels(io.BytesIO(image).getvalue(), 16, 3, "x")
        assert torch.equal(split.heldout.raw_item(index), expected)
