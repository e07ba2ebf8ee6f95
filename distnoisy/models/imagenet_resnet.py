"""The registered names of torchvision's ImageNet ResNets (:mod:`.torchvision_resnet`, imported
when one is built, so that the registry does not import torchvision)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from distnoisy.models.base import MODELS

if TYPE_CHECKING:
    from distnoisy.models.torchvision_resnet import ImageNetResNet

#: Name -> (block, blocks per stage) of torchvision's ResNets.
LAYOUTS = {
    "resnet18": ("BasicBlock", [2, 2, 2, 2]),
    "resnet34": ("BasicBlock", [3, 4, 6, 3]),
    "resnet50": ("Bottleneck", [3, 4, 6, 3]),
}


def _build(name: str, num_classes: int, in_channels: int) -> ImageNetResNet:
    from torchvision.models import resnet

    from distnoisy.models.torchvision_resnet import ImageNetResNet

    block, layers = LAYOUTS[name]
    return ImageNetResNet(getattr(resnet, block), layers, num_classes, in_channels)


@MODELS.register("resnet18")
def resnet18(*, num_classes: int, in_channels: int = 3) -> ImageNetResNet:
    """Build torchvision's ResNet-18 (BasicBlocks [2, 2, 2, 2], 512-d features)."""
    return _build("resnet18", num_classes, in_channels)


@MODELS.register("resnet34")
def resnet34(*, num_classes: int, in_channels: int = 3) -> ImageNetResNet:
    """Build torchvision's ResNet-34 (BasicBlocks [3, 4, 6, 3], 512-d features)."""
    return _build("resnet34", num_classes, in_channels)


@MODELS.register("resnet50")
def resnet50(*, num_classes: int, in_channels: int = 3) -> ImageNetResNet:
    """Build torchvision's ResNet-50 (Bottlenecks [3, 4, 6, 3], 2048-d features)."""
    return _build("resnet50", num_classes, in_channels)
