"""``python -m workers.data.glyphs`` on the fonts ``install_fonts.sh --ci`` installs: identities
and styles as requested, missing glyphs skipped, deterministic for a seed (also on several
processes), a disjoint split that training reproduces, records that decode to their glyphs."""

from __future__ import annotations

import json
import struct
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fontTools import subset
from fontTools.ttLib import TTFont
from fontTools.ttLib.tables._g_l_y_f import Glyph
from PIL import ImageFont

from workers.data import (
    RecordIOReader,
    check_data_config,
    load_dataset,
    load_recordio,
    parse_data_config,
    read_property,
)
from workers.data.glyphs import (
    BLOCK,
    FONT_EXTENSIONS,
    build_glyphs,
    jitters,
    main,
    place,
    render_glyph,
)

ROOT = Path(__file__).resolve().parents[3]
SCRIPT = ROOT / "workers" / "data" / "install_fonts.sh"
SIZE = 32
STYLES_MIN = 4
# three ideographs every CI font has; the second goes missing from the test font
PRESENT, MISSING, ALSO_PRESENT = (ord(character) for character in "永字木")


@pytest.fixture(scope="module")
def ci_fonts() -> list[Path]:
    """The font files of the CI set's packages (a missing package fails, never skips)."""
    packages = subprocess.run(["bash", str(SCRIPT), "--ci", "--list"], check=True,
                              capture_output=True, text=True).stdout.split()
    files = []
    for package in packages:
        listing = subprocess.run(["dpkg-query", "-L", package], capture_output=True, text=True)
        assert listing.returncode == 0, f"{package} is missing: run bash {SCRIPT} --ci"
        files += [Path(line) for line in listing.stdout.splitlines()
                  if line.endswith(FONT_EXTENSIONS)]
    return sorted(files)


@pytest.fixture(scope="module")
def built(ci_fonts: list[Path], tmp_path_factory: pytest.TempPathFactory
          ) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("glyphs") / "set"
    return out, build_glyphs(out, 40, seed=0, styles_min=STYLES_MIN, size=SIZE, fonts=ci_fonts)


def _styles(out: Path) -> tuple[np.ndarray, np.ndarray]:
    """Each image record's label and style (the header's ``id2``), in key order."""
    reader = RecordIOReader(out / "train.rec", out / "train.idx")
    keys = np.arange(1, reader.keys[-1] - read_property(out / "property")[0] + 1)
    headers = [struct.unpack_from("<IfQQ", reader.read(int(key))) for key in keys]
    return (np.array([header[1] for header in headers], dtype=np.int64),
            np.array([header[3] for header in headers]))


