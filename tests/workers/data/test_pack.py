"""``python -m workers.data.pack``: round trips from RecordIO (real JPEG payloads), an image
folder and Omniglot; the recorded identity split; bad flags."""

from __future__ import annotations

import collections
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from _data_helpers import encode_png, random_jpegs

from workers.data import (
    alphabet_of_class,
    check_shards,
    decode_image_pixels,
    heldout_dataset,
    load_dataset,
    open_shards,
    parse_data_config,
    write_recordio,
)
from workers.data.pack import main

ROOT = Path(__file__).resolve().parents[3]


def _rows(folder: Path, side: str) -> pa.Table:
    """Every row of one side's shards, in manifest order."""
    shards = open_shards(folder)
    tables = [pq.read_table(path) for path in shards.files(side)]
    return pa.concat_tables(tables) if tables else pa.table({})


def _identity_of(folder: Path) -> dict[tuple[bool, int], int]:
    """(held out?, label on that side) → the identity as the source labels it."""
    table = pq.read_table(folder / "identities.parquet").to_pydict()
    return {(held, label): identity for identity, held, label in
            zip(table["identity"], table["heldout"], table["label"], strict=True)}


def _assert_round_trip(folder: Path, images: list[bytes], identities: list[int]) -> None:
    """Every source image comes back exactly once, under a label that maps back to its
    source identity, and no identity is on both sides."""
    identity_of = _identity_of(folder)
    source = {image: identity for image, identity in zip(images, identities, strict=True)}
    seen: collections.Counter[bytes] = collections.Counter()
    sides: dict[bool, set[int]] = {False: set(), True: set()}
    for held, side in ((False, "train"), (True, "heldout")):
        rows = _rows(folder, side).to_pydict()
        for image, label in zip(rows.get("image", []), rows.get("label", []), strict=True):
            seen[image] += 1
            assert identity_of[(held, label)] == source[image]
            sides[held].add(source[image])
    assert seen == collections.Counter(images)
    assert sides[False] and sides[True] and not sides[False] & sides[True]
    heldout = {identity for (held, _), identity in identity_of.items() if held}
    assert heldout == sides[True]


