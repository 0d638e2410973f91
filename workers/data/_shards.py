"""Packed Parquet shards (``data.source: shards``): the manifest, its checks, row access.

``python -m workers.data.pack`` writes one folder: ``manifest.json``, ``identities.parquet``
(the identity split: ``identity`` as in the source, ``heldout``, and ``label``, its label on
its side) and two shard sets: ``train-NNNNN.parquet``, globally shuffled, for Ray Data to
stream, and ``heldout-NNNNN.parquet``, sorted by label in small row groups so that evaluation
reads few of them. A shard row is ``image`` (the encoded image: the source's bytes, or PNG),
``label`` (int64 in ``[0, classes)`` of its side, relabelled as ``split_dataset`` does),
``shard`` and ``row`` (int32: where the row is, so an error can name it) and, when the source
groups its identities (Omniglot's alphabets), ``identity_group``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from ._dataset import DecodedDataset

MANIFEST_FILE = "manifest.json"
IDENTITIES_FILE = "identities.parquet"
FORMAT = "marginlab-shards"
FORMAT_VERSION = 1
SIDES = ("train", "heldout")
#: columns every shard has (``identity_group`` is optional)
COLUMNS = ("image", "label", "shard", "row")


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ShardFile(_Record):
    """One Parquet file of a side: its name in the folder, rows and bytes."""

    file: str = Field(pattern=r"^[^/\\]+\.parquet$")
    rows: int = Field(ge=1)
    bytes: int = Field(ge=1)


class ShardSet(_Record):
    """One side (train or held-out): ``rows`` images of ``classes`` identities."""

    rows: int = Field(ge=0)
    classes: int = Field(ge=0)
    shards: tuple[ShardFile, ...]

    @model_validator(mode="after")
    def _rows_add_up(self) -> ShardSet:
        total = sum(shard.rows for shard in self.shards)
        if total != self.rows:
            raise ValueError(f"rows = {self.rows} but its shards hold {total}")
        return self


class SplitRecord(_Record):
    """How the identities were split (``split_dataset``'s seed semantics) and where the
    per-identity table is."""

    seed: int = Field(ge=0)
    heldout_fraction: float = Field(ge=0.0, lt=1.0)
    #: what was held out whole: "identity", or a grouping such as Omniglot's "alphabet"
    groups: str
    file: str = IDENTITIES_FILE


class ShardManifest(_Record):
    """``manifest.json``: format, source, decoded image size, the split and both sides."""

    format: Literal["marginlab-shards"] = FORMAT
    version: Literal[1] = FORMAT_VERSION
    source: dict[str, Any]
    image_size: int = Field(ge=8, le=1024)
    channels: Literal[1, 3]
    split: SplitRecord
    train: ShardSet
    heldout: ShardSet


@dataclass(frozen=True)
class PackedShards:
    """A packed folder: its ``root`` and its validated ``manifest``."""

    root: Path
    manifest: ShardManifest

    def files(self, side: str) -> list[Path]:
        """The shard paths of ``side`` ("train" or "heldout") in manifest order."""
        return [self.root / shard.file for shard in getattr(self.manifest, side).shards]

    @property
    def input_shape(self) -> tuple[int, int, int]:
        size = self.manifest.image_size
        return (self.manifest.channels, size, size)


def open_shards(path: str | Path) -> PackedShards:
    """Read and validate the manifest (``path`` is the file or its folder); one-line
    ``ValueError`` naming the file and field, ``FileNotFoundError`` when absent."""
    path = Path(path)
    manifest_path = path / MANIFEST_FILE if path.is_dir() else path
    if not manifest_path.is_file():
        raise FileNotFoundError(f"{manifest_path}: no shard manifest (python -m "
                                f"workers.data.pack writes it)")
    try:
        text = manifest_path.read_text()
        json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{manifest_path}: not a JSON manifest ({error})") from None
    try:
        manifest = ShardManifest.model_validate_json(text)
    except ValidationError as error:
        problem = error.errors()[0]
        field = ".".join(str(part) for part in problem["loc"]) or "manifest"
        message = problem["msg"].removeprefix("Value error, ")
        raise ValueError(f"{manifest_path}: {field}: {message}") from None
    return PackedShards(manifest_path.parent, manifest)


def check_shards(path: str | Path) -> PackedShards:
    """The checks before training, from file sizes and Parquet footers only: the manifest
    parses, every shard exists with the recorded size (a truncated one is named with the
    rows it loses), has the columns, the recorded row count, its own ``shard`` index and
    labels within its side's classes (row-group statistics). Images are decoded at first
    read."""
    shards = open_shards(path)
    for side in SIDES:
        record = getattr(shards.manifest, side)
        for index, (shard, file) in enumerate(zip(record.shards, shards.files(side),
                                                  strict=True)):
            _check_shard(file, shard, index, record.classes)
    return shards


def _check_shard(path: Path, shard: ShardFile, index: int, classes: int) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: shard listed in the manifest is missing")
    size = path.stat().st_size
    if size != shard.bytes:
        raise ValueError(f"{path}: {size} bytes, the manifest records {shard.bytes} (truncated "
                         f"or rewritten); rows 0..{shard.rows - 1} cannot be trusted")
    try:
        metadata = pq.read_metadata(path)
    except (pa.ArrowException, OSError) as error:
        raise ValueError(f"{path}: not a readable Parquet shard ({_first_line(error)}); rows "
                         f"0..{shard.rows - 1} cannot be read") from None
    missing = sorted(set(COLUMNS) - set(metadata.schema.names))
    if missing:
        raise ValueError(f"{path}: no column(s) {missing}; a shard needs {list(COLUMNS)}")
    if metadata.num_rows != shard.rows:
        raise ValueError(f"{path}: {metadata.num_rows} rows, the manifest records {shard.rows}")
    columns = {name: metadata.schema.names.index(name) for name in ("label", "shard")}
    first = 0
    for group in range(metadata.num_row_groups):
        row_group = metadata.row_group(group)
        rows = f"rows {first}..{first + row_group.num_rows - 1}"
        label, own = (row_group.column(columns[name]).statistics for name in ("label", "shard"))
        if label is not None and label.has_min_max and not (
                0 <= label.min and label.max < classes):
            raise ValueError(f"{path}: {rows} hold labels {label.min}..{label.max}, outside "
                             f"[0, {classes})")
        if own is not None and own.has_min_max and (own.min, own.max) != (index, index):
            raise ValueError(f"{path}: {rows} are rows of shard {own.min}, not of shard "
                             f"{index} (files renamed or swapped?)")
        first += row_group.num_rows


def _first_line(error: BaseException) -> str:
    return str(error).splitlines()[0] if str(error) else type(error).__name__


class ShardRows:
    """Random access to the encoded images of a list of shards by position over all of them.

    Reads one row group at a time (``image`` column only) and keeps the last one, so reading
    positions in ascending order reads each row group once. Picklable (the cache is dropped).
    """

    def __init__(self, files: list[Path], rows: list[int]) -> None:
        self.files = files
        self.starts = np.cumsum([0, *rows])
        self._groups: dict[int, np.ndarray] = {}
        self._cached: tuple[tuple[int, int], list[bytes]] | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_groups": {}, "_cached": None}

    def locate(self, key: object) -> tuple[int, int]:
        """``(shard index, row in that shard)`` of position ``key``."""
        position = int(key)
        if not 0 <= position < self.starts[-1]:
            raise ValueError(f"row {position} is outside [0, {self.starts[-1]})")
        shard = int(np.searchsorted(self.starts, position, side="right")) - 1
        return shard, position - int(self.starts[shard])

    def describe(self, key: object) -> str:
        shard, row = self.locate(key)
        return f"{self.files[shard]}: row {row}"

    def read(self, key: object) -> bytes:
        """The encoded image at position ``key``."""
        shard, row = self.locate(key)
        if shard not in self._groups:
            metadata = self._metadata(shard)
            sizes = [metadata.row_group(g).num_rows for g in range(metadata.num_row_groups)]
            self._groups[shard] = np.cumsum([0, *sizes])
        starts = self._groups[shard]
        group = int(np.searchsorted(starts, row, side="right")) - 1
        if self._cached is None or self._cached[0] != (shard, group):
            try:
                table = pq.ParquetFile(self.files[shard]).read_row_group(group, columns=["image"])
            except (pa.ArrowException, OSError) as error:
                raise ValueError(f"{self.describe(key)}: cannot read its row group "
                                 f"({_first_line(error)})") from None
            self._cached = ((shard, group), table.column("image").to_pylist())
        return self._cached[1][row - int(starts[group])]

    def _metadata(self, shard: int) -> pq.FileMetaData:
        try:
            return pq.read_metadata(self.files[shard])
        except (pa.ArrowException, OSError) as error:
            raise ValueError(f"{self.files[shard]}: not a readable Parquet shard "
                             f"({_first_line(error)})") from None


def heldout_dataset(shards: PackedShards) -> DecodedDataset:
    """The held-out side as a ``DecodedDataset`` (keys = row positions): its labels are read
    here (the ``label`` column only), its images decode lazily through ``ShardRows``."""
    files, record = shards.files("heldout"), shards.manifest.heldout
    labels = [pq.read_table(file, columns=["label"]).column("label").to_numpy()
              for file in files]
    values = np.concatenate(labels) if labels else np.zeros(0, dtype=np.int64)
    if len(values) != record.rows:
        raise ValueError(f"{shards.root / MANIFEST_FILE}: heldout.rows = {record.rows} but its "
                         f"shards hold {len(values)}")
    reader = ShardRows(files, [shard.rows for shard in record.shards])
    return DecodedDataset(np.arange(record.rows, dtype=np.int64),
                          torch.from_numpy(values.astype(np.int64)), reader.read,
                          reader.describe, shards.manifest.image_size, shards.manifest.channels)
