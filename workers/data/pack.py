"""Pack a dataset into shuffled Parquet shards for Ray Data ingest (``data.source: shards``).

    python -m workers.data.pack --source recordio --input /data/faces/train.rec \\
        --output /data/faces-shards [--heldout-fraction 0.2] [--seed 0] [--shard-mb 192] \\
        [--image-size 112] [--channels 3]

Sources: ``recordio`` (a ``.rec`` or a folder holding ``train.rec``/``train.idx``),
``image_folder`` (``root/<identity>/<image>``), ``omniglot`` (the npz; ``--input`` defaults to
``$MARGINLAB_OMNIGLOT`` or the shared copy). The identity split is decided here, exactly as
``data.source: <source>`` with the same ``seed`` and ``heldout_fraction`` would split
(``split_dataset``), and recorded; the train side is shuffled once (seeded) over all shards.
Encoded images are copied as they are (Omniglot's drawings are stored as PNG at
``--image-size``); ``--image-size``/``--channels`` are what training decodes them to.
Images stream through one row group at a time, so memory stays bounded whatever the size.

As a Ray job (``ray job submit --working-dir . -- python -m workers.data.pack ...``) the
command runs in a temporary copy of the working dir, so ``--input`` and ``--output`` must be
absolute paths (every node that trains must see ``--output``).
"""

from __future__ import annotations

import argparse
import io
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from workers.cli import OneLineParser
from workers.seeding import derive_seed

from ._dataset import DecodedDataset, LabelledDataset, TensorDataset
from ._image_folder import load_image_folder
from ._omniglot import alphabet_of_class, load_omniglot, resolve_omniglot_path
from ._recordio import load_recordio
from ._shards import (
    IDENTITIES_FILE,
    MANIFEST_FILE,
    ShardFile,
    ShardManifest,
    ShardSet,
    SplitRecord,
)
from ._split import split_dataset

SOURCES = ("recordio", "image_folder", "omniglot")
#: rows per row group of the train shards (Ray Data reads them in slices of this order)
TRAIN_ROW_GROUP_ROWS = 1024
#: rows per row group of the held-out shards: evaluation reads a few images per identity
HELDOUT_ROW_GROUP_ROWS = 32
#: samples whose indices are turned into Python integers at a time
_CHUNK = 1 << 16
MIB = 2**20

Progress = Callable[[Path, int, int], None]


class _ShardWriter:
    """Writes one side's rows, in order, into shards of about ``target_bytes`` of images."""

    def __init__(self, output: Path, side: str, target_bytes: int, row_group_rows: int,
                 grouped: bool, progress: Progress | None) -> None:
        self.output, self.side, self.target_bytes = output, side, target_bytes
        self.row_group_rows, self.grouped, self.progress = row_group_rows, grouped, progress
        fields = [("image", pa.binary()), ("label", pa.int64()), ("shard", pa.int32()),
                  ("row", pa.int32())]
        self.schema = pa.schema(fields + [("identity_group", pa.int64())] * grouped)
        self.shards: list[ShardFile] = []
        self._writer: pq.ParquetWriter | None = None
        self._rows = self._bytes = 0
        self._buffer: list[tuple[bytes, int, int]] = []
        self._buffer_bytes = 0

    def add(self, image: bytes, label: int, group: int) -> None:
        self._buffer.append((image, label, group))
        self._buffer_bytes += len(image)
        if (len(self._buffer) >= self.row_group_rows
                or self._bytes + self._buffer_bytes >= self.target_bytes):
            self._flush()

    def _flush(self) -> None:
        """Write the buffer as one row group; close the shard once it reached its size."""
        if not self._buffer:
            return
        if self._writer is None:
            self._writer = pq.ParquetWriter(self._path(len(self.shards)), self.schema,
                                            compression="none",
                                            write_statistics=["label", "shard", "row"])
        images, labels, groups = zip(*self._buffer, strict=True)
        columns = [pa.array(images, pa.binary()), pa.array(labels, pa.int64()),
                   pa.array([len(self.shards)] * len(images), pa.int32()),
                   pa.array(range(self._rows, self._rows + len(images)), pa.int32())]
        if self.grouped:
            columns.append(pa.array(groups, pa.int64()))
        self._writer.write_table(pa.Table.from_arrays(columns, schema=self.schema))
        self._rows += len(images)
        self._bytes += self._buffer_bytes
        self._buffer, self._buffer_bytes = [], 0
        if self._bytes >= self.target_bytes:
            self._close_shard()

    def _path(self, index: int) -> Path:
        return self.output / f"{self.side}-{index:05d}.parquet"

    def _close_shard(self) -> None:
        if self._writer is None:
            return
        self._writer.close()
        path = self._path(len(self.shards))
        self.shards.append(ShardFile(file=path.name, rows=self._rows,
                                     bytes=path.stat().st_size))
        if self.progress is not None:
            self.progress(path, self._rows, path.stat().st_size)
        self._writer, self._rows, self._bytes = None, 0, 0

    def close(self, classes: int) -> ShardSet:
        self._flush()
        self._close_shard()
        return ShardSet(rows=sum(s.rows for s in self.shards), classes=classes,
                        shards=tuple(self.shards))


