"""A many-identity dataset from installed fonts: each identity is one CJK ideograph, each of
its images that ideograph in a different font face, with a small seeded jitter.

    bash workers/data/install_fonts.sh       # Debian CJK font packages (--ci: the small set)
    python -m workers.data.glyphs --identities 10000 --out /data/glyphs [--seed 0] \\
        [--styles-min 12] [--styles-max 0] [--size 64] [--heldout-fraction 0.2] \\
        [--quality 90] [--workers 1] [--fonts /usr/share/fonts]

Identities: the first ``--identities`` code points of the CJK Unified Ideographs block
(U+4E00–U+9FFF), in a seeded order, that ``--styles-min`` styles render; labels 0, 1, ….

Styles of a code point: the font faces (every face of a ``.ttc``/``.otc`` collection) under
``--fonts`` whose cmap maps it to a glyph other than ``.notdef`` (glyph 0), one face per
distinct glyph of a font file (a collection's regional faces often share one glyph), and
then one per distinct rendering: a face whose rendering is empty (no ink) is skipped, as is
one that renders exactly as an earlier face (the same outlines in another file). With more
than ``--styles-max`` (> 0) styles, a seeded subset of that many is kept.

Image of code point c in style f (bright ink on black, ``S × S``, grayscale JPEG): the glyph
rendered by FreeType at ``S`` px per em, cropped to its ink, centred, then scaled by
``s ~ U[0.75, 0.9]``, moved by ``(dx, dy) ~ U[−0.05 S, 0.05 S]²`` and blurred by a Gaussian of
``σ ~ U[0, S / 80]`` px (one resampling: ``Image.resize`` of a source box). The jitter is a
function of the seed, c and f, so no two images are equal; ink within the em stays inside.

Output in ``--out``: ``train.rec``/``train.idx``/``property`` in insightface's layout (image
records keys ``1 … M`` grouped by label, header ``id`` = key and ``id2`` = the style's index in
the manifest's ``fonts``; then one identity record per label and the meta record, key 0,
written last), and ``manifest.json``: the seed and flags, the fonts (file, face index, family,
style, images), each label's code point, the styles-per-identity histogram and the identity
split: ``split_identities`` of the labels with ``--seed`` and ``--heldout-fraction``, the split
training makes with the manifest's ``data`` section and ``python -m workers.data.pack`` with
that seed and fraction. Images stream to disk one identity at a time, rendered on
``--workers`` processes.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import io
import json
import math
import multiprocessing
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from fontTools.ttLib import TTFont, TTLibError
from fontTools.ttLib.sfnt import readTTCHeader
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from workers.cli import OneLineParser
from workers.seeding import derive_seed

from ._recordio import RecordIOWriter, pack_record
from ._split import split_identities

#: the CJK Unified Ideographs block, [first, last]
BLOCK = (0x4E00, 0x9FFF)
DEFAULT_FONTS = Path("/usr/share/fonts")
FONT_EXTENSIONS = (".ttf", ".otf", ".ttc", ".otc")
MANIFEST_FILE = "manifest.json"
#: jitter law, per image: scale s, offset (dx, dy) / S, blur σ / S
SCALE_RANGE = (0.75, 0.9)
OFFSET_RANGE = (-0.05, 0.05)
BLUR_RANGE = (0.0, 1 / 80)


@dataclass(frozen=True)
class FontFace:
    """One face of an installed font file (``index``: its place in a collection, else 0)."""

    file: str
    index: int
    family: str
    style: str


@dataclass(frozen=True)
class Jitter:
    """Where one image's glyph goes: ``scale`` (of the em), offset ``dx``/``dy`` and Gaussian
    ``blur`` (pixels)."""

    scale: float
    dx: float
    dy: float
    blur: float


def find_faces(paths: Sequence[str | Path]) -> tuple[list[FontFace], np.ndarray]:
    """The faces of the font files at ``paths`` (files, or folders searched recursively) that
    map at least one code point of ``BLOCK``, sorted by (real path, index), and their glyph ids
    ``(faces, block size)`` int64 (0: the face lacks the code point). One cmap read per face."""
    files: set[Path] = set()
    for path in map(Path, paths):
        found = path.rglob("*") if path.is_dir() else [path]
        files |= {item.resolve() for item in found
                  if item.suffix.lower() in FONT_EXTENSIONS and item.is_file()}
    faces, rows = [], []
    for file in sorted(files):
        try:
            with file.open("rb") as handle:
                count = readTTCHeader(handle).numFonts if handle.read(4) == b"ttcf" else 1
            for index in range(count):
                with TTFont(file, fontNumber=index, lazy=True) as font:
                    # numbered glyph names: the cmap then needs no real names (a CFF font's
                    # charset, tens of MB per face)
                    font.setGlyphOrder([f"glyph{i}" for i in range(font["maxp"].numGlyphs)])
                    ids = np.zeros(BLOCK[1] - BLOCK[0] + 1, dtype=np.int64)
                    for code, name in (font.getBestCmap() or {}).items():
                        if BLOCK[0] <= code <= BLOCK[1]:
                            ids[code - BLOCK[0]] = font.getGlyphID(name)
                    if ids.any():
                        names = font["name"]
                        faces.append(FontFace(str(file), index,
                                              names.getBestFamilyName() or "",
                                              names.getBestSubFamilyName() or ""))
                        rows.append(ids)
        except (TTLibError, OSError, KeyError, AssertionError) as error:
            raise ValueError(f"{file}: not a readable font ({error})") from None
    return faces, np.stack(rows) if rows else np.zeros((0, 0), dtype=np.int64)


def candidate_styles(glyph_ids: np.ndarray, faces: Sequence[FontFace]) -> list[np.ndarray]:
    """Per code point of ``BLOCK``: the faces mapping it to a glyph, the first face of each
    distinct (file, glyph id), in face order. O(faces × block)."""
    file_of = np.unique([face.file for face in faces], return_inverse=True)[1]
    keys = file_of[:, None] * (int(glyph_ids.max(initial=0)) + 1) + glyph_ids
    styles = []
    for column, key in zip(glyph_ids.T, keys.T, strict=True):
        present = np.flatnonzero(column > 0)
        first = np.unique(key[present], return_index=True)[1]
        styles.append(present[np.sort(first)])
    return styles


def jitters(seed: int, code: int, styles: int, size: int) -> list[Jitter]:
    """The jitter of ``code`` in each of ``styles`` styles (indexed by style): a function of
    ``(seed, code, styles)``."""
    generator = np.random.default_rng(derive_seed("glyph-jitter", seed, code))
    low = [SCALE_RANGE[0], OFFSET_RANGE[0] * size, OFFSET_RANGE[0] * size, BLUR_RANGE[0] * size]
    high = [SCALE_RANGE[1], OFFSET_RANGE[1] * size, OFFSET_RANGE[1] * size, BLUR_RANGE[1] * size]
    return [Jitter(*row) for row in generator.uniform(low, high, (styles, 4)).tolist()]


def render_glyph(font: ImageFont.FreeTypeFont, code: int) -> Image.Image | None:
    """The glyph of ``code`` (bright ink on black) cropped to its ink; None when it has none."""
    left, top, right, bottom = font.getbbox(chr(code))
    if right <= left or bottom <= top:
        return None
    image = Image.new("L", (right - left, bottom - top))
    ImageDraw.Draw(image).text((-left, -top), chr(code), font=font, fill=255)
    ink = image.getbbox()
    return image.crop(ink) if ink else None


def place(glyph: Image.Image, size: int, jitter: Jitter) -> Image.Image:
    """``size × size`` image whose pixel p shows glyph point ``g_c + (p − S/2 − d) / s``
    (``g_c``: the glyph's centre), then blurred: one antialiased resampling of a source box."""
    reach = (size / 2 + max(abs(jitter.dx), abs(jitter.dy))) / jitter.scale
    half = math.ceil(max(glyph.width, glyph.height) / 2 + reach) + 1
    canvas = Image.new("L", (2 * half, 2 * half))
    corner = (half - glyph.width // 2, half - glyph.height // 2)
    canvas.paste(glyph, corner)
    x0 = corner[0] + glyph.width / 2 - (size / 2 + jitter.dx) / jitter.scale
    y0 = corner[1] + glyph.height / 2 - (size / 2 + jitter.dy) / jitter.scale
    window = size / jitter.scale
    image = canvas.resize((size, size), Image.Resampling.BICUBIC,
                          box=(x0, y0, x0 + window, y0 + window))
    return image.filter(ImageFilter.GaussianBlur(jitter.blur)) if jitter.blur > 0 else image


class GlyphRenderer:
    """Renders an identity's images; its fonts open lazily, once per process."""

    def __init__(self, faces: Sequence[FontFace], size: int, seed: int, styles_min: int,
                 styles_max: int, quality: int) -> None:
        self.faces, self.size, self.seed = list(faces), size, seed
        self.styles_min, self.styles_max, self.quality = styles_min, styles_max, quality
        self._fonts: dict[int, ImageFont.FreeTypeFont] = {}

    def font(self, style: int) -> ImageFont.FreeTypeFont:
        if style not in self._fonts:
            face = self.faces[style]
            self._fonts[style] = ImageFont.truetype(face.file, self.size, index=face.index,
                                                    layout_engine=ImageFont.Layout.BASIC)
        return self._fonts[style]

    def images(self, code: int, candidates: Sequence[int]) -> list[tuple[int, Image.Image]]:
        """``(style, image)`` of ``code`` in each candidate style that renders it with ink and
        differently from every earlier one (at most ``styles_max``, a seeded subset)."""
        kept, seen = [], set()
        for style in candidates:
            glyph = render_glyph(self.font(style), code)
            if glyph is not None and (glyph.size, glyph.tobytes()) not in seen:
                seen.add((glyph.size, glyph.tobytes()))
                kept.append((style, glyph))
        if 0 < self.styles_max < len(kept):
            generator = np.random.default_rng(derive_seed("glyph-styles", self.seed, code))
            kept = [kept[i] for i in np.sort(generator.choice(len(kept), self.styles_max,
                                                              replace=False))]
        jitter = jitters(self.seed, code, len(self.faces), self.size)
        return [(style, place(glyph, self.size, jitter[style])) for style, glyph in kept]

    def encode(self, task: tuple[int, np.ndarray]) -> tuple[int, list[tuple[int, bytes]]]:
        """``(code, [(style, JPEG)])``; the list is empty when fewer than ``styles_min``
        styles render ``code``."""
        code, candidates = task
        images = self.images(code, candidates.tolist())
        if len(images) < self.styles_min:
            return code, []
        encoded = []
        for style, image in images:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=self.quality)
            encoded.append((style, buffer.getvalue()))
        return code, encoded


#: a pool worker's renderer, set by the pool's initializer
_worker_renderer: GlyphRenderer


def _start_worker(renderer: GlyphRenderer) -> None:
    global _worker_renderer
    _worker_renderer = renderer


def _encode_in_worker(task: tuple[int, np.ndarray]) -> tuple[int, list[tuple[int, bytes]]]:
    return _worker_renderer.encode(task)


def build_glyphs(out: str | Path, identities: int, *, seed: int = 0, styles_min: int = 12,
                 styles_max: int = 0, size: int = 64, heldout_fraction: float = 0.2,
                 quality: int = 90, workers: int = 1,
                 fonts: Sequence[str | Path] = (DEFAULT_FONTS,),
                 codes: Sequence[int] | None = None) -> dict[str, Any]:
    """Write the dataset into ``out`` (see the module docstring) and return its manifest.

    ``codes``: the code points (in ``BLOCK``) to draw identities from, in place of the whole
    block. Raises ``ValueError`` (one line) when the fonts cannot give ``identities``."""
    out = Path(out)
    if (out / MANIFEST_FILE).exists() or (out / "train.rec").exists():
        raise ValueError(f"{out}: already holds a dataset (train.rec or {MANIFEST_FILE})")
    faces, glyph_ids = find_faces(fonts)
    if not faces:
        raise ValueError(f"no font under {', '.join(map(str, fonts))} has a CJK ideograph; "
                         "install some with workers/data/install_fonts.sh")
    drawn_from = np.arange(BLOCK[0], BLOCK[1] + 1) if codes is None else np.asarray(codes)
    if drawn_from.min() < BLOCK[0] or drawn_from.max() > BLOCK[1]:
        raise ValueError(f"codes must lie in U+{BLOCK[0]:04X}–U+{BLOCK[1]:04X}")
    styles = candidate_styles(glyph_ids, faces)
    order = np.random.default_rng(derive_seed("glyph-identities", seed)).permutation(drawn_from)
    tasks = [(int(code), styles[code - BLOCK[0]]) for code in order
             if len(styles[code - BLOCK[0]]) >= styles_min]
    if len(tasks) < identities:
        raise ValueError(f"only {len(tasks)} ideographs have ≥ {styles_min} styles in the "
                         f"{len(faces)} font faces found; lower --identities or --styles-min, "
                         "or install the full set (workers/data/install_fonts.sh)")
    renderer = GlyphRenderer(faces, size, seed, styles_min, styles_max, quality)
    out.mkdir(parents=True, exist_ok=True)
    labels_codes: list[int] = []
    bounds = [1]  # label l's image keys are [bounds[l], bounds[l + 1])
    per_style, histogram = collections.Counter(), collections.Counter()
    with (RecordIOWriter(out / "train.rec", out / "train.idx") as writer,
          contextlib.closing(_encoded(renderer, tasks, workers)) as results):
        for code, encoded in results:
            if not encoded:
                continue
            label = len(labels_codes)
            for offset, (style, payload) in enumerate(encoded):
                key = bounds[-1] + offset
                writer.write(key, pack_record(float(label), payload, id=key, id2=style))
                per_style[style] += 1
            bounds.append(bounds[-1] + len(encoded))
            labels_codes.append(code)
            histogram[len(encoded)] += 1
            if len(labels_codes) == identities:
                break
        images = bounds[-1] - 1
        if len(labels_codes) == identities:
            for label in range(identities):
                writer.write(images + 1 + label, pack_record(bounds[label:label + 2], b""))
            writer.write(0, pack_record([images + 1, images + 1 + identities], b""))
    if len(labels_codes) < identities:
        (out / "train.rec").unlink()
        (out / "train.idx").unlink()
        raise ValueError(f"only {len(labels_codes)} ideographs render in ≥ {styles_min} "
                         "distinct styles; lower --identities or --styles-min")
    (out / "property").write_text(f"{identities},{size},{size}")
    train, heldout = split_identities(torch.arange(identities), heldout_fraction, seed)
    manifest = {
        "format": "marginlab-glyphs", "seed": seed, "size": size, "quality": quality,
        "styles_min": styles_min, "styles_max": styles_max, "identities": identities,
        "images": images,
        "styles_per_identity": {str(k): histogram[k] for k in sorted(histogram)},
        "fonts": [{**asdict(face), "images": per_style[i]} for i, face in enumerate(faces)],
        "codepoints": labels_codes,
        "split": {"seed": seed, "heldout_fraction": heldout_fraction,
                  "train": train.tolist(), "heldout": heldout.tolist()},
        "data": {"source": "recordio", "path": str(out.resolve()), "seed": seed,
                 "heldout_fraction": heldout_fraction, "image_size": size, "channels": 1}}
    (out / MANIFEST_FILE).write_text(json.dumps(manifest, indent=1, ensure_ascii=False))
    return manifest


def _encoded(renderer: GlyphRenderer, tasks: list[tuple[int, np.ndarray]],
             workers: int) -> Iterator[tuple[int, list[tuple[int, bytes]]]]:
    """``renderer.encode`` of each task, in task order, on ``workers`` processes (the caller
    stops early; the pool's remaining work is then dropped)."""
    if workers == 1:
        yield from map(renderer.encode, tasks)
        return
    context = multiprocessing.get_context("spawn")
    with context.Pool(workers, initializer=_start_worker, initargs=(renderer,)) as pool:
        yield from pool.imap(_encode_in_worker, tasks, chunksize=8)


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = OneLineParser(prog="python -m workers.data.glyphs", description=__doc__,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add = parser.add_argument
    add("--identities", type=int, required=True, help="number of identities (ideographs), ≥ 4")
    add("--out", required=True, help="a new or empty folder")
    add("--seed", type=int, default=0, help="seed of the ideographs, jitter and split (≥ 0)")
    add("--styles-min", type=int, default=12,
        help="keep an ideograph only when at least this many styles render it (≥ 2)")
    add("--styles-max", type=int, default=0,
        help="at most this many styles per ideograph, a seeded subset (0: all; else ≥ "
             "--styles-min)")
    add("--size", type=int, default=64, help="image side in pixels, in [16, 512]")
    add("--heldout-fraction", type=float, default=0.2,
        help="share of identities held out for evaluation, in (0, 1)")
    add("--quality", type=int, default=90, help="JPEG quality, in [50, 100]")
    add("--workers", type=int, default=1, help="rendering processes, ≥ 1")
    add("--fonts", nargs="+", default=[str(DEFAULT_FONTS)],
        help="font files or folders searched recursively (default /usr/share/fonts)")
    return parser.parse_args(argv)


def _check_args(args: argparse.Namespace) -> list[str]:
    """One line per bad flag; the split must leave ≥ 2 identities on each side."""
    fraction_ok = 0.0 < args.heldout_fraction < 1.0
    heldout = max(1, round(args.heldout_fraction * args.identities)) if fraction_ok else 2
    checks = [
        ("--identities", args.identities,
         args.identities >= 4 and 2 <= heldout <= args.identities - 2,
         "an integer ≥ 4 that --heldout-fraction splits into ≥ 2 train and ≥ 2 held-out "
         f"identities (it holds out {heldout})"),
        ("--seed", args.seed, args.seed >= 0, "an integer ≥ 0"),
        ("--styles-min", args.styles_min, args.styles_min >= 2, "an integer ≥ 2"),
        ("--styles-max", args.styles_max,
         args.styles_max == 0 or args.styles_max >= args.styles_min,
         "0 or an integer ≥ --styles-min"),
        ("--size", args.size, 16 <= args.size <= 512, "an integer in [16, 512]"),
        ("--heldout-fraction", args.heldout_fraction, fraction_ok, "a number in (0, 1)"),
        ("--quality", args.quality, 50 <= args.quality <= 100, "an integer in [50, 100]"),
        ("--workers", args.workers, args.workers >= 1, "an integer ≥ 1"),
    ]
    errors = [f"{flag} = {value!r} must be {allowed}" for flag, value, ok, allowed in checks
              if not ok]
    errors += [f"--fonts: {path} not found" for path in args.fonts if not Path(path).exists()]
    return errors


def main(argv: list[str] | None = None) -> int:
    """Validate the flags, build; the exit code is 2 for bad input."""
    args = _parse_args(argv)
    errors = _check_args(args)
    if errors:
        for line in errors:
            print(f"error: {line}", file=sys.stderr)
        return 2
    start = time.perf_counter()
    try:
        manifest = build_glyphs(args.out, args.identities, seed=args.seed,
                                styles_min=args.styles_min, styles_max=args.styles_max,
                                size=args.size, heldout_fraction=args.heldout_fraction,
                                quality=args.quality, workers=args.workers, fonts=args.fonts)
    except ValueError as error:
        print(f"error: {str(error).splitlines()[0]}", file=sys.stderr)
        return 2
    seconds, rec = time.perf_counter() - start, Path(args.out) / "train.rec"
    counts = [int(k) for k, n in manifest["styles_per_identity"].items() for _ in range(n)]
    print(f"wrote {manifest['identities']} identities, {manifest['images']} images (styles "
          f"per identity min {min(counts)}, median {int(np.median(counts))}, max {max(counts)}; "
          f"{sum(f['images'] > 0 for f in manifest['fonts'])} of {len(manifest['fonts'])} "
          f"faces used) to {rec} ({rec.stat().st_size / 2**20:.1f} MiB) in "
          f"{seconds:.1f} s ({manifest['images'] / seconds:.0f} images/s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
