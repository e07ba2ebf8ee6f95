"""MAE: mean absolute error between the softmax and the one-hot label, docs/methods.md#mae."""

from __future__ import annotations

from typing import Any

from torch import nn

from distnoisy.losses import MAELoss
from distnoisy.methods.base import METHODS
from distnoisy.methods.loss_method import LossMethod


@METHODS.register("mae")
class MAE(LossMethod):
    r"""MAE: ``L = mean_i (1 - p_{i,ỹ})`` (``= ½‖p - e_ỹ‖₁``), ``p = softmax(z)``.

    docs/methods.md#mae (module :class:`~distnoisy.losses.MAELoss`). Symmetric, hence robust to
    uniform noise, but it underfits on hard datasets.

    Keys: none besides ``method.name``.

    Label-issue score: mean training CE on the given label over epochs
    (docs/methods.md#label-issue-scores).
    """

    @classmethod
    def check_params(cls, params: Any) -> None:
        pass  # no hyperparameters

    def build_loss(self) -> nn.Module:
        return MAELoss()
