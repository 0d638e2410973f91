"""Helpers of the data tests: tiny encoded images with known pixels, one-line error checks."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image


def encode_png(array: np.ndarray) -> bytes:
    """PNG bytes of a uint8 ``(H, W)`` or ``(H, W, 3)`` array (lossless)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def gray(value: int, size: int = 8) -> np.ndarray:
    """A uint8 ``(size, size)`` image whose every pixel is ``value``."""
    return np.full((size, size), value, dtype=np.uint8)


def assert_one_line(error: pytest.ExceptionInfo, *names: str | Path) -> None:
    """The error message is one line and names every ``names`` entry."""
    message = str(error.value)
    assert "\n" not in message, message
    for name in names:
        assert str(name) in message, (name, message)


def encode_jpeg(array: np.ndarray, quality: int = 90) -> bytes:
    """JPEG bytes of a uint8 ``(H, W, 3)`` array (lossy: decoded pixels differ from it)."""
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def random_jpegs(count: int, size: int = 16, seed: int = 0) -> list[bytes]:
    """``count`` distinct RGB JPEG payloads of random noise (asymmetric, so flips show)."""
    rng = np.random.default_rng(seed)
    return [encode_jpeg(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
            for _ in range(count)]
