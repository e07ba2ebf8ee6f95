"""The finished run's networks as MLflow models (``tracking.log_model``, ``register_model``).

The logged model is the method's predictor (:class:`distnoisy.models.predictor.Predictor`):
its input is a float32 ``(B, C, H, W)`` batch after the run's eval transform (resized,
cropped and normalised with the run's mean and std, stored in the model's metadata), its
output the ``(B, num_classes)`` logits, as the run evaluated them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from distnoisy.config import Config
    from distnoisy.data.prepare import DataSpec
    from distnoisy.models.predictor import Predictor

log = logging.getLogger(__name__)

#: (weights file in the run directory, MLflow model name, registered when register_model is set)
MODEL_FILES = (("weights.pt", "model", True), ("weights_best.pt", "model_best", False))


def predictor(cfg: Config, spec: DataSpec, weights: Path) -> Predictor:
    """The method's predicting networks of a run's weights file, as one eval-mode module."""
    import torch

    from distnoisy.finished.features import predicting_networks
    from distnoisy.models import build_model
    from distnoisy.models.predictor import Predictor

    state = torch.load(weights, map_location="cpu", weights_only=True)
    nets = []
    for name in predicting_networks(cfg.method.name):
        net = build_model(cfg.model.name, spec.num_classes, spec.in_channels, None)
        net.load_state_dict(state[name])
        nets.append(net)
    return Predictor(nets).eval()


def example_input(cfg: Config, spec: DataSpec, count: int = 2) -> np.ndarray:
    """``count`` images of the test set (else the training set) after the eval transform.

    Two by default: ``torch.export`` (MLflow's pt2 format) would specialise the batch
    dimension of a one-image example to 1.
    """
    from distnoisy.data.shards import read_manifest
    from distnoisy.data.stream import EvalStream, make_transform

    transform = make_transform(spec.eval_transform, spec.mean, spec.std, size=cfg.data.image_size)
    where = spec.test_dir or spec.train_dir
    stream = EvalStream(
        read_manifest(where), rank=0, world_size=1, batch_size=count, transform=transform
    )
    batch = next(iter(stream.batches()))
    return batch["image"][:count].float().numpy()


def metadata(cfg: Config, spec: DataSpec) -> dict[str, Any]:
    """What a user of the MLflow model needs to prepare its input and read its output."""
    return {
        "input": "float32 (B, C, H, W) images after the eval transform (normalised)",
        "eval_transform": spec.eval_transform,
        "image_size": cfg.data.image_size,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "classes": list(spec.classes),
        "model_name": cfg.model.name,
        "method": cfg.method.name,
    }


def log_models(cfg: Config, spec: DataSpec, run_dir: Path, uri: str, run_id: str) -> list[str]:
    """Log the final (and best-by-validation) network as MLflow models; returns their URIs."""
    from distnoisy import tracking

    example = example_input(cfg, spec)
    uris = []
    for file, name, registered in MODEL_FILES:
        path = run_dir / file
        if not path.is_file():
            continue
        uris.append(
            tracking.log_pytorch_model(
                uri,
                run_id,
                predictor(cfg, spec, path),
                example,
                name,
                cfg.tracking.register_model if registered else None,
                metadata(cfg, spec),
            )
        )
    return uris