def encoded_image(dataset: LabelledDataset, index: int) -> bytes:
    """The encoded image of sample ``index``: a ``DecodedDataset``'s source bytes as they are;
    an in-memory image (uint8, or float in [−1, 1]) as a PNG of its 8-bit pixels."""
    if isinstance(dataset, DecodedDataset):
        return dataset.read(dataset.keys[index])
    pixels = dataset.raw_item(index)
    if pixels.dtype != torch.uint8:  # the inverse of normalise_inputs, rounded to 8 bits
        pixels = ((pixels.float() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    array = pixels.numpy()
    image = Image.fromarray(array[0] if array.shape[0] == 1 else array.transpose(1, 2, 0))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def pack(dataset: LabelledDataset, output: str | Path, *, source: dict[str, Any],
         heldout_fraction: float, seed: int, shard_bytes: int,
         groups: torch.Tensor | None = None, group_name: str = "identity",
         progress: Progress | None = None) -> ShardManifest:
    """Split ``dataset``'s identities (``split_dataset`` semantics; ``groups`` indexed by
    label makes whole groups go together), write the shuffled train shards, the label-sorted
    held-out shards, ``identities.parquet`` and, last, ``manifest.json`` into ``output``
    (created; it must not hold a manifest). Returns the manifest."""
    output = Path(output)
    if (output / MANIFEST_FILE).exists():
        raise ValueError(f"{output}: already holds a packed dataset ({MANIFEST_FILE})")
    output.mkdir(parents=True, exist_ok=True)
    if len(dataset.input_shape) != 3 or dataset.input_shape[0] not in (1, 3):
        raise ValueError(f"can only pack images (1 or 3, S, S), got {dataset.input_shape}")
    # split an index dataset: its inputs are the sample indices, so the subsets say which
    # samples went where and their new labels, exactly as split_dataset relabels
    index = TensorDataset(torch.arange(len(dataset)), dataset.labels)
    train, heldout = split_dataset(index, heldout_fraction, seed, groups)
    generator = torch.Generator().manual_seed(derive_seed("pack", seed))
    order = {"train": torch.randperm(len(train), generator=generator),
             "heldout": torch.sort(heldout.labels, stable=True).indices}
    sides: dict[str, ShardSet] = {}
    identities = []
    for side, subset, row_group_rows in (("train", train, TRAIN_ROW_GROUP_ROWS),
                                         ("heldout", heldout, HELDOUT_ROW_GROUP_ROWS)):
        samples, labels = subset.raw_inputs(order[side]), subset.labels[order[side]]
        original = dataset.labels[samples]
        # a row's identity_group (written only when the source groups its identities)
        group_of = groups[original] if groups is not None else original
        writer = _ShardWriter(output, side, shard_bytes, row_group_rows, groups is not None,
                              progress)
        for start in range(0, len(samples), _CHUNK):
            chunk = slice(start, start + _CHUNK)
            for sample, label, group in zip(samples[chunk].tolist(), labels[chunk].tolist(),
                                            group_of[chunk].tolist(), strict=True):
                writer.add(encoded_image(dataset, sample), label, group)
        classes = int(labels.max()) + 1 if len(labels) else 0
        sides[side] = writer.close(classes)
        identity = torch.zeros(classes, dtype=torch.int64)
        identity[labels] = original
        identities.append(pa.table({"identity": identity.numpy(),
                                    "heldout": np.full(classes, side == "heldout"),
                                    "label": np.arange(classes, dtype=np.int64)}))
    pq.write_table(pa.concat_tables(identities).sort_by("identity"), output / IDENTITIES_FILE)
    channels, size = dataset.input_shape[0], dataset.input_shape[-1]
    manifest = ShardManifest(
        source={**source, "images": len(dataset),
                "identities": int(torch.unique(dataset.labels).numel())},
        image_size=size, channels=channels,
        split=SplitRecord(seed=seed, heldout_fraction=heldout_fraction, groups=group_name),
        train=sides["train"], heldout=sides["heldout"])
    (output / MANIFEST_FILE).write_text(manifest.model_dump_json(indent=2))
    return manifest


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m workers.data.pack", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--source", required=True, choices=SOURCES, help=f"one of {', '.join(SOURCES)}")
    add("--input", default=None,
        help="absolute path: a .rec (or its folder), an image folder, the omniglot npz")
    add("--output", required=True, help="absolute path of a new or empty folder")
    add("--heldout-fraction", type=float, default=0.2,
        help="share of identities held out for evaluation, in [0, 1)")
    add("--seed", type=int, default=0, help="seed of the split and of the shuffle (≥ 0)")
    add("--shard-mb", type=float, default=192.0,
        help="target shard size in MiB of encoded images (> 0; 128–256 suits Ray Data)")
    add("--image-size", type=int, default=None,
        help="decoded image side in [8, 1024] (default 112; omniglot 32)")
    add("--channels", type=int, default=None,
        help="decoded channels, 1 or 3 (default 3; omniglot 1)")
    return parser.parse_args(argv)


def _check_args(args: argparse.Namespace) -> list[str]:
    """One line per bad flag."""
    size = args.image_size
    checks = [
        ("--heldout-fraction", args.heldout_fraction, 0.0 <= args.heldout_fraction < 1.0,
         "a number in [0, 1)"),
        ("--seed", args.seed, args.seed >= 0, "an integer ≥ 0"),
        ("--shard-mb", args.shard_mb, args.shard_mb > 0, "a number > 0"),
        ("--image-size", size, size is None or 8 <= size <= 1024, "an integer in [8, 1024]"),
        ("--channels", args.channels, args.channels in (None, 1, 3), "1 or 3"),
    ]
    errors = [f"{flag} = {value!r} must be {allowed}" for flag, value, ok, allowed in checks
              if not ok]
    if args.source == "omniglot" and args.channels == 3:
        errors.append("--channels = 3 must be 1 for --source omniglot (drawings are grayscale)")
    if args.input is None and args.source != "omniglot":
        errors.append(f"--input is required by --source {args.source}")
    for flag, value in (("--input", args.input), ("--output", args.output)):
        if value is not None and not Path(value).is_absolute():
            errors.append(f"{flag} = {value!r} must be an absolute path (a Ray job runs in a "
                          "temporary copy of the working dir)")
    output = Path(args.output)
    if output.is_absolute() and output.exists() and (not output.is_dir()
                                                    or any(output.iterdir())):
        errors.append(f"--output = {args.output!r} must be a new or empty folder")
    return errors


def _load(args: argparse.Namespace) -> tuple[LabelledDataset, torch.Tensor | None, str]:
    """The source dataset, its identity groups (or None) and the groups' name."""
    if args.source == "omniglot":
        path = resolve_omniglot_path(args.input)
        return load_omniglot(path, args.image_size or 32), alphabet_of_class(), "alphabet"
    size, channels = args.image_size or 112, args.channels or 3
    if args.source == "recordio":
        return load_recordio(Path(args.input), size, channels), None, "identity"
    return load_image_folder(Path(args.input), size, channels), None, "identity"


def main(argv: list[str] | None = None) -> int:
    """Validate the flags, load the source (every header checked), pack; the exit code is 2
    for bad input."""
    args = _parse_args(argv)
    errors = _check_args(args)
    if not errors:
        try:
            dataset, groups, group_name = _load(args)
        except (ValueError, FileNotFoundError) as error:
            errors.append(str(error).splitlines()[0])
    if errors:
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
        return 2
    source = {"kind": args.source,
              "path": str(resolve_omniglot_path(args.input) if args.source == "omniglot"
                          else Path(args.input))}

    def progress(path: Path, rows: int, size: int) -> None:
        print(f"{path.name}: {rows} images, {size / MIB:.1f} MiB", flush=True)

    try:
        manifest = pack(dataset, args.output, source=source,
                        heldout_fraction=args.heldout_fraction, seed=args.seed,
                        shard_bytes=max(1, round(args.shard_mb * MIB)), groups=groups,
                        group_name=group_name, progress=progress)
    except ValueError as error:  # an unreadable record or image met while copying
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    print(f"packed {manifest.train.rows} train images ({manifest.train.classes} identities, "
          f"{len(manifest.train.shards)} shards) and {manifest.heldout.rows} held-out images "
          f"({manifest.heldout.classes} identities, {len(manifest.heldout.shards)} shards) "
          f"into {Path(args.output) / MANIFEST_FILE}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
