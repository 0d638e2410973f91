"""Omniglot background set: loading, alphabet table, held-out alphabets, path resolution."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from _data_helpers import assert_one_line

from workers.data import (
    ALPHABETS,
    DataConfig,
    TensorDataset,
    alphabet_of_class,
    load_dataset,
    load_omniglot,
    resolve_omniglot_path,
    split_identities,
)
from workers.data._omniglot import DEFAULT_PATH, ENV_VAR


@pytest.fixture(scope="module")
def omniglot(omniglot_npz: Path) -> TensorDataset:
    return load_omniglot(omniglot_npz, image_size=32)


def test_alphabet_table_covers_the_background_set() -> None:
    assert len(ALPHABETS) == 30
    assert sum(count for _, count in ALPHABETS) == 964
    groups = alphabet_of_class()
    assert groups.shape == (964,) and torch.equal(torch.unique(groups), torch.arange(30))


def test_loaded_images(omniglot: TensorDataset) -> None:
    assert omniglot.data.shape == (964 * 20, 1, 32, 32)
    assert torch.equal(omniglot.labels, torch.arange(964).repeat_interleave(20))
    assert float(omniglot.data.min()) >= -1.0 and float(omniglot.data.max()) <= 1.0
    assert float(omniglot.data.mean()) < -0.7  # ink is bright and sparse


def test_braille_boundaries_match_the_data(omniglot: TensorDataset) -> None:
    """Braille (dots) is the one run of low-ink classes; its neighbours carry strokes."""
    names = [name for name, _ in ALPHABETS]
    start = sum(count for _, count in ALPHABETS[:names.index("Braille")])
    ink = (omniglot.data > 0).float().view(964, -1).mean(1)
    assert float(ink[start:start + 26].max()) < 0.06
    assert float(ink[start - 1]) > 0.06 and float(ink[start + 26]) > 0.06


def test_heldout_is_whole_alphabets(omniglot: TensorDataset, omniglot_npz: Path,
                                    monkeypatch) -> None:
    monkeypatch.setenv(ENV_VAR, str(omniglot_npz))
    split = load_dataset(DataConfig(source="omniglot", heldout_fraction=0.2, seed=4))
    train_ids, heldout_ids = split_identities(alphabet_of_class(), 0.2, seed=4)
    groups = alphabet_of_class()
    assert not set(groups[train_ids].tolist()) & set(groups[heldout_ids].tolist())
    assert split.num_classes == len(train_ids) and len(heldout_ids) >= round(0.2 * 964)
    assert len(torch.unique(split.heldout.labels)) == len(heldout_ids)
    assert split.input_shape == (1, 32, 32)
    first_heldout = int(heldout_ids[0])
    assert torch.equal(split.heldout.inputs(torch.arange(20)),
                       omniglot.data[first_heldout * 20:first_heldout * 20 + 20])


def test_path_resolution(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(ENV_VAR, raising=False)
    assert resolve_omniglot_path() == DEFAULT_PATH.resolve()
    assert DEFAULT_PATH.resolve().parts[-4:] == ("shared", "datasets", "omniglot",
                                                 "images_background.npz")
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "env.npz"))
    assert resolve_omniglot_path() == tmp_path / "env.npz"
    assert resolve_omniglot_path(tmp_path / "arg.npz") == tmp_path / "arg.npz"
    with pytest.raises(FileNotFoundError, match=ENV_VAR) as error:
        load_omniglot()
    assert_one_line(error, tmp_path / "env.npz")


def test_not_an_omniglot_npz(tmp_path) -> None:
    path = tmp_path / "other.npz"
    np.savez(path, images=np.zeros((3, 2, 5, 5), bool), labels=np.zeros((3, 2), int))
    with pytest.raises(ValueError, match="expected images") as error:
        load_omniglot(path)
    assert_one_line(error, path)
