"""Active-passive loss NCE+RCE (Ma et al., ICML 2020), docs/methods.md#apl."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from distnoisy.core.method_params import MethodParams
from distnoisy.losses import NCERCELoss
from distnoisy.methods.base import METHODS
from distnoisy.methods.loss_method import LossMethod


@dataclass
class NCERCEParams(MethodParams):
    # NCE and RCE weights (APL paper, CIFAR-10; CIFAR-100: 10 / 0.1; WebVision: 50 / 0.1).
    alpha: float = 1.0
    beta: float = 1.0


@METHODS.register("nce_rce")
class NCERCE(LossMethod):
    r"""NCE+RCE: ``L = mean_i [α·(-log p_{i,ỹ}) / (-Σ_k log p_{ik}) + β·RCE_i]``.

    The active term is the normalised CE and the passive one the reverse CE of SCE
    (docs/methods.md#apl; module :class:`~distnoisy.losses.NCERCELoss`).

    Keys (defaults)
        ``method.alpha = 1.0``, ``method.beta = 1.0`` (APL paper, CIFAR-10; CIFAR-100: 10 / 0.1;
        WebVision: 50 / 0.1, matching the DAL repository). Valid: both ``>= 0``, not both 0.

    Label-issue score: mean training CE on the given label over epochs
    (docs/methods.md#label-issue-scores).
    """

    Params = NCERCEParams

    @classmethod
    def check_params(cls, params: Any) -> None:
        NCERCELoss(2, alpha=params.alpha, beta=params.beta)

    def build_loss(self) -> nn.Module:
        return NCERCELoss(self.num_classes, alpha=self.params.alpha, beta=self.params.beta)
