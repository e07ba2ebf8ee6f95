"""Bootstrapping (Reed et al., ICLR 2015 workshop), soft and hard, docs/methods.md#bootstrapping."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from distnoisy.core.method_params import MethodParams
from distnoisy.losses import BootstrapLoss
from distnoisy.methods.base import METHODS
from distnoisy.methods.loss_method import LossMethod


@dataclass
class BootstrapParams(MethodParams):
    # Weight of the given label; None = Reed et al.'s value for the form (0.95 soft, 0.8 hard).
    beta: float | None = None
    # False = soft (target mixes in the detached softmax), True = hard (its argmax).
    hard: bool = False


@METHODS.register("bootstrap")
class Bootstrap(LossMethod):
    r"""Bootstrapping: CE against ``β e_ỹ + (1 - β) a`` with ``a = sg(p)`` (soft) or
    ``a = e_{argmax p}`` (hard).

    docs/methods.md#bootstrapping (module :class:`~distnoisy.losses.BootstrapLoss`); the soft form
    detaches ``p`` in the target, so it acts as a moving pseudo-label, not an entropy regulariser.

    Keys (defaults)
        ``method.beta = None``: Reed et al.'s 0.95 (soft) or 0.8 (hard). Valid: ``[0, 1]``
        (``β = 1`` is CE). ``method.hard = false`` (soft bootstrapping).

    Label-issue score: mean training CE on the given label over epochs
    (docs/methods.md#label-issue-scores).
    """

    Params = BootstrapParams

    @classmethod
    def check_params(cls, params: Any) -> None:
        BootstrapLoss(beta=params.beta, hard=params.hard)

    def build_loss(self) -> nn.Module:
        return BootstrapLoss(beta=self.params.beta, hard=self.params.hard)
