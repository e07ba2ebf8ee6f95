"""DAL: Dynamics-Aware Loss (Xiu-Chuan Li et al., arXiv 2303.11562), docs/methods.md#dal."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import nn

from distnoisy.core.method_params import MethodParams
from distnoisy.losses import DALLoss
from distnoisy.methods.base import METHODS
from distnoisy.methods.loss_method import LossMethod


@dataclass
class DALParams(MethodParams):
    # Start and end of the linear q schedule (DAL repository, CIFAR script defaults).
    q_start: float = 0.6
    q_end: float = 1.5
    # "soft" = entropy bootstrapping (repository HEAD), "hard" = CE on the argmax (first upload).
    bootstrap: str = "soft"


@METHODS.register("dal")
class DAL(LossMethod):
    r"""Dynamics-Aware Loss: GCE with a per-epoch growing ``q`` plus a bootstrapping term.

    At 0-based epoch ``t`` of ``E = train.epochs`` (docs/methods.md#dal; module
    :class:`~distnoisy.losses.DALLoss`):

    .. math:: L_t = \frac{1}{B}\sum_i \frac{1 - \hat p_{i,\tilde y_i}^{\,q_t}}{q_t}
                    + \lambda_t \frac{\bar H}{q_t \ln C}

    with ``q_t = q_s + (q_e - q_s) t/E``, ``t₀ = (1 - q_s)E/(q_e - q_s)`` and
    ``λ_t = max(0, (t - t₀)/(E - t₀))``: fitting like CE early, robust and easy-sample weighted
    later, with the bootstrapping term on once ``q_t > 1``. ``H̄`` is the mean prediction entropy
    (``bootstrap="soft"``) or the mean CE against the model's own argmax (``"hard"``).

    The schedule is built for the run's real ``train.epochs`` and set at every epoch start;
    :meth:`on_epoch_start` returns ``dal_q`` and ``dal_lambda`` so they are logged per epoch.

    Keys (defaults)
        ``method.q_start = 0.6``, ``method.q_end = 1.5`` (the repository's CIFAR script
        defaults; mini-WebVision uses ``q_start = 0.4``; the paper's per-setting values are not
        in the repository). Valid: ``q_start > 0``, ``q_end >= q_start``.
        ``method.bootstrap = "soft"`` (repository HEAD) or ``"hard"`` (its first upload).

    Label-issue score: mean training CE on the given label over epochs
    (docs/methods.md#label-issue-scores; DAL keeps no per-sample state, §4.2).
    """

    Params = DALParams

    @classmethod
    def check_params(cls, params: Any) -> None:
        # The epoch count is not part of method.*; any valid E checks q_start, q_end, bootstrap.
        DALLoss(2, q_start=params.q_start, q_end=params.q_end, epochs=1, bootstrap=params.bootstrap)

    def build_loss(self) -> nn.Module:
        return DALLoss(
            self.num_classes,
            q_start=self.params.q_start,
            q_end=self.params.q_end,
            epochs=self.epochs,
            bootstrap=self.params.bootstrap,
        )

    def on_epoch_start(self, epoch: int) -> dict[str, float]:
        criterion = self.require_criterion()
        assert isinstance(criterion, DALLoss)
        criterion.set_epoch(epoch)
        return {"dal_q": criterion.q, "dal_lambda": criterion.lam}
