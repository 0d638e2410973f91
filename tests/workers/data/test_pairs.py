"""Verification ``.bin`` pair files: Python-3 and Python-2 pickles, validation."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch
from _data_helpers import assert_one_line, encode_png, gray

from workers.data import read_pairs_bin, write_pairs_bin


def _py2_pickle(blobs: list[bytes], issame: list[bool]) -> bytes:
    """A protocol-2 pickle as Python 2 writes ``(bins, issame_list)``: ``str`` payloads are
    BINSTRING opcodes, which Python 3 only loads as bytes with ``encoding='bytes'``."""
    out = [b"\x80\x02", b"]", b"("]
    for blob in blobs:
        out += [b"T", struct.pack("<I", len(blob)), blob]
    out += [b"e", b"]", b"("]
    out += [b"\x88" if same else b"\x89" for same in issame]
    out += [b"e", b"\x86", b"."]
    return b"".join(out)


def test_round_trip(tmp_path) -> None:
    images = [encode_png(gray(v)) for v in (0, 50, 100, 150)]
    write_pairs_bin(tmp_path / "lfw.bin", images, [True, False])
    pairs = read_pairs_bin(tmp_path / "lfw.bin", image_size=8, channels=1)
    assert pairs.name == "lfw"
    assert pairs.issame.tolist() == [True, False]
    assert len(pairs.images) == 4
    assert pairs.images.labels.tolist() == [0, 0, 1, 1]
    assert torch.allclose(pairs.images[2][0], torch.full((1, 8, 8), 100 / 127.5 - 1))
    assert pairs.images[3][0].shape == (1, 8, 8)


def test_python2_pickle_with_numpy_entries(tmp_path) -> None:
    blobs = [encode_png(gray(v)) for v in (10, 20, 30, 40)]
    path = tmp_path / "agedb_30.bin"
    path.write_bytes(_py2_pickle(blobs, [False, True]))
    with pytest.raises(UnicodeDecodeError):  # what a plain Python-3 load would hit
        pickle.loads(path.read_bytes())
    pairs = read_pairs_bin(path, image_size=4, channels=3)
    assert pairs.issame.tolist() == [False, True]
    assert pairs.images[1][0].shape == (3, 4, 4)
    assert torch.allclose(pairs.images[1][0], torch.full((3, 4, 4), 20 / 127.5 - 1))
    numpy_path = tmp_path / "cfp_fp.bin"
    with numpy_path.open("wb") as handle:
        pickle.dump(([np.frombuffer(b, np.uint8) for b in blobs], [True, True]), handle)
    assert torch.allclose(read_pairs_bin(numpy_path, 8, 1).images[3][0],
                          torch.full((1, 8, 8), 40 / 127.5 - 1))


def test_odd_pair_count(tmp_path) -> None:
    path = tmp_path / "odd.bin"
    with path.open("wb") as handle:
        pickle.dump(([encode_png(gray(1))] * 3, [True, False]), handle)
    with pytest.raises(ValueError, match="3 images for 2 pairs") as error:
        read_pairs_bin(path)
    assert_one_line(error, path)


def test_not_a_pair_pickle(tmp_path) -> None:
    path = tmp_path / "junk.bin"
    path.write_bytes(b"definitely not a pickle")
    with pytest.raises(ValueError) as error:
        read_pairs_bin(path)
    assert_one_line(error, path)
    with path.open("wb") as handle:
        pickle.dump({"bins": []}, handle)
    with pytest.raises(ValueError) as error:
        read_pairs_bin(path)
    assert_one_line(error, path)


def test_entry_that_is_not_an_image(tmp_path) -> None:
    path = tmp_path / "bad.bin"
    write_pairs_bin(path, [encode_png(gray(1)), b"garbage"], [True])
    with pytest.raises(ValueError, match="image 1") as error:
        read_pairs_bin(path)
    assert_one_line(error, path)


def test_missing_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        read_pairs_bin(tmp_path / "nope.bin")
    assert_one_line(error, tmp_path / "nope.bin")
