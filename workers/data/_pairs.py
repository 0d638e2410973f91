"""Verification pair files (insightface ``.bin``: lfw.bin, cfp_fp.bin, agedb_30.bin, ...).

Format: a pickle of ``(bins, issame_list)``; ``bins`` holds ``2N`` encoded images (JPEG/PNG,
as ``bytes`` or uint8 numpy arrays), ``issame_list`` ``N`` booleans; pair ``i`` is
``(bins[2i], bins[2i + 1])``. Python-2 pickles load with ``encoding='bytes'``.

A pickle can run code when it loads, so a ``.bin`` is read by ``_PairUnpickler``, which builds
only what the format needs — bytes, lists, tuples, bools, numbers and numpy arrays — and
refuses any other global (a class, a function, a module) before importing it.
"""

from __future__ import annotations

import builtins
import importlib
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ._dataset import DecodedDataset

_SIGNATURES = (b"\xff\xd8\xff", b"\x89PNG\r\n\x1a\n", b"BM", b"GIF8", b"RIFF")
#: numpy's pickling helpers (``numpy._core`` from numpy 2 on; pickles may name either)
_CORE = "numpy._core" if hasattr(np, "_core") else "numpy.core"
_MULTIARRAY = importlib.import_module(f"{_CORE}.multiarray")
_NUMERIC = importlib.import_module(f"{_CORE}.numeric")


def _latin1(text: str, encoding: str = "latin1") -> bytes:
    """``_codecs.encode`` as protocol-2 pickles of ``bytes`` use it, and nothing more."""
    if encoding != "latin1":
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


#: every global a pair file may name: bytes (as Python 2 and 3 pickle them), numpy arrays
_ALLOWED: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("_codecs", "encode"): _latin1,
    **{(module, name): getattr(builtins, name)
       for module in ("builtins", "__builtin__") for name in ("bytes", "bytearray")},
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    **{(f"{core}.multiarray", name): getattr(_MULTIARRAY, name)
       for core in ("numpy.core", "numpy._core") for name in ("_reconstruct", "scalar")},
    **{(f"{core}.numeric", "_frombuffer"): _NUMERIC._frombuffer  # protocol 5 arrays
       for core in ("numpy.core", "numpy._core")},
}


class _PairUnpickler(pickle.Unpickler):
    """Loads only the globals in ``_ALLOWED``; any other is an ``UnpicklingError`` naming it
    (nothing is imported for it)."""

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refers to {module}.{name}; a pair file may hold only bytes, lists, bools and "
                "numpy arrays") from None


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


def _is_bool(value: object) -> bool:
    return isinstance(value, bool | np.bool_) or (isinstance(value, int | np.integer)
                                                  and value in (0, 1))


def read_pairs_bin(path: str | Path, image_size: int = 112, channels: int = 3) -> PairSet:
    """Load a ``.bin`` pair file (restricted unpickling); its structure, every image's
    signature and the first image's decoding are checked up front, one line naming the file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: pair file not found")
    try:
        with path.open("rb") as handle:
            content = _PairUnpickler(handle, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError,
            IndexError, KeyError, MemoryError) as error:
        message = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ValueError(f"{path}: not a (bins, issame_list) pickle ({message})") from None
    if not (isinstance(content, tuple | list) and len(content) == 2):
        raise ValueError(f"{path}: not a (bins, issame_list) pickle (it holds "
                         f"{type(content).__name__})")
    bins, issame = content
    if not all(isinstance(part, list | tuple | np.ndarray) for part in content):
        raise ValueError(f"{path}: bins and issame_list must be lists, got "
                         f"{type(bins).__name__} and {type(issame).__name__}")
    if len(bins) != 2 * len(issame) or len(issame) == 0:
        raise ValueError(f"{path}: {len(bins)} images for {len(issame)} pairs; need exactly "
                         f"2 images per pair and ≥ 1 pair")
    bad = next((i for i, same in enumerate(issame) if not _is_bool(same)), None)
    if bad is not None:
        raise ValueError(f"{path}: issame_list[{bad}] = {issame[bad]!r} is not a boolean")
    blobs = []
    for index, blob in enumerate(bins):
        if isinstance(blob, np.ndarray) and blob.dtype == np.uint8:
            data = blob.tobytes()
        elif isinstance(blob, bytes | bytearray):
            data = bytes(blob)
        else:
            raise ValueError(f"{path}: image {index} is a {type(blob).__name__}, not encoded "
                             "image bytes")
        if not data.startswith(_SIGNATURES):
            raise ValueError(f"{path}: image {index} is not an encoded JPEG/PNG/BMP/GIF/WebP")
        blobs.append(data)
    source = _Blobs(blobs, str(path))
    labels = torch.arange(len(blobs)) // 2
    images = DecodedDataset(range(len(blobs)), labels, source.read, source.describe,
                            image_size, channels)
    images[0]  # a payload that does not decode fails here, naming the file and the image
    return PairSet(path.stem, images, torch.tensor([bool(s) for s in issame]))


def write_pairs_bin(path: str | Path, images: Sequence[bytes], issame: Sequence[bool]) -> None:
    """Write encoded images (``2N``, pair-interleaved) and ``N`` labels as a ``.bin`` file."""
    if len(images) != 2 * len(issame):
        raise ValueError(f"{len(images)} images for {len(issame)} pairs; need exactly 2 per pair")
    with Path(path).open("wb") as handle:
        pickle.dump(([bytes(image) for image in images], [bool(s) for s in issame]), handle,
                    protocol=pickle.HIGHEST_PROTOCOL)
