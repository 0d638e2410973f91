"""insightface / MXNet RecordIO (``train.rec`` + ``train.idx`` + ``property``), without mxnet.

Framing (dmlc recordio): each frame is ``magic (uint32 LE 0xced7230a) · lrec (uint32 LE) ·
data · zero padding to 4 bytes``, with ``length = lrec & (2²⁹ − 1)`` and ``cflag = lrec >> 29``.
A record whose data contains the magic at a 4-aligned position is split there: frames with
cflag 1 (first), 2 (middle), 3 (last) whose data are rejoined with the magic re-inserted
between them; cflag 0 is a whole record. ``train.idx`` lines are ``key\\toffset`` (byte offset
of the record's first frame).

Record payload (``mx.recordio.pack``): a 24-byte header ``<IfQQ`` (flag, label, id, id2); when
``flag > 0`` it is followed by ``flag`` float32 labels (the label array, header label unused);
then the encoded image. Key 0 is the meta record: flag > 0 and labels ``[a, b]`` where images
are keys ``1 … a−1`` and identity records (labels ``[first, end)`` image keys) are ``a … b−1``;
without it every key is an image. ``property`` holds ``num_classes,height,width``.
"""

from __future__ import annotations

import os
import struct
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._dataset import DecodedDataset

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LENGTH_MASK = (1 << 29) - 1
_HEADER = struct.Struct("<IfQQ")
_CHUNK = 1 << 18


def pack_record(label: float | Sequence[float], payload: bytes, id: int = 0,
                id2: int = 0) -> bytes:
    """``IfQQ`` header (+ float32 label array when ``label`` is a sequence) + payload."""
    if isinstance(label, int | float):
        return _HEADER.pack(0, float(label), id, id2) + payload
    labels = np.asarray(label, dtype="<f4")
    return _HEADER.pack(len(labels), 0.0, id, id2) + labels.tobytes() + payload


def unpack_record(record: bytes, where: str) -> tuple[np.ndarray, bytes]:
    """``(labels, payload)``: the label array (length ≥ 1) and the bytes after the header."""
    if len(record) < _HEADER.size:
        raise ValueError(f"{where}: record of {len(record)} bytes is shorter than its header")
    flag, label, _, _ = _HEADER.unpack_from(record)
    if flag == 0:
        return np.array([label], dtype=np.float32), record[_HEADER.size:]
    end = _HEADER.size + 4 * flag
    if len(record) < end:
        raise ValueError(f"{where}: header announces {flag} labels past the record's end")
    return np.frombuffer(record[_HEADER.size:end], dtype="<f4").copy(), record[end:]


