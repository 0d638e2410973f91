"""Image folders: one sub-folder per identity, lazy PIL decoding, resize, flip, errors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from _data_helpers import assert_one_line, encode_png, gray

from workers.data import load_image_folder


def _make(root, layout: dict[str, list[np.ndarray]]) -> None:
    for identity, images in layout.items():
        (root / identity).mkdir(parents=True)
        for index, image in enumerate(images):
            (root / identity / f"{index:03d}.png").write_bytes(encode_png(image))


def test_labels_follow_sorted_folders_and_pixels_are_normalised(tmp_path) -> None:
    _make(tmp_path, {"bob": [gray(200)], "alice": [gray(0), gray(255)], "carol": [gray(51)]})
    (tmp_path / "alice" / "notes.txt").write_text("ignored")
    dataset = load_image_folder(tmp_path, image_size=8, channels=1)
    assert dataset.labels.tolist() == [0, 0, 1, 2]
    assert dataset.input_shape == (1, 8, 8)
    values = [float(dataset[i][0].mean()) for i in range(4)]
    assert values == pytest.approx([-1.0, 1.0, 200 / 127.5 - 1, 51 / 127.5 - 1])


def test_resize_and_rgb(tmp_path) -> None:
    rgb = np.zeros((10, 6, 3), dtype=np.uint8)
    rgb[..., 0] = 255
    _make(tmp_path, {"a": [rgb]})
    image = load_image_folder(tmp_path, image_size=4, channels=3)[0][0]
    assert image.shape == (3, 4, 4)
    assert torch.allclose(image[0], torch.ones(4, 4))
    assert torch.allclose(image[1], -torch.ones(4, 4))
    gray_image = load_image_folder(tmp_path, image_size=4, channels=1)[0][0]
    assert gray_image.shape == (1, 4, 4)


def test_flip_augments_batches_only(tmp_path) -> None:
    ramp = np.tile(np.arange(0, 256, 32, dtype=np.uint8), (8, 1))
    _make(tmp_path, {"a": [ramp] * 16})
    plain = load_image_folder(tmp_path, image_size=8, channels=1)
    flipped = load_image_folder(tmp_path, image_size=8, channels=1, flip=True)
    assert torch.equal(flipped[0][0], plain[0][0])
    indices = torch.arange(16)
    inputs, labels = flipped.batch(indices, torch.Generator().manual_seed(0))
    original = plain.inputs(indices)
    is_flipped = [torch.equal(x, o.flip(-1)) for x, o in zip(inputs, original, strict=True)]
    is_same = [torch.equal(x, o) for x, o in zip(inputs, original, strict=True)]
    assert all(f or s for f, s in zip(is_flipped, is_same, strict=True))
    assert 0 < sum(is_flipped) < 16
    again, _ = flipped.batch(indices, torch.Generator().manual_seed(0))
    assert torch.equal(again, inputs) and labels.tolist() == [0] * 16


def test_missing_root(tmp_path) -> None:
    with pytest.raises(FileNotFoundError) as error:
        load_image_folder(tmp_path / "absent")
    assert_one_line(error, tmp_path / "absent")


def test_empty_root(tmp_path) -> None:
    with pytest.raises(ValueError, match="no identity") as error:
        load_image_folder(tmp_path)
    assert_one_line(error, tmp_path)


def test_identity_without_images(tmp_path) -> None:
    _make(tmp_path, {"a": [gray(1)], "b": []})
    (tmp_path / "b" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match="no images") as error:
        load_image_folder(tmp_path)
    assert_one_line(error, tmp_path / "b")


def test_undecodable_image_names_file(tmp_path) -> None:
    _make(tmp_path, {"a": [gray(1)]})
    broken = tmp_path / "a" / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not really a jpeg")
    dataset = load_image_folder(tmp_path, image_size=8, channels=1)
    with pytest.raises(ValueError, match="cannot decode") as error:
        dataset[1]
    assert_one_line(error, broken)
