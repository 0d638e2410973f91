"""``DataConfig`` validation and ``load_dataset`` over every file source."""

from __future__ import annotations

import numpy as np
import pydantic
import pytest
import torch
from _data_helpers import assert_one_line, encode_png, gray

from workers.data import (
    DataConfig,
    DecodedDataset,
    TensorDataset,
    check_data_config,
    load_dataset,
    parse_data_config,
    write_pairs_bin,
    write_parquet_features,
    write_recordio,
)


@pytest.mark.parametrize(("fields", "match"), [
    ({"source": "recordio"}, "needs a path"),
    ({"source": "synthetic", "path": "/x"}, "takes no path"),
    ({"source": "synthetic", "channels": 3}, "one channel"),
    ({"source": "parquet", "path": "f.parquet", "flip": True}, "flip needs images"),
    ({"source": "recordio", "path": "d", "num_identities": 10}, "num_identities"),
    ({"source": "synthetic", "heldout_fraction": 0.3}, "heldout_fraction"),
    ({"source": "sqlite"}, "source"),
    ({"unknown_knob": 1}, "unknown_knob"),
    ({"heldout_fraction": 1.0, "source": "omniglot"}, "heldout_fraction"),
    ({"heldout_fraction": -0.1, "source": "omniglot"}, "heldout_fraction"),
    ({"heldout_fraction": 0.0, "source": "omniglot"}, "heldout_fraction"),
    ({"image_size": 4}, "image_size"),
])
def test_invalid_configs(fields: dict, match: str) -> None:
    with pytest.raises(pydantic.ValidationError, match=match):
        DataConfig(**fields)
    with pytest.raises(ValueError, match=match) as error:
        parse_data_config(fields)
    assert all(line.startswith("data") for line in str(error.value).splitlines())


def test_parse_reports_one_line_per_problem() -> None:
    with pytest.raises(ValueError) as error:
        parse_data_config({"source": "sqlite", "image_size": 3, "bogus": 1}, source="trial.data")
    lines = str(error.value).splitlines()
    assert len(lines) == 3
    assert lines[0].startswith("trial.data.source: ") and "'sqlite'" in lines[0]
    assert lines[1].startswith("trial.data.image_size: ") and "(got 3)" in lines[1]
    assert lines[2].startswith("trial.data.bogus: ")
    assert parse_data_config({"source": "omniglot"}) == DataConfig(source="omniglot")


def test_check_data_config_finds_missing_files_without_loading(tmp_path, monkeypatch) -> None:
    (tmp_path / "faces").mkdir()
    with pytest.raises(ValueError, match="no identity sub-folders") as error:  # indexed as
        check_data_config({"source": "image_folder", "path": str(tmp_path / "faces")})  # loaded
    assert_one_line(error, tmp_path / "faces")
    with pytest.raises(FileNotFoundError) as error:
        check_data_config({"source": "recordio", "path": str(tmp_path / "rec")})
    assert_one_line(error, tmp_path / "rec")
    with pytest.raises(FileNotFoundError) as error:
        check_data_config({"pair_files": [str(tmp_path / "lfw.bin")]})
    assert_one_line(error, tmp_path / "lfw.bin")
    monkeypatch.setenv("MARGINLAB_OMNIGLOT", str(tmp_path / "omniglot.npz"))
    with pytest.raises(FileNotFoundError) as error:
        check_data_config({"source": "omniglot"})
    assert_one_line(error, tmp_path / "omniglot.npz")


def test_config_is_frozen() -> None:
    config = DataConfig()
    with pytest.raises(pydantic.ValidationError):
        config.seed = 3  # type: ignore[misc]


def test_synthetic_default_split() -> None:
    split = load_dataset(DataConfig(num_identities=12, heldout_identities=5,
                                    samples_per_identity=3, flip=True))
    assert split.num_classes == 12 and split.input_shape == (1, 32, 32)
    assert isinstance(split.train, TensorDataset) and split.train.flip
    assert not split.heldout.flip
    assert torch.equal(split.heldout.labels, torch.arange(5).repeat_interleave(3))
    assert split.pairs == ()


