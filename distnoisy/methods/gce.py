"""GCE and truncated GCE (Zhang & Sabuncu, NeurIPS 2018), METHODS.md §7."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from distnoisy.config import MethodParams
from distnoisy.losses import GCELoss, TruncatedGCELoss
from distnoisy.methods.base import METHODS
from distnoisy.methods.loss_method import LossMethod


@dataclass
class GCEParams(MethodParams):
    # Exponent (Zhang & Sabuncu 2018; DAL repository cifar.py default).
    q: float = 0.7


@METHODS.register("gce")
class GCE(LossMethod):
    r"""Generalised cross-entropy: ``L = mean_i (1 - p̂_{i,ỹ}^q) / q``, ``p̂ = clamp(p, 1e-6, 1)``.

    METHODS.md §7 (module :class:`~distnoisy.losses.GCELoss`). ``q → 0`` is CE, ``q = 1`` is MAE.

    Keys (defaults)
        ``method.q = 0.7`` (Zhang & Sabuncu 2018; also the DAL repository's ``cifar.py``).
        Valid: ``q > 0`` (the paper uses ``(0, 1]``; ``q > 1`` is allowed, as in DAL).

    Label-issue score: mean training CE on the given label over epochs (METHODS.md §10).
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


@METHODS.register("tgce")
class TruncatedGCE(LossMethod):
    r"""Truncated GCE: ``L = mean_i (1 - max(p_{i,ỹ}, k)^q) / q``.

    METHODS.md §7 (module :class:`~distnoisy.losses.TruncatedGCELoss`): samples with
    ``p_ỹ <= k`` get the constant loss ``(1 - k^q)/q`` and no gradient. This is the stateless
    cap form (pruned with the current ``p_ỹ`` at every step), not the official periodic
    per-sample weight update.

    Keys (defaults)
        ``method.q = 0.7``, ``method.k = 0.5`` (Zhang & Sabuncu 2018).
        Valid: ``q > 0``, ``0 <= k < 1`` (``k = 0`` is GCE).

    Label-issue score: mean training CE on the given label over epochs (METHODS.md §10).
    """

    Params = TGCEParams

    @classmethod
    def check_params(cls, params: Any) -> None:
        TruncatedGCELoss(q=params.q, k=params.k)

    def build_loss(self) -> nn.Module:
        return TruncatedGCELoss(q=self.params.q, k=self.params.k)
