"""What a rank builds its training from: labels, networks, optimizers and schedulers.

Plain torch, no Ray: :class:`distnoisy.engine.trainer.Trainer` builds its components from these.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import nn

from distnoisy.config import Config
from distnoisy.data.prepare import DataSpec
from distnoisy.models import build_model


def training_labels(spec: DataSpec) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Given labels, clean labels (or None) and keys of the training set, by global index."""
    from distnoisy.data.noise import load_label_file
    from distnoisy.data.shards import read_labels, read_manifest

    # Clean labels may be known for a subset only (-1 elsewhere), e.g. Clothing1M's overlap.
    labels, clean, keys = read_labels(read_manifest(spec.train_dir), partial_clean=True)
    if spec.label_file is not None:
        lf = load_label_file(spec.label_file, spec.num_train, spec.num_classes)
        labels = lf.labels
        if lf.clean_labels is not None:
            clean = lf.clean_labels
    return np.asarray(labels, dtype=np.int64), clean, list(keys)


def network_builder(cfg: Config, num_classes: int, in_channels: int) -> Callable[..., nn.Module]:
    """``build(name=None, weights=None)``: ``model.name`` with ``model.weights`` by default."""

    def build(name: str | None = None, weights: str | None = None) -> nn.Module:
        if name is None:
            name, weights = cfg.model.name, cfg.model.weights
        return build_model(name, num_classes, in_channels, weights)

    return build


def make_optimizer(cfg: Config, params: Any) -> torch.optim.Optimizer:
    """The ``train.optimizer`` (SGD with momentum, or Adam) over ``params``."""
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


def make_scheduler(cfg: Config, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The ``train.scheduler`` of ``opt``, stepped once per epoch (constant by default)."""
    t = cfg.train
    if t.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs)
    if t.scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=list(t.milestones), gamma=t.gamma
        )
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
