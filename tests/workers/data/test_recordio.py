"""RecordIO: dmlc framing (incl. split records), insightface layout, up-front validation."""

from __future__ import annotations

import pickle
import struct

import numpy as np
import pytest
import torch
from _data_helpers import assert_one_line, encode_png, gray

from workers.data import (
    MAGIC,
    RecordIOReader,
    RecordIOWriter,
    frame_record,
    load_recordio,
    pack_record,
    read_property,
    unpack_record,
    write_recordio,
)

MAGIC_BYTES = struct.pack("<I", MAGIC)


def _lrec(cflag: int, length: int) -> bytes:
    return struct.pack("<II", MAGIC, cflag << 29 | length)


def test_frame_whole_record_is_padded_to_four_bytes() -> None:
    assert frame_record(b"abcdef") == _lrec(0, 6) + b"abcdef\0\0"
    assert frame_record(b"") == _lrec(0, 0)


def test_frame_splits_at_aligned_magic_only() -> None:
    record = b"abcd" + MAGIC_BYTES + b"xy"
    assert frame_record(record) == _lrec(1, 4) + b"abcd" + _lrec(3, 2) + b"xy\0\0"
    unaligned = b"ab" + MAGIC_BYTES + b"cd"
    assert frame_record(unaligned) == _lrec(0, 8) + unaligned


def test_frame_middle_parts_and_empty_parts() -> None:
    record = MAGIC_BYTES + b"1234" + MAGIC_BYTES + MAGIC_BYTES
    expected = _lrec(1, 0) + _lrec(2, 4) + b"1234" + _lrec(2, 0) + _lrec(3, 0)
    assert frame_record(record) == expected


@pytest.mark.parametrize("record", [
    b"", b"a", b"abcd" + MAGIC_BYTES + b"xy", MAGIC_BYTES * 3, b"xyzw" * 5 + MAGIC_BYTES,
    MAGIC_BYTES + b"\x01\x02\x03", b"ab" + MAGIC_BYTES + b"cd" + MAGIC_BYTES,
])
def test_reader_rejoins_split_records(tmp_path, record: bytes) -> None:
    with RecordIOWriter(tmp_path / "a.rec", tmp_path / "a.idx") as writer:
        writer.write(7, b"before")
        writer.write(8, record)
        writer.write(9, b"after!")
    reader = RecordIOReader(tmp_path / "a.rec", tmp_path / "a.idx")
    assert [reader.read(k) for k in (7, 8, 9)] == [b"before", record, b"after!"]


def test_pack_unpack_scalar_and_array_labels() -> None:
    labels, payload = unpack_record(pack_record(3.0, b"img", id=5), "x")
    assert labels.tolist() == [3.0] and payload == b"img"
    labels, payload = unpack_record(pack_record([4.0, 9.0], b"img"), "x")
    assert labels.tolist() == [4.0, 9.0] and payload == b"img"
    assert len(pack_record(1.0, b"")) == 24


def _images(count: int) -> list[bytes]:
    return [encode_png(gray(10 * i)) for i in range(count)]


def test_write_and_load_insightface_layout(tmp_path) -> None:
    labels = [2, 0, 1, 0, 2, 2]
    write_recordio(tmp_path, _images(6), labels, (8, 8), num_classes=4)
    assert read_property(tmp_path / "property") == (4, 8, 8)
    reader = RecordIOReader(tmp_path / "train.rec", tmp_path / "train.idx")
    meta, _ = unpack_record(reader.read(0), "meta")
    assert meta.tolist() == [7.0, 11.0]
    identity_ranges = [unpack_record(reader.read(k), "id")[0].tolist() for k in range(7, 11)]
    assert identity_ranges == [[1.0, 3.0], [3.0, 4.0], [4.0, 7.0], [7.0, 7.0]]
    dataset = load_recordio(tmp_path, image_size=8, channels=1)
    assert dataset.labels.tolist() == [0, 0, 1, 2, 2, 2]
    expected_pixels = [10, 30, 20, 0, 40, 50]  # stable sort by label
    for index, value in enumerate(expected_pixels):
        image, _ = dataset[index]
        assert image.shape == (1, 8, 8)
        assert torch.allclose(image, torch.full((1, 8, 8), value / 127.5 - 1))
    resized = load_recordio(tmp_path / "train.rec", image_size=4, channels=3)
    assert resized[0][0].shape == (3, 4, 4)


