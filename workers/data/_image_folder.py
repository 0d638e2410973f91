"""Image folders: ``root/<identity>/<image>``, one sub-folder per identity.

Identities are the sub-folder names in sorted order (label = position); images are the files
with a known image extension, sorted by name; decoding (PIL, grayscale or RGB, bilinear resize
to ``S × S``, ``x/127.5 − 1``) happens lazily per item.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from ._dataset import DecodedDataset

IMAGE_EXTENSIONS: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".pgm", ".ppm", ".gif", ".webp", ".tif", ".tiff"})


def _read_file(path: object) -> bytes:
    try:
        return Path(str(path)).read_bytes()
    except OSError as error:
        raise ValueError(f"{path}: cannot read image ({error.strerror})") from None


def _describe_file(path: object) -> str:
    return str(path)


def load_image_folder(root: str | Path, image_size: int = 112, channels: int = 3,
                      flip: bool = False) -> DecodedDataset:
    """Index ``root`` (every identity must hold ≥ 1 image); images decode on access."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: image folder not found")
    with os.scandir(root) as entries:
        identities = sorted(entry.path for entry in entries if entry.is_dir())
    if not identities:
        raise ValueError(f"{root}: no identity sub-folders")
    paths: list[str] = []
    counts = torch.empty(len(identities), dtype=torch.int64)
    for label, folder in enumerate(identities):  # one directory listing per identity
        with os.scandir(folder) as entries:  # file types from the listing: no stat per image
            images = sorted(entry.path for entry in entries if entry.is_file()
                            and Path(entry.name).suffix.lower() in IMAGE_EXTENSIONS)
        if not images:
            raise ValueError(f"{folder}: identity folder has no images (extensions: "
                             f"{sorted(IMAGE_EXTENSIONS)})")
        paths += images
        counts[label] = len(images)
    labels = torch.arange(len(identities)).repeat_interleave(counts)
    return DecodedDataset(paths, labels, _read_file, _describe_file, image_size, channels, flip)
