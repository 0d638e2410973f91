"""The dataset base: decoding, in-memory and lazily decoded datasets, subsets, flips, seeds."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _data_helpers import assert_one_line, encode_png, gray

from workers.data import DecodedDataset, TensorDataset, decode_image, random_flip
from workers.seeding import derive_seed


def test_decode_image_normalises_and_resizes() -> None:
    image = decode_image(encode_png(gray(255, size=6)), image_size=3, channels=1, where="x")
    assert image.shape == (1, 3, 3) and image.dtype == torch.float32
    assert torch.allclose(image, torch.ones(1, 3, 3))
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 2] = 255
    decoded = decode_image(encode_png(rgb), image_size=4, channels=3, where="x")
    assert decoded[2].eq(1).all() and decoded[0].eq(-1).all()


def test_decode_error_is_one_line_naming_the_source() -> None:
    with pytest.raises(ValueError, match="cannot decode") as error:
        decode_image(b"\x89PNG\r\n\x1a\n broken", 4, 1, where="file.png")
    assert_one_line(error, "file.png")


def test_tensor_dataset_batches_and_subsets() -> None:
    data = torch.arange(24.0).view(6, 1, 2, 2)
    dataset = TensorDataset(data, torch.tensor([0, 0, 1, 1, 2, 2]))
    inputs, labels = dataset.batch(torch.tensor([4, 1]))
    assert torch.equal(inputs, data[[4, 1]]) and labels.tolist() == [2, 0]
    part = dataset.subset(torch.tensor([2, 3]), torch.tensor([0, 0]), flip=True)
    assert part.flip and not dataset.flip and torch.equal(part.data, data[2:4])
    with pytest.raises(ValueError, match="labels"):
        TensorDataset(data, torch.tensor([0]))
    with pytest.raises(ValueError, match="flip needs image"):
        TensorDataset(torch.zeros(3, 4), torch.zeros(3), flip=True)


def test_decoded_dataset_subset_keeps_the_source() -> None:
    blobs = {f"k{v}": encode_png(gray(v, 4)) for v in (0, 51, 102)}
    dataset = DecodedDataset(list(blobs), torch.tensor([3, 4, 5]), blobs.__getitem__, str, 4, 1)
    part = dataset.subset(torch.tensor([2, 0]), torch.tensor([1, 0]))
    assert part.keys.tolist() == ["k102", "k0"] and part.labels.tolist() == [1, 0]
    assert torch.allclose(part.inputs(torch.tensor([0])), torch.full((1, 1, 4, 4), 102 / 127.5 - 1))


def test_random_flip_is_seeded_and_does_not_mutate() -> None:
    images = torch.arange(32.0).view(8, 1, 2, 2)
    before = images.clone()
    first = random_flip(images, torch.Generator().manual_seed(1))
    assert torch.equal(images, before)
    assert torch.equal(first, random_flip(images, torch.Generator().manual_seed(1)))
    flipped = [bool(torch.equal(f, i.flip(-1))) for f, i in zip(first, images, strict=True)]
    assert 0 < sum(flipped) < 8


def test_derive_seed_is_stable_and_mixing() -> None:
    assert derive_seed("a", 1, 2) == derive_seed("a", 1, 2)
    seeds = {derive_seed("a", 1, 2), derive_seed("a", 2, 1), derive_seed("a", 1),
             derive_seed("a", 1, 2, 0), derive_seed("b", 1, 2), derive_seed("a")}
    assert len(seeds) == 6
    assert 0 <= derive_seed("a", 123) < 2**63
