"""Embedding backbones: a small CNN for 32×32 inputs, an MLP for feature inputs, the iresnets.

Every backbone maps its input to an ``embedding_dim`` vector through the usual face-recognition
neck ``... → Linear → BatchNorm1d`` (no activation after the neck: the head normalises).
``build_backbone(name, embedding_dim, input_shape)`` is the one entry point.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

BACKBONES: tuple[str, ...] = ("small_cnn", "mlp", "iresnet18", "iresnet34", "iresnet50",
                              "iresnet100")

#: blocks per stage of each iresnet depth (He et al. 2016 / Deng et al. 2019, "IR" variant)
IRESNET_LAYERS: dict[str, tuple[int, int, int, int]] = {
    "iresnet18": (2, 2, 2, 2),
    "iresnet34": (3, 4, 6, 3),
    "iresnet50": (3, 4, 14, 3),
    "iresnet100": (3, 13, 30, 3),
}


def _embedding_neck(in_features: int, embedding_dim: int, dropout: float) -> nn.Sequential:
    """Dropout → Linear → BatchNorm1d: the neck every face-recognition backbone ends with."""
    return nn.Sequential(
        nn.Dropout(dropout),
        nn.Linear(in_features, embedding_dim),
        nn.BatchNorm1d(embedding_dim),
    )


class SmallCNN(nn.Module):
    """Three conv stages (conv3×3-BN-PReLU ×2, stride-2 downsampling) for small images.

    Input ``(B, C, H, W)`` with H, W divisible by 8 (e.g. 1×32×32); output ``(B, embedding_dim)``.
    """

    def __init__(self, in_channels: int, embedding_dim: int, image_size: tuple[int, int],
                 width: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        channels = (width, 2 * width, 4 * width)
        layers: list[nn.Module] = []
        previous = in_channels
        for index, out in enumerate(channels):
            layers += [
                nn.Conv2d(previous, out, 3, stride=1 if index == 0 else 2, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.PReLU(out),
                nn.Conv2d(out, out, 3, padding=1, bias=False),
                nn.BatchNorm2d(out),
                nn.PReLU(out),
            ]
            previous = out
        layers.append(nn.AvgPool2d(2))
        self.features = nn.Sequential(*layers)
        height, width_px = image_size[0] // 8, image_size[1] // 8
        self.neck = _embedding_neck(previous * height * width_px, embedding_dim, dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.neck(torch.flatten(self.features(images), 1))


class MLP(nn.Module):
    """Linear-BN-PReLU layers for precomputed features, then the embedding neck."""

    def __init__(self, input_dim: int, embedding_dim: int, hidden: Sequence[int] = (512,),
                 dropout: float = 0.0) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        previous = input_dim
        for width in hidden:
            layers += [nn.Linear(previous, width, bias=False), nn.BatchNorm1d(width),
                       nn.PReLU(width)]
            previous = width
        self.features = nn.Sequential(*layers)
        self.neck = _embedding_neck(previous, embedding_dim, dropout)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.neck(self.features(torch.flatten(features, 1)))


class IBasicBlock(nn.Module):
    """The improved residual unit: BN → conv3×3 → BN → PReLU → conv3×3 (stride) → BN, + shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(in_channels, eps=1e-5),
            nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels, eps=1e-5),
            nn.PReLU(out_channels),
            nn.Conv2d(out_channels, out_channels, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(out_channels, eps=1e-5),
        )
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels, eps=1e-5),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class IResNet(nn.Module):
    """iresnet (ArcFace's "IR" ResNet): stem conv3×3-BN-PReLU, four stages of ``IBasicBlock``
    with stride 2 at each stage's first block, BN → dropout → Linear → BatchNorm1d.

    Designed for 112×112 faces (a 7×7×512 map before the neck); any size divisible by 16 works.
    """

    def __init__(self, layers: Sequence[int], in_channels: int, embedding_dim: int,
                 image_size: tuple[int, int], dropout: float = 0.0) -> None:
        super().__init__()
        widths = (64, 128, 256, 512)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, 64, 3, padding=1, bias=False),
            nn.BatchNorm2d(64, eps=1e-5),
            nn.PReLU(64),
        )
        stages: list[nn.Module] = []
        previous = 64
        for blocks, width in zip(layers, widths, strict=True):
            units = [IBasicBlock(previous, width, stride=2)]
            units += [IBasicBlock(width, width, stride=1) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*units))
            previous = width
        self.stages = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(previous, eps=1e-5)
        spatial = (image_size[0] // 16) * (image_size[1] // 16)
        self.neck = _embedding_neck(previous * spatial, embedding_dim, dropout)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        maps = self.bn(self.stages(self.stem(images)))
        return self.neck(torch.flatten(maps, 1))


def build_backbone(name: str, embedding_dim: int, input_shape: Sequence[int],
                   dropout: float = 0.0, width: int = 32) -> nn.Module:
    """Construct a backbone for inputs of ``input_shape`` (``(C, H, W)`` images or ``(F,)``)."""
    if name not in BACKBONES:
        raise ValueError(f"backbone = {name!r} is not one of {list(BACKBONES)}")
    if embedding_dim < 1:
        raise ValueError(f"embedding_dim = {embedding_dim} must be ≥ 1")
    if name == "mlp":
        features = 1
        for size in input_shape:
            features *= int(size)
        return MLP(features, embedding_dim, dropout=dropout)
    if len(input_shape) != 3:
        raise ValueError(f"backbone {name!r} needs image inputs (C, H, W), got input_shape = "
                         f"{tuple(input_shape)}")
    channels, height, width_px = (int(s) for s in input_shape)
    multiple = 8 if name == "small_cnn" else 16
    if height % multiple or width_px % multiple:
        raise ValueError(f"backbone {name!r} needs H and W divisible by {multiple}, got "
                         f"input_shape = {tuple(input_shape)}")
    if name == "small_cnn":
        return SmallCNN(channels, embedding_dim, (height, width_px), width=width, dropout=dropout)
    return IResNet(IRESNET_LAYERS[name], channels, embedding_dim, (height, width_px),
                   dropout=dropout)
