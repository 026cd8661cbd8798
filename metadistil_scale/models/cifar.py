"""The CIFAR model zoo of the knowledge-distillation literature (RepDistiller / CRD, MetaDistil's CV setting).

- ResNet: the CIFAR ResNet of He et al. (2016, section 4.2): a 3x3 stem, three stages of 2n basic blocks
  (6n+2 layers) at strides 1, 2, 2, global average pooling and a linear classifier. Shortcuts that change shape
  are 1x1 convolution + BatchNorm, as in the distillation code bases. The "x4" variants widen every stage.
- WRN-d-k: the pre-activation wide ResNet of Zagoruyko & Komodakis (2016), (d-4)/6 blocks per stage, widths
  16k, 32k, 64k.
- VGG: VGG-style stacks of conv-BN-ReLU in five blocks, max pooling after the first three, global average
  pooling and a single linear classifier (no VGG fully-connected layers), as used for CIFAR distillation.

Every model takes ``forward(pixel_values=[B, C, H, W])`` and returns logits ``[B, num_classes]``. Global pooling
is adaptive, so 28x28 single-channel inputs (Fashion-MNIST) work as well as 32x32x3. No in-place operations:
the meta step runs these models under torch.func.jvp and double backward, where in-place updates of
activations carrying tangents are fragile.
"""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor, nn


def _conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=stride, padding=1, bias=False)


def _init_weights(model: nn.Module) -> None:
    # He initialisation for convolutions, unit BatchNorm; the linear head keeps torch's default.
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


class BasicBlock(nn.Module):
    """Post-activation residual block: conv-BN-ReLU-conv-BN, add shortcut, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def _stages(block: type[nn.Module], channels: int, widths: tuple[int, ...], blocks_per_stage: int
            ) -> tuple[list[nn.Sequential], int]:
    """The three stages of a CIFAR ResNet or WRN: `blocks_per_stage` blocks each, the first block of a stage
    striding (1, 2, 2); returns them and the last stage's width."""
    stages = []
    for width, stride in zip(widths, (1, 2, 2)):
        blocks = []
        for i in range(blocks_per_stage):
            blocks.append(block(channels, width, stride if i == 0 else 1))
            channels = width
        stages.append(nn.Sequential(*blocks))
    return stages, channels


class CifarResNet(nn.Module):
    def __init__(self, depth: int, widths: tuple[int, int, int, int], num_classes: int, in_channels: int = 3):
        super().__init__()
        if (depth - 2) % 6 != 0:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2 (8, 14, 20, 32, ...), got {depth}")
        n = (depth - 2) // 6
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = nn.BatchNorm2d(widths[0])
        stages, channels = _stages(BasicBlock, widths[0], widths[1:], n)
        self.layer1, self.layer2, self.layer3 = stages
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = F.relu(self.bn1(self.conv1(pixel_values)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class WideBasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv-BN-ReLU-conv; a shape-changing shortcut takes the activated input."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = _conv3x3(in_channels, out_channels, stride)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = _conv3x3(out_channels, out_channels)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=stride, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(act))))
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(nn.Module):
    def __init__(self, depth: int, widen_factor: int, num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        if (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n+4 (10, 16, 22, 28, 40, ...), got {depth}")
        n = (depth - 4) // 6
        self.conv1 = _conv3x3(in_channels, 16)
        stages, channels = _stages(WideBasicBlock, 16, (16 * widen_factor, 32 * widen_factor, 64 * widen_factor), n)
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(channels)
        self.fc = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.block3(self.block2(self.block1(self.conv1(pixel_values))))
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# Channels of the conv layers in each of VGG's five blocks (configurations A and B of Simonyan & Zisserman,
# and the one-conv-per-block "S" that the distillation literature calls vgg8).
_VGG_BLOCKS: dict[str, tuple[tuple[int, ...], ...]] = {
    "vgg8": ((64,), (128,), (256,), (512,), (512,)),
    "vgg11": ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    "vgg13": ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
}


class VGG(nn.Module):
    def __init__(self, blocks: tuple[tuple[int, ...], ...], num_classes: int, in_channels: int = 3) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for i, block in enumerate(blocks):
            for width in block:
                # No conv bias: the BatchNorm that follows cancels it.
                layers += [_conv3x3(channels, width), nn.BatchNorm2d(width), nn.ReLU()]
                channels = width
            # Pool after the first three blocks only: 32 -> 16 -> 8 -> 4 (28 -> 14 -> 7 -> 3).
            if i < 3:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(channels, num_classes)
        _init_weights(self)

    def forward(self, pixel_values: Tensor) -> Tensor:
        x = self.features(pixel_values)
        return self.classifier(F.adaptive_avg_pool2d(x, 1).flatten(1))


_RESNET_NARROW = (16, 16, 32, 64)
_RESNET_X4 = (32, 64, 128, 256)

CV_MODELS: dict[str, Callable[[int, int], nn.Module]] = {
    **{
        f"resnet{d}": (lambda c, i, d=d: CifarResNet(d, _RESNET_NARROW, c, i))
        for d in (8, 14, 20, 32, 44, 56, 110)
    },
    "resnet8x4": lambda c, i: CifarResNet(8, _RESNET_X4, c, i),
    "resnet32x4": lambda c, i: CifarResNet(32, _RESNET_X4, c, i),
    "wrn_16_1": lambda c, i: WideResNet(16, 1, c, i),
    "wrn_16_2": lambda c, i: WideResNet(16, 2, c, i),
    "wrn_40_1": lambda c, i: WideResNet(40, 1, c, i),
    "wrn_40_2": lambda c, i: WideResNet(40, 2, c, i),
    **{name: (lambda c, i, b=blocks: VGG(b, c, i)) for name, blocks in _VGG_BLOCKS.items()},
}
"""Builders by name, each called as ``builder(num_classes, in_channels)``."""


def build_cv_model(name: str, num_classes: int, in_channels: int = 3) -> nn.Module:
    """Build a freshly initialised CIFAR model; ``forward(pixel_values)`` returns logits."""
    if name not in CV_MODELS:
        raise ValueError(f"unknown CV model {name!r}; known: {', '.join(CV_MODELS)}")
    if num_classes < 1 or in_channels < 1:
        raise ValueError(f"num_classes and in_channels must be positive, got {num_classes}, {in_channels}")
    return CV_MODELS[name](num_classes, in_channels)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


__all__ = ["CV_MODELS", "build_cv_model", "count_parameters", "CifarResNet", "WideResNet", "VGG"]
