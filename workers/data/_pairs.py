"""Verification pair files (insightface ``.bin``: lfw.bin, cfp_fp.bin, agedb_30.bin, ...).

Format: a pickle of ``(bins, issame_list)``; ``bins`` holds ``2N`` encoded images (JPEG/PNG,
as ``bytes`` or uint8 numpy arrays), ``issame_list`` ``N`` booleans; pair ``i`` is
``(bins[2i], bins[2i + 1])``. Python-2 pickles load with ``encoding='bytes'``.
"""

from __future__ import annotations

import pickle
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ._dataset import DecodedDataset

_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF8", b"RIFF")


@dataclass(frozen=True)
class PairSet:
    """A pair file: ``images`` (``2N`` lazily decoded images, label = pair index) and
    ``issame`` (``N`` booleans)."""

    name: str
    images: DecodedDataset
    issame: torch.Tensor


class _Blobs:
    """Picklable ``read``/``describe`` for a list of encoded images held in memory."""

    def __init__(self, blobs: list[bytes], path: str) -> None:
        self.blobs, self.path = blobs, path

    def read(self, index: object) -> bytes:
        return self.blobs[int(index)]

    def describe(self, index: object) -> str:
        return f"{self.path}: image {index}"


def read_pairs_bin(path: str | Path, image_size: int = 112, channels: int = 3) -> PairSet:
    """Load a ``.bin`` pair file; structure and image signatures are checked up front."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pair file not found")
    try:
        with path.open("rb") as handle:
            content = pickle.load(handle, encoding="bytes")
        bins, issame = content
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError) as error:
        raise ValueError(f"{path}: not a (bins, issame_list) pickle ({error})") from None
    if len(bins) != 2 * len(issame) or len(issame) == 0:
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs; need exactly "
                         f"2 images per pair and ≥ 1 pair")
    blobs = []
    for index, blob in enumerate(bins):
        data = blob.tobytes() if isinstance(blob, np.ndarray) else bytes(blob)
        if not data.startswith(_SIGNATURES):
            raise ValueError(f"{path}: image {index} is not an encoded JPEG/PNG/BMP/GIF/WebP")
        blobs.append(data)
    source = _Blobs(blobs, str(path))
    labels = torch.arange(len(blobs)) // 2
    images = DecodedDataset(range(len(blobs)), labels, source.read, source.describe,
                            image_size, channels)
    return PairSet(path.stem, images, torch.tensor([bool(s) for s in issame]))


def write_pairs_bin(path: str | Path, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write encoded images (``2N``, pair-interleaved) and ``N`` labels as a ``.bin`` file."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs; need exactly 2 per pair")
    with Path(path).open("wb") as handle:
        pickle.dump(([bytes(image) for image in images], [bool(s) for s in issame]), handle,
                    protocol=pickle.HIGHEST_PROTOCOL)
