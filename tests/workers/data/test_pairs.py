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


class _Payload:
    """Unpickling this would create ``path`` (a stand-in for arbitrary code)."""

    def __init__(self, path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_a_pickle_that_would_run_code_is_refused_before_it_runs(tmp_path) -> None:
    path, created = tmp_path / "evil.bin", tmp_path / "created"
    path.write_bytes(pickle.dumps(([_Payload(created)], [True])))
    with pytest.raises(ValueError, match=r"refers to (io|_io|builtins)\.open; a pair file may "
                                         r"hold only bytes") as error:
        read_pairs_bin(path)
    assert_one_line(error, path)
    assert not created.exists()


@pytest.mark.parametrize(("content", "match"), [
    (pickle.dumps(None), r"not a \(bins, issame_list\) pickle \(it holds NoneType\)"),
    (pickle.dumps((None, None)), "bins and issame_list must be lists, got NoneType and "
                                 "NoneType"),
    (pickle.dumps(([None, None], [True])), "image 0 is a NoneType, not encoded image bytes"),
    (pickle.dumps(([encode_png(gray(1))] * 2, [None])), r"issame_list\[0\] = None is not a "
                                                        "boolean"),
    (b"\x80\x02cnosuchmodule\nThing\nq\x00)\x81q\x01.", r"refers to nosuchmodule\.Thing"),
    (pickle.dumps(([b"\x89PNG\r\n\x1a\n" + bytes(8)] * 2, [True])),
     "image 0: cannot decode image"),
])
def test_malformed_payloads_are_one_line(tmp_path, content: bytes, match: str) -> None:
    path = tmp_path / "bad.bin"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=match) as error:
        read_pairs_bin(path)
    assert_one_line(error, path)


def test_every_way_the_format_stores_bytes_and_bools_loads(tmp_path) -> None:
    blobs = [encode_png(gray(v)) for v in (10, 20)]
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):  # ≤ 2: bytes via _codecs.encode
        for bins, issame in (([bytearray(b) for b in blobs], (np.bool_(True),)),
                             (tuple(np.frombuffer(b, np.uint8) for b in blobs),
                              np.array([1]))):
            path = tmp_path / f"p{protocol}.bin"
            path.write_bytes(pickle.dumps((bins, issame), protocol=protocol))
            pairs = read_pairs_bin(path, image_size=8, channels=1)
            assert pairs.issame.tolist() == [True]
            assert torch.allclose(pairs.images[1][0], torch.full((1, 8, 8), 20 / 127.5 - 1))
