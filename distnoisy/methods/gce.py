"""GCE and truncated GCE (Zhang & Sabuncu, NeurIPS 2018), docs/methods.md#gce."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from distnoisy.core.errors import ConfigError
from distnoisy.core.method_params import MethodParams
from distnoisy.losses import GCELoss, TruncatedGCELoss
from distnoisy.methods.base import METHODS, Method, StepOutput
from distnoisy.methods.loss_method import LossMethod, param_errors
from distnoisy.store import FieldSpec


@dataclass
class GCEParams(MethodParams):
    # Exponent (Zhang & Sabuncu 2018; DAL repository cifar.py default).
    q: float = 0.7


@METHODS.register("gce")
class GCE(LossMethod):
    r"""Generalised cross-entropy: ``L = mean_i (1 - p̂_{i,ỹ}^q) / q``, ``p̂ = clamp(p, 1e-6, 1)``.

    docs/methods.md#gce (module :class:`~distnoisy.losses.GCELoss`). ``q → 0`` is CE, ``q = 1`` is
    MAE.

    Keys (defaults)
        ``method.q = 0.7`` (Zhang & Sabuncu 2018; also the DAL repository's ``cifar.py``).
        Valid: ``q > 0`` (the paper uses ``(0, 1]``; ``q > 1`` is allowed, as in DAL).

    Label-issue score: mean training CE on the given label over epochs
    (docs/methods.md#label-issue-scores).
    """

    Params = GCEParams

    @classmethod
    def check_params(cls, params: Any) -> None:
        GCELoss(q=params.q)

    def build_loss(self) -> nn.Module:
        return GCELoss(q=self.params.q)


@dataclass
class TGCEParams(MethodParams):
    # Exponent and truncation threshold (Zhang & Sabuncu 2018).
    q: float = 0.7
    k: float = 0.5
    # Pruning schedule of the paper's CIFAR runs: plain GCE until epoch 40, then re-prune every
    # 10 epochs.
    prune_start: int = 40
    prune_every: int = 10


@METHODS.register("tgce")
class TruncatedGCE(Method):
    r"""Truncated GCE: ``L = mean_i w_i (1 - p_{i,ỹ}^q)/q + (1 - w_i)(1 - k^q)/q``.

    Per-sample weights ``w_i`` live in the store (``tgce_keep``, 1 at the start, so the first
    ``prune_start`` epochs are plain GCE). In every pruning epoch (``prune_start``,
    ``prune_start + prune_every``, ...) each sample's weight is reset at its visit, before the
    loss, to ``[p_{i,ỹ} > k]`` from the current forward pass; the paper does it in a separate pass
    over the training set at the start of that epoch. Pruned samples add a constant and no
    gradient until the next pruning epoch may bring them back.

    Keys (defaults)
        ``method.q = 0.7``, ``method.k = 0.5``, ``method.prune_start = 40``,
        ``method.prune_every = 10`` (Zhang & Sabuncu 2018). Valid: ``q > 0``, ``0 <= k < 1``,
        ``prune_start >= 0``, ``prune_every >= 1``.

    Label-issue score: mean training CE on the given label over epochs
    (docs/methods.md#label-issue-scores).
    """

    Params = TGCEParams

    @classmethod
    def validate_params(cls, params: Any) -> None:
        with param_errors(params.name):
            TruncatedGCELoss(q=params.q, k=params.k)
            if params.prune_start < 0 or params.prune_every < 1:
                raise ConfigError(
                    f"prune_start must be >= 0 and prune_every >= 1, got "
                    f"{params.prune_start} and {params.prune_every}"
                )

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.criterion = TruncatedGCELoss(q=params.q, k=params.k)
        self.epoch = 0

    def fields(self) -> dict[str, FieldSpec]:
        return {"tgce_keep": FieldSpec(fill=1.0)}

    def is_pruning_epoch(self, epoch: int) -> bool:
        p = self.params
        return epoch >= p.prune_start and (epoch - p.prune_start) % p.prune_every == 0

    def on_epoch_start(self, epoch: int) -> dict[str, float]:
        self.epoch = epoch
        assert self.store is not None
        return {"tgce_kept_fraction": self.store.mean("tgce_keep")}

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        assert self.store is not None
        keep = self.store.get("tgce_keep", index).to(logits.device)
        if self.is_pruning_epoch(self.epoch):
            with torch.no_grad():
                p_label = torch.softmax(logits.float(), dim=1).gather(1, labels[:, None])[:, 0]
                keep = (p_label > self.params.k).float()
            self.store.stage("tgce_keep", index, keep)
        return StepOutput(self.criterion(logits, labels, keep))
