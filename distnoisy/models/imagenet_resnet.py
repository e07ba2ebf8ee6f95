"""The registered names of torchvision's ImageNet ResNets (:mod:`.torchvision_resnet`, imported
when one is built, so that the registry does not import torchvision)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from distnoisy.models.base import MODELS

if TYPE_CHECKING:
    from distnoisy.models.torchvision_resnet import ImageNetResNet


@MODELS.register("resnet18")
def resnet18(*, num_classes: int, in_channels: int = 3) -> ImageNetResNet:
    """Build torchvision's ResNet-18 (BasicBlocks [2, 2, 2, 2], 512-d features)."""
    from distnoisy.models.torchvision_resnet import BasicBlock, ImageNetResNet

    return ImageNetResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels)


@MODELS.register("resnet34")
def resnet34(*, num_classes: int, in_channels: int = 3) -> ImageNetResNet:
    """Build torchvision's ResNet-34 (BasicBlocks [3, 4, 6, 3], 512-d features)."""
    from distnoisy.models.torchvision_resnet import BasicBlock, ImageNetResNet

    return ImageNetResNet(BasicBlock, [3, 4, 6, 3], num_classes, in_channels)


@MODELS.register("resnet50")
def resnet50(*, num_classes: int, in_channels: int = 3) -> ImageNetResNet:
    """Build torchvision's ResNet-50 (Bottlenecks [3, 4, 6, 3], 2048-d features)."""
    from distnoisy.models.torchvision_resnet import Bottleneck, ImageNetResNet

    return ImageNetResNet(Bottleneck, [3, 4, 6, 3], num_classes, in_channels)
