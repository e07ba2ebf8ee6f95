"""A small CNN for tiny grey-scale images such as scikit-learn's 8x8 digits."""

from __future__ import annotations

import torch
from torch import nn

from distnoisy.models.base import MODELS, FeatureClassifier


class SmallCNN(FeatureClassifier):
    """Three 3x3 convolutions, one max-pool, adaptive pooling and a two-layer MLP head.

    ``conv(in, w)-ReLU-conv(w, 2w)-ReLU-maxpool2-conv(2w, 4w)-ReLU-adaptiveavgpool(2x2)-
    flatten-Linear(16w, hidden)-ReLU`` gives the features; ``classifier`` maps them to logits.

    There is deliberately no BatchNorm and no Dropout: the output for a sample depends on
    neither the other samples of its batch nor the RNG, so training on one worker and on
    several data-parallel workers with the same global batch is mathematically equivalent.

    Parameters
    ----------
    num_classes
        Number of logits.
    in_channels
        Input channels (1 for digits).
    width
        Channels of the first convolution ``w``.
    hidden
        Width of the penultimate features (``feature_dim``).

    Notes
    -----
    Pooling to 2x2 rather than 1x1 keeps coarse position information, which helps the net
    fit (and memorise) 8x8 digits; it accepts any input of at least 2x2 pixels.
    """

    input_conv_key = "features.0.weight"

    def __init__(
        self, num_classes: int, in_channels: int = 1, width: int = 32, hidden: int = 256
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, width, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.Conv2d(width, 2 * width, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, kernel_size=3, padding=1),
            nn.ReLU(inplace=True),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
            nn.Linear(4 * width * 16, hidden),
            nn.ReLU(inplace=True),
        )
        self.feature_dim = hidden
        self.classifier = nn.Linear(hidden, num_classes)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the ``(B, hidden)`` post-ReLU features."""
        return self.features(x)


@MODELS.register("small_cnn")
def small_cnn(*, num_classes: int, in_channels: int = 3) -> SmallCNN:
    """Build :class:`SmallCNN` with its default sizes (w=32, 256-d features)."""
    return SmallCNN(num_classes, in_channels)
