"""Backbones: output shapes, the published iresnet sizes, input checks, gradient flow."""

from __future__ import annotations

import pytest
import torch

from workers.backbones import BACKBONES, build_backbone

#: parameter counts of insightface's arcface_torch iresnets at 112×112, embedding 512
PUBLISHED_PARAMETERS_M = {"iresnet18": 24.03, "iresnet34": 34.14, "iresnet50": 43.59,
                          "iresnet100": 65.16}


@pytest.mark.parametrize(("name", "shape"), [("small_cnn", (1, 32, 32)), ("small_cnn", (3, 64, 48)),
                                             ("mlp", (96,)), ("iresnet18", (3, 112, 112))])
def test_output_shape_and_gradients(name: str, shape: tuple[int, ...]) -> None:
    torch.manual_seed(0)
    model = build_backbone(name, embedding_dim=64, input_shape=shape)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 64)
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"No gradient for {missing}"


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMETERS_M))
def test_iresnet_matches_published_size(name: str) -> None:
    model = build_backbone(name, embedding_dim=512, input_shape=(3, 112, 112))
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    assert millions == pytest.approx(PUBLISHED_PARAMETERS_M[name], abs=0.01)


def test_neck_ends_in_batchnorm1d() -> None:
    for name in BACKBONES:
        shape = (64,) if name == "mlp" else (3, 32, 32) if name == "small_cnn" else (3, 16, 16)
        model = build_backbone(name, embedding_dim=8, input_shape=shape)
        assert isinstance(list(model.modules())[-1], torch.nn.BatchNorm1d), name


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"name": "resnet9", "embedding_dim": 8, "input_shape": (1, 32, 32)}, "backbone = 'resnet9'"),
    ({"name": "small_cnn", "embedding_dim": 0, "input_shape": (1, 32, 32)}, "embedding_dim = 0"),
    ({"name": "small_cnn", "embedding_dim": 8, "input_shape": (1, 30, 32)}, "divisible by 8"),
    ({"name": "iresnet50", "embedding_dim": 8, "input_shape": (3, 104, 112)}, "divisible by 16"),
    ({"name": "iresnet50", "embedding_dim": 8, "input_shape": (512,)}, "needs image inputs"),
])
def test_bad_arguments_raise_one_line(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message) as error:
        build_backbone(**kwargs)
    assert "\n" not in str(error.value)