def test_recordio_round_trip_with_jpegs(tmp_path: Path) -> None:
    images = random_jpegs(90, size=16, seed=1)
    labels = [index // 3 for index in range(90)]  # 30 identities of 3 images
    write_recordio(tmp_path / "rec", images, labels, (16, 16))
    output = tmp_path / "shards"
    assert main(["--source", "recordio", "--input", str(tmp_path / "rec"), "--output",
                 str(output), "--shard-mb", "0.01", "--image-size", "16", "--seed", "3"]) == 0

    shards = check_shards(output)
    manifest = shards.manifest
    assert manifest.train.rows + manifest.heldout.rows == 90
    assert len(manifest.train.shards) > 2 and manifest.channels == 3
    assert manifest.split.seed == 3 and manifest.split.heldout_fraction == 0.2
    assert (manifest.source["kind"], manifest.source["images"]) == ("recordio", 90)
    _assert_round_trip(output, images, labels)

    # the split is the one data.source = recordio makes with the same seed and fraction
    direct = load_dataset(parse_data_config({"source": "recordio", "path": str(tmp_path / "rec"),
                                             "image_size": 16, "channels": 3, "seed": 3}))
    train_rows = _rows(output, "train")
    assert manifest.train.classes == direct.num_classes
    direct_heldout = {labels[int(key) - 1] for key in direct.heldout.keys}  # keys 1..N
    assert direct_heldout == {identity for (held, _), identity in _identity_of(output).items()
                              if held}
    # train rows are shuffled over the shards (the source is sorted by label), with each
    # row's position recorded; held-out rows are sorted by label
    train_labels = train_rows.column("label").to_pylist()
    assert train_labels != sorted(train_labels)
    for path, shard in zip(shards.files("train"), manifest.train.shards, strict=True):
        table = pq.read_table(path)
        assert table.column("row").to_pylist() == list(range(shard.rows))
        assert set(table.column("shard").to_pylist()) == {manifest.train.shards.index(shard)}
    heldout_labels = _rows(output, "heldout").column("label").to_pylist()
    assert heldout_labels == sorted(heldout_labels)

    # held-out images decode from the shards exactly as from the source
    heldout = heldout_dataset(shards)
    source_pixels = {image: decode_image_pixels(image, 16, 3, "x") for image in images}
    rows = _rows(output, "heldout").column("image").to_pylist()
    for index in (0, len(heldout) - 1):
        assert torch.equal(heldout.raw_item(index), source_pixels[rows[index]])

    # seeded: the same flags pack the same bytes
    again = tmp_path / "again"
    assert main(["--source", "recordio", "--input", str(tmp_path / "rec"), "--output",
                 str(again), "--shard-mb", "0.01", "--image-size", "16", "--seed", "3"]) == 0
    assert _rows(again, "train").equals(train_rows)


def test_image_folder_round_trip(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images, identities = [], []
    for identity in range(8):
        folder = tmp_path / "faces" / f"person_{identity}"
        folder.mkdir(parents=True)
        for number in range(3):
            data = encode_png(rng.integers(0, 256, (12, 12, 3), dtype=np.uint8))
            (folder / f"{number}.png").write_bytes(data)
            images.append(data)
            identities.append(identity)
    output = tmp_path / "shards"
    assert main(["--source", "image_folder", "--input", str(tmp_path / "faces"), "--output",
                 str(output), "--heldout-fraction", "0.25", "--image-size", "12"]) == 0
    _assert_round_trip(output, images, identities)
    assert open_shards(output / "manifest.json").manifest.heldout.classes == 2


@pytest.mark.usefixtures("omniglot_npz")  # the checked file, which --input defaults to
def test_omniglot_holds_out_whole_alphabets(tmp_path: Path) -> None:
    output = tmp_path / "shards"
    assert main(["--source", "omniglot", "--output", str(output), "--image-size", "16"]) == 0
    manifest = check_shards(output).manifest
    assert (manifest.image_size, manifest.channels) == (16, 1)
    assert manifest.split.groups == "alphabet"
    assert manifest.train.rows + manifest.heldout.rows == 964 * 20
    alphabets = alphabet_of_class()
    identity_of = _identity_of(output)
    groups = {held: {int(alphabets[identity]) for (side, _), identity in identity_of.items()
                     if side == held} for held in (False, True)}
    assert groups[True] and not groups[False] & groups[True]
    rows = _rows(output, "heldout")
    assert set(rows.column("identity_group").to_pylist()) == groups[True]


@pytest.mark.parametrize(("flags", "expected"), [
    (["--shard-mb", "0"], "error: --shard-mb = 0.0 must be a number > 0"),
    (["--heldout-fraction", "1"], "error: --heldout-fraction = 1.0 must be a number in [0, 1)"),
    (["--image-size", "4"], "error: --image-size = 4 must be an integer in [8, 1024]"),
    (["--channels", "2"], "error: --channels = 2 must be 1 or 3"),
    (["--seed", "-1"], "error: --seed = -1 must be an integer ≥ 0"),
])
def test_bad_flags_are_one_line_errors(flags: list[str], expected: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    write_recordio(tmp_path / "rec", random_jpegs(4), [0, 0, 1, 1], (16, 16))
    assert main(["--source", "recordio", "--input", str(tmp_path / "rec"), "--output",
                 str(tmp_path / "out"), *flags]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert lines == [expected]
    assert not (tmp_path / "out").exists()


def test_unparsable_flag_names_itself(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_code:
        main(["--source", "recordio", "--output", "/tmp/x", "--shard-mb", "big"])
    assert exit_code.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith("error: argument --shard-mb: invalid float value: 'big'; "
                               "--shard-mb: target shard size"), lines


def test_bad_paths_and_sources_name_the_flag(tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("")
    cases = [
        (["--source", "recordio", "--output", str(tmp_path / "o")],
         "error: --input is required by --source recordio"),
        (["--source", "recordio", "--input", "rel/train.rec", "--output", str(tmp_path / "o")],
         "error: --input = 'rel/train.rec' must be an absolute path"),
        (["--source", "image_folder", "--input", str(tmp_path), "--output", "out"],
         "error: --output = 'out' must be an absolute path"),
        (["--source", "image_folder", "--input", str(tmp_path), "--output",
          str(tmp_path / "full")], f"error: --output = '{tmp_path / 'full'}' must be a new or "
                                   "empty folder"),
        (["--source", "omniglot", "--channels", "3", "--output", str(tmp_path / "o")],
         "error: --channels = 3 must be 1 for --source omniglot"),
        (["--source", "recordio", "--input", str(tmp_path / "missing.rec"), "--output",
          str(tmp_path / "o")], f"error: {tmp_path / 'missing.rec'}: RecordIO file not found"),
    ]
    for args, expected in cases:
        assert main(args) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(expected), (args, lines)
    assert not (tmp_path / "o").exists()


def test_runs_as_a_module(tmp_path: Path) -> None:
    """The command a Ray job runs (``python -m workers.data.pack``), its summary and files."""
    write_recordio(tmp_path / "rec", random_jpegs(20), [i // 2 for i in range(20)], (16, 16))
    process = subprocess.run(
        [sys.executable, "-m", "workers.data.pack", "--source", "recordio", "--input",
         str(tmp_path / "rec" / "train.rec"), "--output", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert process.returncode == 0, process.stderr
    assert process.stdout.strip().splitlines()[-1].startswith("packed 16 train images")
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert (manifest["format"], manifest["version"]) == ("marginlab-shards", 1)
    assert manifest["image_size"] == 112 and manifest["source"]["path"].endswith("train.rec")