def test_dataset_survives_pickling_after_use(tmp_path) -> None:
    write_recordio(tmp_path, _images(3), [0, 1, 1], (8, 8))
    dataset = load_recordio(tmp_path, image_size=8, channels=1)
    first = dataset[1][0]
    clone = pickle.loads(pickle.dumps(dataset))
    assert torch.equal(clone[1][0], first)


def test_split_header_and_label_array_records(tmp_path) -> None:
    """An id equal to the magic splits the header itself; labels may be arrays."""
    image = encode_png(gray(77))
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        writer.write(0, pack_record(1.0, image, id=MAGIC))
        writer.write(1, pack_record([2.0, 5.0, 6.0], image))
        writer.write(2, pack_record(0.0, image + MAGIC_BYTES * 2))
    assert frame_record(pack_record(1.0, image, id=MAGIC)).count(_lrec(1, 8)) == 1
    dataset = load_recordio(tmp_path, image_size=8, channels=1)
    assert dataset.keys.tolist() == [0, 1, 2]
    assert dataset.labels.tolist() == [1, 2, 0]
    assert torch.allclose(dataset[0][0], torch.full((1, 8, 8), 77 / 127.5 - 1))


def _valid_set(tmp_path, count: int = 4, num_classes: int | None = None) -> None:
    write_recordio(tmp_path, _images(count), list(range(count)), (8, 8), num_classes)


def test_missing_files(tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        load_recordio(tmp_path)
    assert_one_line(error, tmp_path / "train.rec")
    _valid_set(tmp_path)
    (tmp_path / "train.idx").unlink()
    with pytest.raises(FileNotFoundError) as error:
        load_recordio(tmp_path)
    assert_one_line(error, tmp_path / "train.idx")


def _offset(tmp_path, key: int) -> int:
    lines = (tmp_path / "train.idx").read_text().splitlines()
    return dict((int(k), int(v)) for k, v in (line.split("\t") for line in lines))[key]


def test_bad_magic_names_file_and_record(tmp_path) -> None:
    _valid_set(tmp_path)
    rec = tmp_path / "train.rec"
    data = bytearray(rec.read_bytes())
    data[_offset(tmp_path, 3)] ^= 0xFF
    rec.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="bad magic") as error:
        load_recordio(tmp_path)
    assert_one_line(error, rec, "record 3")


def test_truncated_rec_names_file_and_record(tmp_path) -> None:
    _valid_set(tmp_path, count=3)
    rec, idx = tmp_path / "train.rec", tmp_path / "train.idx"
    last_image = _offset(tmp_path, 3)
    rec.write_bytes(rec.read_bytes()[:last_image + 20])
    lines = [line for line in idx.read_text().splitlines() if int(line.split("\t")[0]) <= 3]
    idx.write_text("\n".join(lines) + "\n")
    with pytest.raises(ValueError, match="past the end") as error:
        load_recordio(tmp_path)
    assert_one_line(error, rec, "record 3")


def test_idx_offset_past_end(tmp_path) -> None:
    _valid_set(tmp_path)
    idx = tmp_path / "train.idx"
    size = (tmp_path / "train.rec").stat().st_size
    idx.write_text(idx.read_text() + f"99\t{size + 100}\n")
    with pytest.raises(ValueError, match="past the end") as error:
        load_recordio(tmp_path)
    assert_one_line(error, idx, "key 99")


def test_malformed_idx_line(tmp_path) -> None:
    _valid_set(tmp_path)
    idx = tmp_path / "train.idx"
    idx.write_text(idx.read_text() + "oops\n")
    with pytest.raises(ValueError, match="key<TAB>offset") as error:
        load_recordio(tmp_path)
    assert_one_line(error, idx)


