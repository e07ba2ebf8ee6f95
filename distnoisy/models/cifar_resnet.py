"""ResNets for 32x32 images, as used by the ELR, DAL and DivideMix reference code.

Compared with the ImageNet ResNets the stem is a single 3x3 stride-1 convolution without
max-pooling, so a 32x32 input reaches ``layer4`` at 4x4. Module names (``conv1``, ``bn1``,
``layerN.i.{conv1,bn1,conv2,bn2,shortcut}``) follow those repositories, so their checkpoints
load with :func:`distnoisy.models.weights.load_pretrained` (their ``linear`` head is dropped).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from distnoisy.models.base import MODELS, FeatureClassifier


def _conv3x3(in_planes: int, planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)


class BasicBlock(nn.Module):
    """Post-activation residual block: conv-BN-ReLU-conv-BN, add the shortcut, ReLU."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()  # empty Sequential == identity
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class PreActBlock(nn.Module):
    """Pre-activation residual block (He et al., 2016, "Identity Mappings ...").

    BN-ReLU come before each convolution. As in DivideMix's ``PreResNet.py`` the shortcut
    (identity, or a bare 1x1 convolution when the shape changes) is taken from the
    pre-activated input ``relu(bn1(x))`` rather than from ``x``.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = _conv3x3(in_planes, planes, stride)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = _conv3x3(planes, planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        out = self.conv2(F.relu(self.bn2(self.conv1(pre))))
        return out + self.shortcut(pre)


class CifarResNet(FeatureClassifier):
    """Four-stage ResNet (64-128-256-512 channels) with a 3x3 stride-1 stem and no max-pool.

    Parameters
    ----------
    block
        :class:`BasicBlock` (ELR/DAL ResNet) or :class:`PreActBlock` (DivideMix/ELR+).
    num_blocks
        Blocks per stage, e.g. ``[2, 2, 2, 2]`` for 18 layers.
    num_classes
        Number of logits.
    in_channels
        Input channels.

    Notes
    -----
    The reference code pools with ``avg_pool2d(out, 4)``; global average pooling is the same
    for 32x32 inputs and also accepts other sizes (features stay 512-d).
    """

    def __init__(
        self,
        block: type[BasicBlock | PreActBlock],
        num_blocks: list[int],
        num_classes: int,
        in_channels: int = 3,
    ) -> None:
        super().__init__()
        # Both reference nets use conv-BN-ReLU as the stem, the pre-activation one included.
        self.conv1 = _conv3x3(in_channels, 64)
        self.bn1 = nn.BatchNorm2d(64)
        stages = []
        in_planes = 64
        for i, (planes, n) in enumerate(zip((64, 128, 256, 512), num_blocks, strict=True)):
            blocks = []
            for j in range(n):
                blocks.append(block(in_planes, planes, 2 if i > 0 and j == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = 512
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the ``(B, 512)`` globally average-pooled ``layer4`` features."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return torch.flatten(F.adaptive_avg_pool2d(out, 1), 1)


@MODELS.register("cifar_resnet18")
def cifar_resnet18(*, num_classes: int, in_channels: int = 3) -> CifarResNet:
    """Build the CIFAR ResNet-18 of the ELR/DAL code (BasicBlocks [2, 2, 2, 2])."""
    return CifarResNet(BasicBlock, [2, 2, 2, 2], num_classes, in_channels)


@MODELS.register("cifar_resnet34")
def cifar_resnet34(*, num_classes: int, in_channels: int = 3) -> CifarResNet:
    """Build the CIFAR ResNet-34 of the ELR/DAL code (BasicBlocks [3, 4, 6, 3])."""
    return CifarResNet(BasicBlock, [3, 4, 6, 3], num_classes, in_channels)


@MODELS.register("preact_resnet18")
def preact_resnet18(*, num_classes: int, in_channels: int = 3) -> CifarResNet:
    """Build the PreAct-ResNet-18 of DivideMix/ELR+ (PreActBlocks [2, 2, 2, 2])."""
    return CifarResNet(PreActBlock, [2, 2, 2, 2], num_classes, in_channels)
