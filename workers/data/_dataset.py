"""Labelled datasets every source produces: in-memory tensors or images decoded per item.

A dataset holds ``labels`` (an int64 tensor, one per sample) and ``input_shape``; ``item(i)``
returns one float32 input, ``inputs(indices)`` a stacked batch and ``batch(indices, generator)``
the ``(inputs, labels)`` the train loop feeds, with a random horizontal flip per sample when
the dataset was built with ``flip=True`` (training augmentation; ``item`` never flips).
Decoded images are normalised to ``x/127.5 − 1`` (pixel range [0, 255] → [−1, 1]).
"""

from __future__ import annotations

import io
from collections.abc import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset


def decode_image(data: bytes, image_size: int, channels: int, where: str) -> torch.Tensor:
    """Decode an encoded image (JPEG/PNG/...) to a ``(channels, S, S)`` float32 tensor.

    Grayscale (``channels=1``) or RGB (``3``), bilinear resize to ``S × S`` when the size
    differs, then ``x/127.5 − 1``. ``where`` names the file/record in the error.
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image = image.convert("L" if channels == 1 else "RGB")
            if image.size != (image_size, image_size):
                image = image.resize((image_size, image_size), Image.Resampling.BILINEAR)
            array = np.asarray(image, dtype=np.float32)
    except (UnidentifiedImageError, OSError, ValueError) as error:
        raise ValueError(f"{where}: cannot decode image ({error})") from None
    tensor = torch.from_numpy(array / 127.5 - 1.0)
    return tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1).contiguous()


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

    def item(self, index: int) -> torch.Tensor:
        raise NotImplementedError

    def inputs(self, indices: torch.Tensor) -> torch.Tensor:
        """The inputs at ``indices``, stacked (no augmentation)."""
        return torch.stack([self.item(int(i)) for i in indices])

    def batch(self, indices: torch.Tensor,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(inputs, labels)`` at ``indices``, randomly flipped when ``self.flip``."""
        inputs = self.inputs(indices)
        if self.flip:
            inputs = random_flip(inputs, generator)
        return inputs, self.labels[indices]

    def subset(self, indices: torch.Tensor, labels: torch.Tensor,
               flip: bool = False) -> LabelledDataset:
        """The samples at ``indices``, relabelled with ``labels``."""
        raise NotImplementedError


class TensorDataset(LabelledDataset):
    """Inputs held in memory as one ``(N, *input_shape)`` float32 tensor."""

    def __init__(self, inputs: torch.Tensor, labels: torch.Tensor, flip: bool = False) -> None:
        if len(inputs) != len(labels):
            raise ValueError(f"{len(inputs)} inputs but {len(labels)} labels")
        if flip and inputs.dim() != 4:
            raise ValueError(f"flip needs image inputs (N, C, H, W), got {tuple(inputs.shape)}")
        self.data = inputs
        self.labels = labels.to(torch.int64)
        self.input_shape = tuple(inputs.shape[1:])
        self.flip = flip

    def item(self, index: int) -> torch.Tensor:
        return self.data[index]

    def inputs(self, indices: torch.Tensor) -> torch.Tensor:
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

    def item(self, index: int) -> torch.Tensor:
        key = self.keys[index]
        return decode_image(self.read(key), self.image_size, self.channels, self.describe(key))

    def subset(self, indices: torch.Tensor, labels: torch.Tensor,
               flip: bool = False) -> DecodedDataset:
        keys = self.keys[np.asarray(indices, dtype=np.int64)]
        return DecodedDataset(keys, labels, self.read, self.describe, self.image_size,
                              self.channels, flip)
