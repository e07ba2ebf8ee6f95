"""The model interface, the model registry and :func:`build_model`."""

from __future__ import annotations

import numbers
from abc import ABC, abstractmethod
from typing import Protocol

import torch
from torch import nn

from distnoisy.core.errors import ConfigError
from distnoisy.core.registry import Registry
from distnoisy.models.weights import load_pretrained


class FeatureClassifier(nn.Module, ABC):
    """Base class of every registered model: a feature extractor followed by one linear head.

    Subclasses set ``feature_dim`` and ``classifier`` (an ``nn.Linear(feature_dim, C)``) and
    implement :meth:`forward_features`. Keeping the head a single, separately named linear
    layer lets post-training code refit it on frozen features
    (``model.classifier(model.forward_features(x)) == model(x)``).

    Attributes
    ----------
    feature_dim
        Width ``d`` of the penultimate features.
    classifier
        The final linear layer, mapping ``(B, d)`` features to ``(B, C)`` logits.
    input_conv_key
        State-dict key of the first convolution's weight; used to adapt a 3-channel
        pretrained checkpoint to another number of input channels.
    """

    feature_dim: int
    classifier: nn.Linear
    input_conv_key: str = "conv1.weight"

    @abstractmethod
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Return the ``(B, feature_dim)`` penultimate features of images ``x``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return the ``(B, num_classes)`` logits of images ``x`` (``(B, C_in, H, W)``)."""
        return self.classifier(self.forward_features(x))


class ModelBuilder(Protocol):
    """What :data:`MODELS` holds: a callable building a randomly initialised model."""

    def __call__(self, *, num_classes: int, in_channels: int) -> FeatureClassifier: ...


MODELS: Registry[ModelBuilder] = Registry("model")


class FamilyBuilder(Protocol):
    """What :data:`FAMILIES` holds: ``(name, num_classes, in_channels, weights) -> model``."""

    def __call__(
        self, name: str, num_classes: int, in_channels: int, weights: str | None
    ) -> FeatureClassifier: ...


#: ``model.name`` prefixes of model families outside the registry, e.g. ``timm/`` (registered
#: by :mod:`distnoisy.models.timm_models`); each builds the model from the full name.
FAMILIES: dict[str, FamilyBuilder] = {}


def _check_int(value: object, key: str, minimum: int) -> int:
    # bool is an int subclass, but `num_classes=True` is always a config mistake.
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    if value < minimum:
        raise ConfigError(f"{key} must be >= {minimum}, got {value}")
    return int(value)


def build_model(
    name: str, num_classes: int, in_channels: int = 3, weights: str | None = None
) -> FeatureClassifier:
    """Build a registered model with a fresh ``num_classes``-way linear head.

    Parameters
    ----------
    name
        A name registered in :data:`MODELS` (see ``MODELS.names()``), or ``timm/<name>``
        for any timm model (the optional ``timm`` extra; see
        :func:`distnoisy.models.timm_models.build_timm_model`).
    num_classes
        Number of output logits; at least 2.
    in_channels
        Channels of the input images (1 for grey-scale digits, 3 for RGB); at least 1.
    weights
        Optional path to a local state dict (e.g. torchvision's ImageNet ResNet weights) to
        initialise everything but the head from; see
        :func:`distnoisy.models.weights.load_pretrained` (timm models: a state dict in timm's
        format). ``None`` means random init.

    Returns
    -------
    FeatureClassifier
        The model (in training mode, on the CPU) with ``forward``, ``forward_features``,
        ``classifier`` and ``feature_dim``.

    Raises
    ------
    ConfigError
        If the name is unknown (the message lists the valid names), an argument is out of
        range, or the weights file is missing or does not fit the architecture.
    """
    num_classes = _check_int(num_classes, "model.num_classes", 2)
    in_channels = _check_int(in_channels, "model.in_channels", 1)
    for prefix, family in FAMILIES.items():
        if isinstance(name, str) and name.startswith(prefix):
            return family(name, num_classes, in_channels, weights)
    builder = MODELS.get(name)
    model = builder(num_classes=num_classes, in_channels=in_channels)
    if weights is not None:
        load_pretrained(model, weights, model_name=name)
    return model
