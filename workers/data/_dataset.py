"""Labelled datasets every source produces: in-memory tensors or images decoded per item.

A dataset holds ``labels`` (an int64 tensor, one per sample) and ``input_shape``; ``item(i)``
returns one float32 input, ``inputs(indices)`` a stacked batch and ``batch(indices, generator)``
the ``(inputs, labels)`` the train loop feeds, with a random horizontal flip per sample when
the dataset was built with ``flip=True`` (training augmentation; ``item`` never flips).

The ``raw_*`` forms return what a data-loader process hands over: decoded images as ``uint8``
pixels (4× smaller than float32 across the process boundary), in-memory tensors as they are.
``normalise_inputs`` turns them into model inputs, on whatever device they are by then:
pixels ``x ↦ x/127.5 − 1`` (range [0, 255] → [−1, 1]), float inputs unchanged. Every path
(``item``, ``inputs``, ``batch`` and the loader) goes through it, so they agree bitwise.
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset


def normalise_inputs(raw: torch.Tensor) -> torch.Tensor:
    """Model inputs from raw inputs: ``uint8`` pixels ↦ float32 ``x/127.5 − 1``; float inputs
    are returned as they are."""
    if raw.dtype != torch.uint8:
        return raw
    return raw.to(torch.float32).div_(127.5).sub_(1.0)


def decode_image_pixels(data: bytes, image_size: int, channels: int,
                        where: str) -> torch.Tensor:
    """Decode an encoded image (JPEG/PNG/...) to ``(channels, S, S)`` ``uint8`` pixels.

    Grayscale (``channels=1``) or RGB (``3``), bilinear resize to ``S × S`` when the size
    differs. ``where`` names the file/record in the error.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
            array = np.array(image, dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"{where}: cannot decode image ({error})") from None
    tensor = torch.from_numpy(array)
    return tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1).contiguous()


def decode_image(data: bytes, image_size: int, channels: int, where: str) -> torch.Tensor:
    """``decode_image_pixels`` normalised: a ``(channels, S, S)`` float32 tensor in [−1, 1]."""
    return normalise_inputs(decode_image_pixels(data, image_size, channels, where))


def random_flip(inputs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Flip each image of ``(B, C, H, W)`` horizontally with probability 1/2 (a new tensor)."""
    mask = torch.rand(len(inputs), generator=generator) < 0.5
    return torch.where(mask.view(-1, 1, 1, 1), inputs.flip(-1), inputs)


class LabelledDataset(Dataset):
    """Base of every dataset: ``labels``, ``input_shape``, ``flip``; subclasses give ``item``."""

    labels: torch.Tensor
    input_shape: tuple[int, ...]
    flip: bool

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.item(index), int(self.labels[index])

    def raw_item(self, index: int) -> torch.Tensor:
        """One raw input (``uint8`` pixels or a float tensor)."""
        raise NotImplementedError

    def item(self, index: int) -> torch.Tensor:
        return normalise_inputs(self.raw_item(index))

    def raw_inputs(self, indices: torch.Tensor) -> torch.Tensor:
        """The raw inputs at ``indices``, stacked (no augmentation)."""
        return torch.stack([self.raw_item(int(i)) for i in indices])

    def inputs(self, indices: torch.Tensor) -> torch.Tensor:
        """The inputs at ``indices``, stacked (no augmentation)."""
        return normalise_inputs(self.raw_inputs(indices))

    def raw_batch(self, indices: torch.Tensor, generator: torch.Generator | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(raw inputs, labels)`` at ``indices``, randomly flipped when ``self.flip``."""
        inputs = self.raw_inputs(indices)
        if self.flip:
            inputs = random_flip(inputs, generator)
        return inputs, self.labels[indices]

    def batch(self, indices: torch.Tensor,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, labels)`` at ``indices``, randomly flipped when ``self.flip``."""
        inputs, labels = self.raw_batch(indices, generator)
        return normalise_inputs(inputs), labels

    def subset(self, indices: torch.Tensor, labels: torch.Tensor,
               flip: bool = False) -> LabelledDataset:
        """The samples at ``indices``, relabelled with ``labels``."""
        raise NotImplementedError


class TensorDataset(LabelledDataset):
    """Inputs held in memory as one ``(N, *input_shape)`` tensor (float32, or ``uint8``
    pixels)."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, flip: bool = False) -> None:
        if len(inputs) != len(labels):
            raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
        if flip and inputs.dim() != 4:
            raise ValueError(f"flip needs image inputs (N, C, H, W), got {tuple(inputs.shape)}")
        self.data = inputs
        self.labels = labels.to(torch.int64)
        self.input_shape = tuple(inputs.shape[1:])
        self.flip = flip

    def raw_item(self, index: int) -> torch.Tensor:
        return self.data[index]

    def raw_inputs(self, indices: torch.Tensor) -> torch.Tensor:
        return self.data[indices]

    def subset(self, indices: torch.Tensor, labels: torch.Tensor,
               flip: bool = False) -> TensorDataset:
        return TensorDataset(self.data[indices], labels, flip)


class DecodedDataset(LabelledDataset):
    """Encoded images decoded lazily, one per ``item`` call.

    ``keys`` holds each sample's source key (a numpy array: int64 record keys, or objects
    such as file paths); ``read(key) -> bytes`` fetches the encoded image and
    ``describe(key)`` names it for errors. Both callables must be picklable for data-loader
    workers.
    """

    def __init__(self, keys: Sequence | np.ndarray, labels: torch.Tensor,
                 read: Callable[[object], bytes], describe: Callable[[object], str],
                 image_size: int, channels: int, flip: bool = False) -> None:
        if len(keys) != len(labels):
            raise ValueError(f"{len(keys)} images but {len(labels)} labels")
        self.keys = keys if isinstance(keys, np.ndarray) else np.array(list(keys), dtype=object)
        self.labels = labels.to(torch.int64)
        self.read, self.describe = read, describe
        self.image_size, self.channels = image_size, channels
        self.input_shape = (channels, image_size, image_size)
        self.flip = flip

    def raw_item(self, index: int) -> torch.Tensor:
        key = self.keys[index]
        return decode_image_pixels(self.read(key), self.image_size, self.channels,
                                   self.describe(key))

    def subset(self, indices: torch.Tensor, labels: torch.Tensor,
               flip: bool = False) -> DecodedDataset:
        keys = self.keys[np.asarray(indices, dtype=np.int64)]
        return DecodedDataset(keys, labels, self.read, self.describe, self.image_size,
                              self.channels, flip)