def test_label_beyond_property_num_classes(tmp_path) -> None:
    _valid_set(tmp_path, count=4)
    (tmp_path / "property").write_text("3,8,8")
    with pytest.raises(ValueError, match=r"\[0, 3\)") as error:
        load_recordio(tmp_path)
    assert_one_line(error, tmp_path / "train.rec", "record 4", tmp_path / "property")


def test_negative_or_fractional_label(tmp_path) -> None:
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        writer.write(0, pack_record(0.0, encode_png(gray(1))))
        writer.write(1, pack_record(1.5, encode_png(gray(1))))
    with pytest.raises(ValueError, match=r"label 1\.5") as error:
        load_recordio(tmp_path)
    assert_one_line(error, "record 1")


def test_meta_record_announcing_missing_keys(tmp_path) -> None:
    with RecordIOWriter(tmp_path / "train.rec", tmp_path / "train.idx") as writer:
        writer.write(0, pack_record([4.0, 4.0], b""))
        writer.write(1, pack_record(0.0, encode_png(gray(1))))
    with pytest.raises(ValueError, match="key 2 is missing") as error:
        load_recordio(tmp_path)
    assert_one_line(error, tmp_path / "train.idx")


def test_corrupt_image_payload_names_record_when_decoded(tmp_path) -> None:
    write_recordio(tmp_path, [b"not an image", encode_png(gray(3))], [0, 1], (8, 8))
    dataset = load_recordio(tmp_path, image_size=8, channels=1)
    with pytest.raises(ValueError, match="cannot decode") as error:
        dataset[0]
    assert_one_line(error, tmp_path / "train.rec", "record 1")


def test_vectorised_labels_match_record_by_record(tmp_path) -> None:
    rng = np.random.default_rng(3)
    labels = rng.integers(0, 9, size=40).tolist()
    write_recordio(tmp_path, [b"x" * int(n) for n in rng.integers(0, 9, size=40)], labels,
                   (8, 8), num_classes=9)
    reader = RecordIOReader(tmp_path / "train.rec", tmp_path / "train.idx")
    keys = list(range(1, 41))
    slow = [unpack_record(reader.read(k), "k")[0][0] for k in keys]
    assert reader.labels(keys).tolist() == slow == sorted(labels)


def test_label_scan_is_cached_next_to_the_set_and_redone_when_it_changes(
        tmp_path, monkeypatch) -> None:
    write_recordio(tmp_path, _images(5), [1, 0, 2, 1, 0], (8, 8))
    first = load_recordio(tmp_path, image_size=8, channels=1)
    assert (tmp_path / "train.rec.labels.npz").is_file()

    def no_scan(self: RecordIOReader, keys: np.ndarray) -> np.ndarray:
        raise AssertionError("the label scan ran again")

    with monkeypatch.context() as patch:
        patch.setattr(RecordIOReader, "labels", no_scan)
        assert torch.equal(load_recordio(tmp_path, image_size=8, channels=1).labels,
                           first.labels)
    # a rewritten set (other labels, same file names) is scanned again, never served stale
    write_recordio(tmp_path, _images(6), [3, 3, 0, 1, 2, 2], (8, 8))
    assert load_recordio(tmp_path, image_size=8, channels=1).labels.tolist() == [
        0, 1, 2, 2, 3, 3]


def test_label_scan_is_cached_under_marginlab_home_when_the_set_folder_refuses_it(
        tmp_path, monkeypatch) -> None:
    data, home = tmp_path / "data", tmp_path / "home"
    write_recordio(data, _images(4), [0, 1, 0, 1], (8, 8))
    # a folder where the cache file would go: unwritable for it even as root
    (data / "train.rec.labels.npz").mkdir()
    monkeypatch.setenv("MARGINLAB_HOME", str(home))
    labels = load_recordio(data, image_size=8, channels=1).labels
    cached = list((home / "cache" / "recordio-labels").glob("*.npz"))
    assert len(cached) == 1 and not list(data.glob(".*partial"))
    assert labels.tolist() == [0, 0, 1, 1]
    monkeypatch.setattr(RecordIOReader, "labels", lambda *_: pytest.fail("scanned again"))
    assert load_recordio(data, image_size=8, channels=1).labels.tolist() == [0, 0, 1, 1]
