"""Model registry: ``build_model(name, num_classes, in_channels, weights)``.

Every model is a :class:`FeatureClassifier`: ``model(x)`` gives ``(B, num_classes)``
logits, ``model.forward_features(x)`` the ``(B, model.feature_dim)`` penultimate features,
and ``model.classifier`` is the final ``nn.Linear`` mapping the second to the first.
``timm/<name>`` builds any timm model (:mod:`distnoisy.models.timm_models`, optional extra).
"""

from distnoisy.models import (  # noqa: F401 (registers)
    cifar_resnet,
    imagenet_resnet,
    lenet,
    small_cnn,
    timm_models,
)
from distnoisy.models.base import MODELS, FeatureClassifier, ModelBuilder, build_model
from distnoisy.models.weights import adapt_input_conv, load_pretrained

__all__ = [
    "MODELS",
    "FeatureClassifier",
    "ModelBuilder",
    "adapt_input_conv",
    "build_model",
    "load_pretrained",
]
