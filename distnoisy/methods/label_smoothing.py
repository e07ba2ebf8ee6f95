"""Label smoothing, positive or negative (Wei et al. 2022), docs/methods.md#label-smoothing."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from distnoisy.core.method_params import MethodParams
from distnoisy.losses import LabelSmoothingLoss
from distnoisy.methods.base import METHODS
from distnoisy.methods.loss_method import LossMethod


@dataclass
class LSParams(MethodParams):
    # Smoothing (the common choice; the papers give none). Negative = negative LS.
    epsilon: float = 0.1


@METHODS.register("ls")
class LabelSmoothing(LossMethod):
    r"""Label smoothing: CE against the target ``(1 - ε)e_ỹ + ε/C``.

    docs/methods.md#label-smoothing (module :class:`~distnoisy.losses.LabelSmoothingLoss`). ``ε <
    0`` is negative label smoothing (Wei et al. 2022): the loss is then unbounded below and goes
    negative as the
    model becomes confident.

    Keys (defaults)
        ``method.epsilon = 0.1`` (common choice; the papers give no default).
        Valid: ``-1 <= ε < 1`` (``ε = 1`` would ignore the label).

    Label-issue score: mean training CE on the given label over epochs
    (docs/methods.md#label-issue-scores).
    """

    Params = LSParams

    @classmethod
    def check_params(cls, params: Any) -> None:
        LabelSmoothingLoss(2, epsilon=params.epsilon)

    def build_loss(self) -> nn.Module:
        return LabelSmoothingLoss(self.num_classes, epsilon=self.params.epsilon)