def test_identities_and_styles_as_requested(built: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = built
    dataset = load_recordio(out, image_size=SIZE, channels=1)
    counts = np.bincount(dataset.labels.numpy())
    assert read_property(out / "property") == (40, SIZE, SIZE)
    assert len(counts) == 40 and counts.min() >= STYLES_MIN
    assert manifest["images"] == len(dataset) == counts.sum()
    histogram = {str(k): int(n) for k, n in zip(*np.unique(counts, return_counts=True),
                                                 strict=True)}
    assert manifest["styles_per_identity"] == histogram
    codes = manifest["codepoints"]
    assert len(set(codes)) == 40 and all(BLOCK[0] <= code <= BLOCK[1] for code in codes)
    labels, styles = _styles(out)
    assert np.array_equal(labels, dataset.labels.numpy())
    for label in range(40):  # each image of an identity from its own face
        assert len(set(styles[labels == label])) == counts[label]
    assert [font["images"] for font in manifest["fonts"]] == np.bincount(
        styles, minlength=len(manifest["fonts"])).tolist()
    pixels = dataset.raw_inputs(np.arange(len(dataset))).numpy()
    assert pixels.reshape(len(pixels), -1).max(axis=1).min() > 200  # ink in every image
    assert len({image.tobytes() for image in pixels}) == len(pixels)  # no two alike


def test_records_decode_to_their_glyphs(built: tuple[Path, dict[str, Any]]) -> None:
    """A record's JPEG is its label's ideograph in its style with its jitter, within JPEG
    error; another ideograph in the same style and jitter is far off."""
    out, manifest = built
    dataset = load_recordio(out, image_size=SIZE, channels=1)
    labels, styles = _styles(out)
    fonts, codes = manifest["fonts"], manifest["codepoints"]
    for index in range(0, len(labels), 17):
        code, style = codes[labels[index]], int(styles[index])
        face = fonts[style]
        font = ImageFont.truetype(face["file"], SIZE, index=face["index"],
                                  layout_engine=ImageFont.Layout.BASIC)
        jitter = jitters(0, code, len(fonts), SIZE)[style]
        decoded = dataset.raw_item(index)[0].numpy().astype(np.float64)
        other = codes[(labels[index] + 1) % 40]
        errors = [np.abs(decoded - np.asarray(place(render_glyph(font, drawn), SIZE, jitter),
                                              dtype=np.float64)).mean()
                  for drawn in (code, other)]
        assert errors[0] < 4.0 and errors[1] > 20.0, (index, errors)


def _fonts_lacking(source: Path, out: Path) -> list[Path]:
    """Three TrueType fonts of the three ideographs, each lacking the second one in its way:
    absent from the cmap, mapped to ``.notdef``, mapped to a glyph without outlines."""
    font = TTFont(source)
    subsetter = subset.Subsetter(subset.Options(notdef_outline=True, name_IDs=["*"]))
    subsetter.populate(unicodes=[PRESENT, MISSING, ALSO_PRESENT])
    subsetter.subset(font)
    font.save(out / "subset.ttf")
    paths = []
    for kind in ("absent", "notdef", "empty"):
        font = TTFont(out / "subset.ttf")
        for table in font["cmap"].tables:
            if kind == "absent":
                table.cmap.pop(MISSING, None)
            elif kind == "notdef" and MISSING in table.cmap:
                table.cmap[MISSING] = ".notdef"
        if kind == "empty":
            font["glyf"][font.getBestCmap()[MISSING]] = Glyph()
        paths.append(out / f"lacking-{kind}.ttf")
        font.save(paths[-1])
    (out / "subset.ttf").unlink()
    return paths


def test_missing_glyphs_are_skipped_not_blank(ci_fonts: list[Path], tmp_path: Path) -> None:
    """A face lacking an ideograph gives it no image (no tofu, no blank); with one style too
    few the ideograph is no identity.

    The three lacking fonts share their outlines, so the first of them gives the other
    ideographs their one style from these fonts and the others render them as duplicates."""
    ipa = next(path for path in ci_fonts if path.name == "ipag.ttf")
    lacking = _fonts_lacking(ipa, tmp_path)
    fonts = [*lacking, *(path for path in ci_fonts if path.suffix == ".ttc")]  # + Arphic, WQY
    codes = [PRESENT, MISSING, ALSO_PRESENT]
    manifest = build_glyphs(tmp_path / "all", 3, styles_min=2, size=SIZE, fonts=fonts,
                            codes=codes)
    lacking_styles = {i for i, font in enumerate(manifest["fonts"])
                      if font["file"] in {str(path.resolve()) for path in lacking}}
    labels, styles = _styles(tmp_path / "all")
    styles_of = {code: set(styles[labels == label].tolist())
                 for label, code in enumerate(manifest["codepoints"])}
    assert len(lacking_styles & styles_of[PRESENT]) == 1
    assert len(lacking_styles & styles_of[ALSO_PRESENT]) == 1
    assert not lacking_styles & styles_of[MISSING]
    pixels = load_recordio(tmp_path / "all", SIZE, 1).raw_inputs(np.arange(len(labels)))
    assert pixels.flatten(1).max(dim=1).values.min() > 200
    fewest = len(styles_of[PRESENT])
    assert len(styles_of[MISSING]) == fewest - 1 == len(styles_of[ALSO_PRESENT]) - 1
    kept = build_glyphs(tmp_path / "strict", 2, styles_min=fewest, size=SIZE, fonts=fonts,
                        codes=codes)
    assert sorted(kept["codepoints"]) == sorted([PRESENT, ALSO_PRESENT])
    # the fonts that render it empty only show when rendering: the identity falls short there
    with pytest.raises(ValueError, match="only 2 ideographs render"):
        build_glyphs(tmp_path / "short", 3, styles_min=fewest, size=SIZE,
                     fonts=[lacking[2], *fonts[3:]], codes=codes)
    assert not (tmp_path / "short" / "train.rec").exists()


def test_deterministic_for_a_seed_also_on_two_processes(
        built: tuple[Path, dict[str, Any]], ci_fonts: list[Path], tmp_path: Path) -> None:
    out, manifest = built
    again = build_glyphs(tmp_path / "again", 40, seed=0, styles_min=STYLES_MIN, size=SIZE,
                         fonts=ci_fonts, workers=2)
    for name in ("train.rec", "train.idx", "property"):
        assert (tmp_path / "again" / name).read_bytes() == (out / name).read_bytes(), name
    assert {**again, "data": None} == {**manifest, "data": None}
    other = build_glyphs(tmp_path / "other", 40, seed=1, styles_min=STYLES_MIN, size=SIZE,
                         fonts=ci_fonts)
    assert other["codepoints"] != manifest["codepoints"]
    assert other["split"]["heldout"] != manifest["split"]["heldout"]
    assert (tmp_path / "other" / "train.rec").read_bytes() != (out / "train.rec").read_bytes()


def test_recorded_split_is_disjoint_and_the_one_training_makes(
        built: tuple[Path, dict[str, Any]]) -> None:
    out, manifest = built
    train, heldout = set(manifest["split"]["train"]), set(manifest["split"]["heldout"])
    assert not train & heldout and train | heldout == set(range(40))
    assert len(heldout) == round(0.2 * 40)
    assert json.loads((out / "manifest.json").read_text()) == manifest
    check_data_config(manifest["data"])  # the driver's check before Ray starts
    split = load_dataset(parse_data_config(manifest["data"]))
    reader = RecordIOReader(out / "train.rec", out / "train.idx")
    assert set(reader.labels(split.train.keys).astype(int).tolist()) == train
    assert set(reader.labels(split.heldout.keys).astype(int).tolist()) == heldout
    assert split.num_classes == len(train) and split.input_shape == (1, SIZE, SIZE)


@pytest.mark.parametrize(("flags", "named"), [
    (["--identities", "3"], "--identities"),
    (["--identities", "10", "--styles-min", "1"], "--styles-min"),
    (["--identities", "10", "--styles-max", "3"], "--styles-max"),
    (["--identities", "10", "--heldout-fraction", "0"], "--heldout-fraction"),
    (["--identities", "10", "--size", "8"], "--size"),
    (["--identities", "10", "--fonts", "/no/such/fonts"], "/no/such/fonts"),
])
def test_bad_flags_are_one_line_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                flags: list[str], named: str) -> None:
    assert main([*flags, "--out", str(tmp_path / "set")]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and named in error, error
    assert not (tmp_path / "set").exists()


def test_too_few_styles_in_the_fonts_is_one_line(ci_fonts: list[Path], tmp_path: Path,
                                                 capsys: pytest.CaptureFixture) -> None:
    fonts = [str(path) for path in ci_fonts]
    assert main(["--identities", "10", "--styles-min", "40", "--out", str(tmp_path / "set"),
                 "--fonts", *fonts]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "≥ 40 styles" in error, error
    assert not (tmp_path / "set").exists()