def frame_record(record: bytes) -> bytes:
    """The frames of one record, split at every 4-aligned occurrence of the magic."""
    words = np.frombuffer(record, dtype="<u4", count=len(record) // 4)
    cuts = (4 * np.flatnonzero(words == MAGIC)).tolist()
    starts, stops = [0] + [i + 4 for i in cuts], [*cuts, len(record)]
    frames = []
    for part, (start, stop) in enumerate(zip(starts, stops, strict=True)):
        last = part == len(cuts)
        cflag = 0 if not cuts else 1 if part == 0 else 3 if last else 2
        data = record[start:stop]
        frames.append(struct.pack("<II", MAGIC, cflag << 29 | len(data)) + data
                      + b"\0" * (-len(data) % 4))
    return b"".join(frames)


class RecordIOWriter:
    """Appends records to ``.rec`` and their ``key\\toffset`` lines to ``.idx``."""

    def __init__(self, rec_path: str | Path, idx_path: str | Path) -> None:
        self._rec = Path(rec_path).open("wb")
        self._idx = Path(idx_path).open("w")

    def write(self, key: int, record: bytes) -> None:
        self._idx.write(f"{key}\t{self._rec.tell()}\n")
        self._rec.write(frame_record(record))

    def close(self) -> None:
        self._rec.close()
        self._idx.close()

    def __enter__(self) -> RecordIOWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class RecordIOReader:
    """Random access to records by key; the file handle opens lazily (picklable)."""

    def __init__(self, rec_path: str | Path, idx_path: str | Path) -> None:
        self.rec_path, self.idx_path = Path(rec_path), Path(idx_path)
        for path in (self.rec_path, self.idx_path):
            if not path.is_file():
                raise FileNotFoundError(f"{path}: RecordIO file not found")
        self.size = self.rec_path.stat().st_size
        self.keys, self.offsets = self._read_index()
        self._handle: Any = None

    def _read_index(self) -> tuple[np.ndarray, np.ndarray]:
        """Sorted keys and their offsets (int64 arrays), every line and offset checked.

        Parsed by numpy's C reader (no Python work per line); the text is walked line by line
        only to name a bad line in an error.
        """
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # an empty index: "no data"
            try:
                table = np.loadtxt(self.idx_path, dtype=np.int64, comments=None, ndmin=2)
                parsed = table.size == 0 or table.shape[1] == 2
            except ValueError:
                parsed = False
        if not parsed:
            for number, line in enumerate(self.idx_path.read_text().splitlines(), 1):
                fields = line.split()
                if line.strip() and (len(fields) != 2 or not all(f.isdigit() for f in fields)):
                    raise ValueError(f"{self.idx_path}:{number}: expected 'key<TAB>offset', "
                                     f"got {line[:60]!r}")
            raise ValueError(f"{self.idx_path}: expected 'key<TAB>offset' lines")
        table = table.reshape(-1, 2)
        order = np.argsort(table[:, 0], kind="stable")
        keys, offsets = table[order, 0], table[order, 1]
        past = np.flatnonzero((offsets + 8 > self.size) | (offsets < 0))
        if len(past):
            row = int(order[past[0]])
            lines = [number for number, line in
                     enumerate(self.idx_path.read_text().splitlines(), 1) if line.strip()]
            raise ValueError(f"{self.idx_path}:{lines[row]}: key {keys[past[0]]} offset "
                             f"{offsets[past[0]]} is past the end of {self.rec_path} "
                             f"({self.size} bytes)")
        if len(keys) and (keys[0] < 0 or np.any(keys[1:] == keys[:-1])):
            raise ValueError(f"{self.idx_path}: keys must be distinct and ≥ 0")
        return keys, offsets

    def offset(self, keys: np.ndarray) -> np.ndarray:
        """Offsets of ``keys`` (int64 array); an absent key raises ``ValueError``."""
        if not len(self.keys):
            raise ValueError(f"{self.idx_path}: no records")
        position = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
        missing = np.flatnonzero(self.keys[position] != keys)
        if len(missing):
            raise ValueError(f"{self.idx_path}: no key {keys[missing[0]]}")
        return self.offsets[position]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handle": None}

    def read(self, key: int) -> bytes:
        """The record ``key`` with split frames rejoined; bad framing raises ``ValueError``."""
        position, parts = int(self.offset(np.array([key], dtype=np.int64))[0]), []
        if self._handle is None:
            self._handle = self.rec_path.open("rb")
        while True:
            where = f"{self.rec_path}: record {key} at offset {position}"
            self._handle.seek(position)
            frame = self._handle.read(8)
            if len(frame) < 8:
                raise ValueError(f"{where}: truncated frame header")
            magic, lrec = struct.unpack("<II", frame)
            if magic != MAGIC:
                raise ValueError(f"{where}: bad magic 0x{magic:08x} (expected 0x{MAGIC:08x})")
            cflag, length = lrec >> 29, lrec & _LENGTH_MASK
            if (cflag in (0, 1)) != (not parts) or cflag > 3:
                raise ValueError(f"{where}: unexpected continuation flag {cflag}")
            if position + 8 + length > self.size:
                raise ValueError(f"{where}: length {length} runs past the end of the file")
            parts.append(self._handle.read(length))
            position += 8 + length + (-length % 4)
            if cflag in (0, 3):
                return _MAGIC_BYTES.join(parts)

    def read_image(self, key: object) -> bytes:
        """The encoded image of an image record (payload after the header)."""
        return unpack_record(self.read(int(key)), self.describe(key))[1]

    def describe(self, key: object) -> str:
        return f"{self.rec_path}: record {key}"

    def labels(self, keys: np.ndarray) -> np.ndarray:
        """First label of each record (float64), checking every frame header up front.

        Whole records are parsed from a memory map in vectorised chunks; split records
        (cflag 1) go through ``read``.
        """
        memory = np.memmap(self.rec_path, dtype=np.uint8, mode="r")
        keys_np = np.asarray(keys, dtype=np.int64)
        offsets = self.offset(keys_np)
        labels = np.empty(len(keys_np), dtype=np.float64)
        span = np.arange(8 + _HEADER.size + 4)
        for start in range(0, len(keys_np), _CHUNK):
            chunk = offsets[start:start + _CHUNK]
            raw = memory[np.minimum(chunk[:, None] + span, self.size - 1)]
            words = np.ascontiguousarray(raw[:, :8]).view("<u4")
            flag = np.ascontiguousarray(raw[:, 8:12]).view("<u4")[:, 0].astype(np.int64)
            cflag, length = words[:, 1] >> 29, (words[:, 1] & _LENGTH_MASK).astype(np.int64)
            fast = (words[:, 0] == MAGIC) & (cflag == 0) & (chunk + 8 + length <= self.size) \
                & (length >= _HEADER.size + 4 * np.minimum(flag, 1))
            header_label = np.ascontiguousarray(raw[:, 12:16]).view("<f4")[:, 0]
            first_label = np.ascontiguousarray(raw[:, 32:36]).view("<f4")[:, 0]
            labels[start:start + len(chunk)] = np.where(flag > 0, first_label, header_label)
            for position in np.flatnonzero(~fast):
                key = int(keys_np[start + position])
                labels[start + position] = unpack_record(self.read(key), self.describe(key))[0][0]
        return labels


#: where label scans of RecordIO sets in read-only folders are cached
CACHE_ENV = "MARGINLAB_HOME"


def _label_cache_paths(rec_path: Path) -> list[Path]:
    """Where the label scan of ``rec_path`` is cached: next to it, else under
    ``$MARGINLAB_HOME/cache`` (default ``~/.marginlab``), named after its absolute path."""
    home = Path(os.environ.get(CACHE_ENV, Path.home() / ".marginlab")).expanduser()
    name = str(rec_path.resolve()).replace(os.sep, "_").strip("_")
    return [rec_path.with_name(rec_path.name + ".labels.npz"),
            home / "cache" / "recordio-labels" / f"{name}.npz"]


def _stamp(reader: RecordIOReader) -> np.ndarray:
    """Size and modification time (ns) of the ``.rec`` and the ``.idx``: the cache key."""
    stats = [path.stat() for path in (reader.rec_path, reader.idx_path)]
    return np.array([value for stat in stats for value in (stat.st_size, stat.st_mtime_ns)],
                    dtype=np.int64)


def cached_labels(reader: RecordIOReader, keys: np.ndarray) -> np.ndarray:
    """``reader.labels(keys)``, scanned once per ``.rec``/``.idx`` version and then read from
    a cache (the keys, the labels and the files' sizes and mtimes; any change rescans).

    The scan reads every record's header, O(N) disk seeks: a study's workers and trials
    share one scan instead of paying it each. A cache that cannot be written is skipped.
    """
    stamp, locations = _stamp(reader), _label_cache_paths(reader.rec_path)
    for location in locations:
        try:
            with np.load(location) as cached:
                if np.array_equal(cached["stamp"], stamp) and np.array_equal(cached["keys"],
                                                                             keys):
                    return cached["labels"]
        except (OSError, KeyError, ValueError):
            continue
    labels = reader.labels(keys)
    for location in locations:
        partial = location.with_name(f".{location.name}.{os.getpid()}.partial")
        try:
            location.parent.mkdir(parents=True, exist_ok=True)
            with partial.open("wb") as handle:
                np.savez(handle, stamp=stamp, keys=keys, labels=labels)
            os.replace(partial, location)  # atomic: concurrent workers never read half a file
            break
        except OSError:
            partial.unlink(missing_ok=True)
    return labels


def _paths(path: Path) -> tuple[Path, Path, Path]:
    rec = path if path.suffix == ".rec" else path / "train.rec"
    return rec, rec.with_suffix(".idx"), rec.parent / "property"


def check_recordio(path: str | Path) -> None:
    """The cheap checks of a RecordIO set, before any loading: ``.rec`` and ``.idx`` exist, the
    first index line is ``key<TAB>offset``, the first frame has the magic and fits in the file,
    and ``property`` (when present) parses. ``load_recordio`` checks every record."""
    rec_path, idx_path, property_path = _paths(Path(path))
    for file in (rec_path, idx_path):
        if not file.is_file():
            raise FileNotFoundError(f"{file}: RecordIO file not found")
    with idx_path.open(errors="replace") as handle:
        first = handle.readline()
    fields = first.split()
    if len(fields) != 2 or not all(field.isdigit() for field in fields):
        raise ValueError(f"{idx_path}:1: expected 'key<TAB>offset', got {first[:60]!r}")
    size = rec_path.stat().st_size
    with rec_path.open("rb") as handle:
        header = handle.read(8)
    magic, lrec = struct.unpack("<II", header) if len(header) == 8 else (None, 0)
    if magic != MAGIC:
        raise ValueError(f"{rec_path}: not a RecordIO file (no magic 0x{MAGIC:08x} at offset 0)")
    if 8 + (lrec & _LENGTH_MASK) > size:
        raise ValueError(f"{rec_path}: truncated; the first record runs past the end of the "
                         f"file ({size} bytes)")
    if property_path.is_file():
        read_property(property_path)


def read_property(path: str | Path) -> tuple[int, int, int]:
    """``(num_classes, height, width)`` from an insightface ``property`` file."""
    path = Path(path)
    try:
        values = tuple(int(v) for v in path.read_text().strip().split(","))
    except (OSError, ValueError) as error:
        raise ValueError(f"{path}: expected 'num_classes,height,width' ({error})") from None
    if len(values) != 3 or min(values) < 1:
        raise ValueError(f"{path}: expected three positive integers 'num_classes,height,width'")
    return values[0], values[1], values[2]


def load_recordio(path: str | Path, image_size: int = 112, channels: int = 3,
                  flip: bool = False) -> DecodedDataset:
    """Index an insightface RecordIO set (a directory with ``train.rec``, or a ``.rec`` path).

    Every frame header, the meta record and every label (integral, in
    ``[0, num_classes)`` of ``property`` when present) are checked here; images decode lazily.
    """
    rec_path, idx_path, property_path = _paths(Path(path))
    reader = RecordIOReader(rec_path, idx_path)
    keys = reader.keys
    if len(keys) and keys[0] == 0:
        meta, _ = unpack_record(reader.read(0), reader.describe(0))
        if len(meta) >= 2:
            keys = np.arange(1, int(meta[0]), dtype=np.int64)
            missing = keys[~np.isin(keys, reader.keys)]
            if len(missing):
                raise ValueError(f"{idx_path}: meta record announces image keys 1..{keys[-1]} "
                                 f"but key {missing[0]} is missing")
    if not len(keys):
        raise ValueError(f"{rec_path}: no image records")
    labels = cached_labels(reader, keys)
    num_classes = read_property(property_path)[0] if property_path.is_file() else None
    bad = (labels != np.round(labels)) | (labels < 0)
    if num_classes is not None:
        bad |= labels >= num_classes
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        bound = f"[0, {num_classes}) from {property_path}" if num_classes else "≥ 0"
        raise ValueError(f"{rec_path}: record {keys[first]} has label {labels[first]:g}; labels "
                         f"must be integers in {bound}")
    return DecodedDataset(keys, torch.from_numpy(labels.astype(np.int64)), reader.read_image,
                          reader.describe, image_size, channels, flip)


def write_recordio(directory: str | Path, images: Sequence[bytes], labels: Sequence[int],
                   image_size: tuple[int, int], num_classes: int | None = None) -> None:
    """Write ``train.rec``/``train.idx``/``property`` in insightface's layout.

    Images are stored sorted by label (stable) as keys ``1 … N``, the meta record as key 0
    and one identity record per class as keys ``N+1 … N+C``.
    """
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    labels_np = np.asarray(labels, dtype=np.int64)
    num_classes = int(labels_np.max()) + 1 if num_classes is None else num_classes
    if len(labels_np) == 0 or labels_np.min() < 0 or labels_np.max() >= num_classes:
        raise ValueError(f"labels must be non-empty integers in [0, {num_classes})")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    order = np.argsort(labels_np, kind="stable")
    count = len(order)
    bounds = np.searchsorted(labels_np[order], np.arange(num_classes + 1)) + 1
    with RecordIOWriter(directory / "train.rec", directory / "train.idx") as writer:
        writer.write(0, pack_record([count + 1, count + 1 + num_classes], b""))
        for key, index in enumerate(order, 1):
            writer.write(key, pack_record(float(labels_np[index]), bytes(images[index]), id=key))
        for label in range(num_classes):
            writer.write(count + 1 + label, pack_record([bounds[label], bounds[label + 1]], b""))
    (directory / "property").write_text(f"{num_classes},{image_size[0]},{image_size[1]}")
