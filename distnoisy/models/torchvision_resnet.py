"""torchvision's ImageNet ResNets behind the :class:`FeatureClassifier` interface.

Imported by the builders in :mod:`distnoisy.models.imagenet_resnet` only when one is built:
importing torchvision takes about a second, which every process that imports the model
registry (each driver, for one) would pay otherwise."""

from __future__ import annotations

import torch
from torch import nn
from torchvision.models.resnet import BasicBlock, Bottleneck, ResNet

from distnoisy.models.base import FeatureClassifier


class ImageNetResNet(FeatureClassifier, ResNet):
    """A torchvision ResNet (7x7/2 stem, max-pool) whose ``fc`` is replaced by ``classifier``.

    The module names below the head are torchvision's, so torchvision's ImageNet state dicts
    load as they are (see :func:`distnoisy.models.weights.load_pretrained`).

    Parameters
    ----------
    block
        ``BasicBlock`` (ResNet-18/34) or ``Bottleneck`` (ResNet-50).
    layers
        Number of blocks in each of the four stages.
    num_classes
        Number of logits.
    in_channels
        Input channels; a value other than 3 replaces ``conv1`` by a fresh 7x7/2 convolution.
    """

    def __init__(
        self,
        block: type[BasicBlock | Bottleneck],
        layers: list[int],
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__(block, layers)  # -> torchvision ResNet.__init__
        if in_channels != 3:
            self.conv1 = nn.Conv2d(in_channels, 64, kernel_size=7, stride=2, padding=3, bias=False)
            nn.init.kaiming_normal_(self.conv1.weight, mode="fan_out", nonlinearity="relu")
        self.feature_dim = 512 * block.expansion
        # One head under one name: aliasing `fc` and `classifier` would duplicate state-dict keys.
        del self.fc
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the ``(B, feature_dim)`` globally average-pooled ``layer4`` features."""
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return torch.flatten(self.avgpool(x), 1)
