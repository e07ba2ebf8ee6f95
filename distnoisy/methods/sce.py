"""SCE: symmetric cross-entropy (Wang et al., ICCV 2019), docs/methods.md#sce."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from distnoisy.core.method_params import MethodParams
from distnoisy.losses import SCELoss
from distnoisy.methods.base import METHODS
from distnoisy.methods.loss_method import LossMethod


@dataclass
class SCEParams(MethodParams):
    # CE and RCE weights (SCE paper, CIFAR-10; CIFAR-100 uses alpha=6, beta=0.1 [unverified]).
    alpha: float = 0.1
    beta: float = 1.0


@METHODS.register("sce")
class SCE(LossMethod):
    r"""Symmetric CE: ``L = mean_i [α·CE_i + β·RCE_i]``.

    ``RCE_i = -Σ_k p̂_k log clamp(e_ỹ, 1e-4, 1)_k ≈ 9.21·(1 - p_ỹ)`` with
    ``p̂ = clamp(softmax(z), 1e-6, 1)`` (docs/methods.md#sce; module
    :class:`~distnoisy.losses.SCELoss`).

    Keys (defaults)
        ``method.alpha = 0.1``, ``method.beta = 1.0`` (SCE paper, CIFAR-10; CIFAR-100:
        6.0 / 0.1 [unverified]). Valid: both ``>= 0``, not both 0.

    Label-issue score: mean training CE on the given label over epochs
    (docs/methods.md#label-issue-scores).
    """

    Params = SCEParams

    @classmethod
    def check_params(cls, params: Any) -> None:
        SCELoss(2, alpha=params.alpha, beta=params.beta)

    def build_loss(self) -> nn.Module:
        return SCELoss(self.num_classes, alpha=self.params.alpha, beta=self.params.beta)
