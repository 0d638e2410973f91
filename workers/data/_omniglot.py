"""Omniglot, background set: 964 handwritten characters × 20 drawers, 30 alphabets.

The npz (``images`` ``(964, 20, 105, 105)`` bool with True = paper, ``labels`` ``(964, 20)``)
stores each alphabet as a contiguous class range, in the order of ``ALPHABETS`` (identified by
inspecting the drawings; the counts are those of the published set). Images are converted to
ink = bright (``~images``), area-resized to ``S × S`` and mapped to ``[−1, 1]``. The file is
never copied: it is read from ``path``, ``$MARGINLAB_OMNIGLOT`` or the default location.
"""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ._dataset import TensorDataset

ENV_VAR = "MARGINLAB_OMNIGLOT"
DEFAULT_PATH = (Path(__file__).resolve().parents[2] / ".." / "shared" / "datasets" / "omniglot"
                / "images_background.npz")

#: (alphabet, number of characters) in class order of images_background.npz
ALPHABETS: tuple[tuple[str, int], ...] = (
    ("Arcadian", 26), ("Armenian", 41), ("Asomtavruli_(Georgian)", 40), ("Balinese", 24),
    ("Bengali", 46), ("Blackfoot_(Canadian_Aboriginal_Syllabics)", 14), ("Braille", 26),
    ("Cyrillic", 33), ("Early_Aramaic", 22), ("Syriac_(Estrangelo)", 23),
    ("Anglo-Saxon_Futhorc", 29), ("Futurama", 26), ("Grantha", 43), ("Greek", 24),
    ("Gujarati", 48), ("Hebrew", 22), ("Japanese_(hiragana)", 52),
    ("Inuktitut_(Canadian_Aboriginal_Syllabics)", 16), ("Malay_(Jawi_-_Arabic)", 40),
    ("Japanese_(katakana)", 47), ("Korean", 40), ("Latin", 26), ("Alphabet_of_the_Magi", 20),
    ("Burmese_(Myanmar)", 34), ("Mkhedruli_(Georgian)", 41), ("N_Ko", 33),
    ("Ojibwe_(Canadian_Aboriginal_Syllabics)", 14), ("Sanskrit", 42), ("Tagalog", 17),
    ("Tifinagh", 55),
)


def resolve_omniglot_path(path: str | Path | None = None) -> Path:
    """``path``, else ``$MARGINLAB_OMNIGLOT``, else ``<repo>/../shared/datasets/omniglot/...``."""
    return Path(path or os.environ.get(ENV_VAR) or DEFAULT_PATH).resolve()


def alphabet_of_class() -> torch.Tensor:
    """The alphabet index (into ``ALPHABETS``) of each of the 964 classes."""
    return torch.arange(len(ALPHABETS)).repeat_interleave(
        torch.tensor([count for _, count in ALPHABETS]))


def check_omniglot(path: str | Path | None = None) -> np.ndarray:
    """The check before any loading: an npz archive whose ``images`` header (read alone) is
    ``(964, 20, H, W)`` and whose ``labels`` (small, read in full) are each row's class index;
    returns the labels. ``load_omniglot`` reads the drawings."""
    path = resolve_omniglot_path(path)
    try:
        with zipfile.ZipFile(path) as archive, archive.open("images.npy") as images:
            version = np.lib.format.read_magic(images)
            read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                           else np.lib.format.read_array_header_2_0)
            shape = read_header(images)[0]
        with np.load(path) as archive:
            labels = archive["labels"]
    except KeyError:
        raise ValueError(f"{path}: not an omniglot npz: it needs 'images' and 'labels'") \
            from None
    except (OSError, ValueError, TypeError, zipfile.BadZipFile):
        raise ValueError(f"{path}: not an npz archive") from None
    _check_arrays(path, shape, labels)
    return labels


def _check_arrays(path: Path, shape: tuple[int, ...], labels: np.ndarray) -> None:
    """``images`` of ``shape`` and ``labels`` are Omniglot's background set."""
    num_classes = sum(count for _, count in ALPHABETS)
    if len(shape) != 4 or shape[0] != num_classes or labels.shape != shape[:2]:
        raise ValueError(f"{path}: expected images (964, 20, H, W) and labels (964, 20), got "
                         f"{shape} and {labels.shape}")
    if not np.array_equal(labels, np.broadcast_to(np.arange(num_classes)[:, None], labels.shape)):
        raise ValueError(f"{path}: labels must equal the class row index")


def load_omniglot(path: str | Path | None = None, image_size: int = 32,
                  flip: bool = False) -> TensorDataset:
    """All 19 280 drawings as ``(1, S, S)`` float32, labels = class (0 … 963)."""
    path = resolve_omniglot_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: omniglot npz not found (set {ENV_VAR} or pass path)")
    try:
        with np.load(path) as archive:
            paper, labels = archive["images"], archive["labels"]
    except (OSError, ValueError, KeyError) as error:
        raise ValueError(f"{path}: not an omniglot npz with 'images' and 'labels' "
                         f"({error})") from None
    _check_arrays(path, paper.shape, labels)
    ink = torch.from_numpy(~paper).reshape(-1, 1, *paper.shape[2:])
    small = torch.cat([F.interpolate(block.float(), size=(image_size, image_size), mode="area")
                       for block in ink.split(2048)])
    return TensorDataset(small * 2 - 1, torch.from_numpy(labels.reshape(-1)), flip)
