"""Taylor cross-entropy (Feng et al., IJCAI 2020), docs/methods.md#taylor-ce.

The worked example of docs/adding_a_method.md: a loss-only method in one file (the loss module,
its config keys and its registration).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from distnoisy.core.method_params import MethodParams
from distnoisy.losses._common import DAL_EPS, check_inputs, check_int
from distnoisy.methods.base import METHODS
from distnoisy.methods.loss_method import LossMethod


class TaylorCELoss(nn.Module):
    r"""CE's Taylor series around ``p_ỹ = 1``, truncated after ``t`` terms; mean over the batch.

    .. math:: L = \frac{1}{B}\sum_i \sum_{j=1}^{t} \frac{(1 - \hat p_{i,\tilde y_i})^j}{j},
              \qquad \hat p = \mathrm{clamp}(\mathrm{softmax}(z), 10^{-6}, 1)

    ``-log p = Σ_{j≥1} (1 - p)^j / j``, so ``t → ∞`` is CE and ``t = 1`` is MAE. The loss is
    bounded by ``Σ_{j≤t} 1/j``, which limits how hard a mislabelled sample can pull.

    Parameters
    ----------
    order
        ``t``, the number of terms, default 2 (an integer ``>= 1``).
    """

    def __init__(self, order: int = 2) -> None:
        super().__init__()
        self.order = check_int("order", order, 1)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Return the mean truncated-Taylor CE of ``logits`` ``[B, C]`` against ``labels``."""
        check_inputs(logits, labels)
        p_y = F.softmax(logits, dim=1).gather(1, labels.long()[:, None])[:, 0]
        gap = 1.0 - p_y.clamp(min=DAL_EPS, max=1.0)
        loss = sum(gap**j / j for j in range(1, self.order + 1))
        return loss.mean()

    def extra_repr(self) -> str:
        return f"order={self.order}"


@dataclass
class TaylorCEParams(MethodParams):
    # Number of Taylor terms (t = 1 is MAE, large t approaches CE).
    order: int = 2


@METHODS.register("taylor_ce")
class TaylorCE(LossMethod):
    r"""Taylor CE: ``L = mean_i Σ_{j=1..t} (1 - p̂_ỹ)^j / j`` (:class:`TaylorCELoss`).

    Keys (defaults)
        ``method.order = 2``. Valid: an integer ``>= 1``.

    Label-issue score: mean training CE on the given label over epochs
    (docs/methods.md#label-issue-scores).
    """

    Params = TaylorCEParams

    @classmethod
    def check_params(cls, params: Any) -> None:
        TaylorCELoss(order=params.order)

    def build_loss(self) -> nn.Module:
        return TaylorCELoss(order=self.params.order)
