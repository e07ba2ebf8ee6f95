"""Peer loss (Liu & Guo, ICML 2020), docs/methods.md#peer-loss."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from distnoisy.core.method_params import MethodParams
from distnoisy.losses import PeerLoss
from distnoisy.losses._common import check_int
from distnoisy.methods.base import METHODS, StepOutput
from distnoisy.methods.loss_method import LossMethod


def peer_seed(epoch: int, step: int, index: torch.Tensor) -> int:
    """Seed of the peer draw of one step: a hash of ``(epoch, step, the batch's indices)``.

    The batch's global sample indices differ between ranks and between steps, so every rank
    draws different peers without knowing its rank, and a re-run (or a resumed run) with the same
    data order draws the same ones. ``step`` tells apart a batch repeated within an epoch.
    """
    h = hashlib.blake2b(digest_size=8)
    h.update(np.asarray([epoch, step], dtype="<i8").tobytes())
    h.update(np.ascontiguousarray(index.detach().cpu().numpy(), dtype="<i8").tobytes())
    return int.from_bytes(h.digest(), "little")


def peer_alpha(epoch: int, alpha: float, ramp_epochs: int, warmup_epochs: int = 0) -> float:
    """Peer weight at 0-based ``epoch``.

    0 during the ``W = warmup_epochs`` CE warm-up epochs (the official code trains a CE stage
    first), then a linear ramp ``α · min(1, (epoch - W) / R)`` over ``R = ramp_epochs`` epochs
    (``α`` at once when ``R = 0``), constant afterwards (docs/methods.md#peer-loss).
    """
    if epoch < warmup_epochs:
        return 0.0
    if ramp_epochs <= 0:
        return alpha
    return alpha * min(1.0, (epoch - warmup_epochs) / ramp_epochs)


@dataclass
class PeerParams(MethodParams):
    # Weight of the peer term (the paper: alpha in [0, 1]); 1.0 = the paper's plain form.
    alpha: float = 1.0
    # Ramp alpha linearly from 0 over this many epochs (0 = constant alpha from the start).
    alpha_ramp_epochs: int = 0
    # Epochs of plain CE before the peer term starts (the official code's warm-up stage).
    warmup_epochs: int = 0
    # Stable CE: -log(softmax + eps) in both terms. 1e-8 is the CAL repository's value; the
    # peer-loss paper's code uses 1e-5 (docs/methods.md#peer-loss).
    eps: float = 1e-8


@METHODS.register("peer")
class Peer(LossMethod):
    r"""Peer loss: ``L = mean_n CE(z_n, ỹ_n) - α_t · mean_n CE(z_{n₁(n)}, ỹ_{n₂(n)})``.

    docs/methods.md#peer-loss (module :class:`~distnoisy.losses.PeerLoss`). ``n₁`` and ``n₂`` are
    two independent random permutations of the **local** batch (the usual mini-batch approximation
    of
    the paper's draws from the whole training set). The draw uses a ``torch.Generator`` seeded by
    :func:`peer_seed` from ``(epoch, step within the epoch, the batch's sample indices)``, so a
    run is reproducible without the method knowing its rank. ``α_t = α · min(1, t / R)``
    (:func:`peer_alpha`) is returned by :meth:`on_epoch_start` as ``peer_alpha`` for logging.

    Keys (defaults)
        ``method.alpha = 1.0`` (the paper's unweighted peer term; the paper uses the range
        ``[0, 1]``). Valid: ``α >= 0`` (``α = 0`` is CE; ``> 1`` is accepted for experiments).
        ``method.alpha_ramp_epochs = 0`` (no ramp), ``method.warmup_epochs = 0`` (CE epochs
        before the peer term; integers ``>= 0``), ``method.eps = 1e-8`` (stable CE; the CAL
        repository's eps, the paper's code uses 1e-5; see :class:`~distnoisy.losses.PeerLoss`).

    Label-issue score: mean training CE on the given label over epochs
    (docs/methods.md#label-issue-scores).
    """

    Params = PeerParams

    def __init__(self, params: Any, **kwargs: Any) -> None:
        super().__init__(params, **kwargs)
        self.epoch = 0
        self.step = 0  # within the epoch: reset at every epoch start, so resume reproduces it

    @classmethod
    def check_params(cls, params: Any) -> None:
        PeerLoss(alpha=params.alpha)
        check_int("alpha_ramp_epochs", params.alpha_ramp_epochs, 0)
        check_int("warmup_epochs", params.warmup_epochs, 0)
        PeerLoss(alpha=params.alpha, eps=params.eps)

    def build_loss(self) -> nn.Module:
        p = self.params
        return PeerLoss(
            alpha=peer_alpha(0, p.alpha, p.alpha_ramp_epochs, p.warmup_epochs), eps=p.eps
        )

    def on_epoch_start(self, epoch: int) -> dict[str, float]:
        criterion = self.require_criterion()
        assert isinstance(criterion, PeerLoss)
        self.epoch, self.step = epoch, 0
        p = self.params
        criterion.alpha = peer_alpha(epoch, p.alpha, p.alpha_ramp_epochs, p.warmup_epochs)
        return {"peer_alpha": criterion.alpha}

    def seek(self, phase: str, step: int) -> None:
        self.step = step  # the draws are keyed by the step: continue where the epoch stopped

    def loss(self, logits: torch.Tensor, labels: torch.Tensor, index: torch.Tensor) -> StepOutput:
        criterion = self.require_criterion()
        generator = torch.Generator().manual_seed(peer_seed(self.epoch, self.step, index))
        self.step += 1
        return StepOutput(criterion(logits, labels, generator=generator))