def _folder(root, identities: int, per_identity: int) -> None:
    for identity in range(identities):
        (root / f"id{identity:02d}").mkdir(parents=True)
        for index in range(per_identity):
            image = gray(10 * identity + index)
            (root / f"id{identity:02d}" / f"{index}.png").write_bytes(encode_png(image))


def test_image_folder_source_with_pair_files(tmp_path) -> None:
    _folder(tmp_path / "faces", identities=10, per_identity=2)
    write_pairs_bin(tmp_path / "lfw.bin", [encode_png(gray(v)) for v in range(4)], [1, 0])
    config = DataConfig(source="image_folder", path=str(tmp_path / "faces"), image_size=8,
                        channels=3, heldout_fraction=0.3, flip=True,
                        pair_files=(str(tmp_path / "lfw.bin"),))
    split = load_dataset(config)
    assert isinstance(split.train, DecodedDataset)
    assert split.num_classes == 7 and len(torch.unique(split.heldout.labels)) == 3
    assert split.input_shape == (3, 8, 8) and split.train.flip and not split.heldout.flip
    assert torch.equal(torch.unique(split.train.labels), torch.arange(7))
    train_folders = {key.split("/")[-2] for key in split.train.keys}
    heldout_folders = {key.split("/")[-2] for key in split.heldout.keys}
    assert not train_folders & heldout_folders
    assert [p.name for p in split.pairs] == ["lfw"] and split.pairs[0].images[0][0].shape == (
        3, 8, 8)


def test_recordio_and_parquet_sources(tmp_path) -> None:
    labels = np.repeat(np.arange(6), 2)
    write_recordio(tmp_path / "rec", [encode_png(gray(int(v))) for v in labels], labels,
                   (8, 8))
    split = load_dataset(DataConfig(source="recordio", path=str(tmp_path / "rec"),
                                    image_size=8, heldout_fraction=0.5))
    assert split.num_classes == 3 and len(split.train) == len(split.heldout) == 6
    features = np.random.default_rng(0).standard_normal((12, 4))
    write_parquet_features(tmp_path / "f.parquet", features, labels)
    split = load_dataset(DataConfig(source="parquet", path=str(tmp_path / "f.parquet")))
    assert split.input_shape == (4,) and split.num_classes + len(
        torch.unique(split.heldout.labels)) == 6


def test_zero_heldout_fraction_needs_pair_files(tmp_path) -> None:
    """0 without pair files is one line naming the field and range; with them every identity
    trains and the held-out side is empty."""
    with pytest.raises(ValueError) as error:
        parse_data_config({"source": "parquet", "path": "f.parquet", "heldout_fraction": 0.0})
    assert_one_line(error, "data.heldout_fraction", "(0.0, 1.0)", "pair_files")
    labels = np.repeat(np.array([4, 0, 7, 2]), 3)
    write_parquet_features(tmp_path / "f.parquet", np.eye(12, 4), labels)
    write_pairs_bin(tmp_path / "lfw.bin", [encode_png(gray(v)) for v in range(4)], [1, 0])
    split = load_dataset(parse_data_config({
        "source": "parquet", "path": str(tmp_path / "f.parquet"), "heldout_fraction": 0.0,
        "pair_files": [str(tmp_path / "lfw.bin")]}))
    assert split.num_classes == 4 and len(split.train) == 12 and len(split.heldout) == 0
    assert torch.equal(split.train.labels, torch.tensor([2, 0, 3, 1]).repeat_interleave(3))
    assert [p.name for p in split.pairs] == ["lfw"]


@pytest.mark.parametrize("source", ["image_folder", "recordio", "parquet"])
def test_missing_path_fails_at_load_time(tmp_path, source: str) -> None:
    config = DataConfig(source=source, path=str(tmp_path / "absent"))
    with pytest.raises(FileNotFoundError) as error:
        load_dataset(config)
    assert_one_line(error, tmp_path / "absent")


def test_missing_pair_file_fails_before_the_data_loads(tmp_path) -> None:
    config = DataConfig(pair_files=(str(tmp_path / "lfw.bin"),))
    with pytest.raises(FileNotFoundError) as error:
        load_dataset(config)
    assert_one_line(error, tmp_path / "lfw.bin")
