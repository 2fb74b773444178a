"""The reference Fashion-MNIST CNN: a small ResNet with residual blocks and BatchNorm."""

from __future__ import annotations

import torch
from torch import nn

from kompakt.models.registry import register


class BasicBlock(nn.Module):
    """Two 3x3 conv + BN layers with a residual connection (1x1 conv + BN when shapes change)."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class FashionResNet(nn.Module):
    """Stem conv (stride 2: 28x28 -> 14x14), three stages of residual blocks (strides 1, 2, 2),
    global average pool, linear head."""

    def __init__(
        self,
        widths: tuple[int, ...] = (16, 32, 64),
        blocks_per_stage: int = 2,
        num_classes: int = 10,
        in_channels: int = 1,
        stem_stride: int = 2,
    ) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, stem_stride, 1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(),
        )
        stages = []
        channels = widths[0]
        for i, width in enumerate(widths):
            blocks = []
            for j in range(blocks_per_stage):
                stride = 2 if i > 0 and j == 0 else 1
                blocks.append(BasicBlock(channels, width, stride))
                channels = width
            stages.append(nn.Sequential(*blocks))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(self.stages(self.stem(x)))
        return self.fc(torch.flatten(x, 1))


@register(
    "fmnist_resnet", inputs=[{"name": "input", "dtype": "float32", "shape": [None, 1, 28, 28]}]
)
def fmnist_resnet(
    widths: tuple[int, ...] | list[int] = (16, 32, 64),
    blocks_per_stage: int = 2,
    num_classes: int = 10,
) -> FashionResNet:
    """The reference Fashion-MNIST CNN (about 0.17M parameters with the default widths)."""
    return FashionResNet(tuple(widths), blocks_per_stage, num_classes)
