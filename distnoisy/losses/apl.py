"""Active-passive loss NCE+RCE (Ma et al., ICML 2020)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distnoisy.losses._common import (
    check_inputs,
    check_loss_weights,
    check_num_classes,
    gather_label,
    reverse_ce,
)


def nce_per_sample(logits: Tensor, labels: Tensor) -> Tensor:
    """Per-sample normalised CE ``(-log p_y) / (-Σ_k log p_k)`` from ``log_softmax``.

    The denominator is ``≥ C·log C > 0`` for any finite logits, so no clamp is needed.
    """
    log_p = F.log_softmax(logits, dim=1)
    return -gather_label(log_p, labels) / (-log_p.sum(dim=1))


class NCERCELoss(nn.Module):
    r"""Active-passive loss ``α·NCE + β·RCE``, mean over the batch.

    .. math:: L = \frac{1}{B}\sum_i \Bigl[\alpha\,\frac{-\log p_{i,\tilde y_i}}
                  {-\sum_k \log p_{ik}} + \beta\,\mathrm{RCE}_i\Bigr]

    docs/methods.md#apl. NCE is computed with ``log_softmax`` (as in the APL and
    DAL repositories). RCE is the same term as in :class:`~distnoisy.losses.sce.SCELoss`:
    ``-Σ_k p̂_k log clamp(e_y, 1e-4, 1)_k`` with ``p̂ = clamp(softmax(z), 1e-6, 1)`` (DAL
    repository's clamp; the APL code uses 1e-7).

    Parameters
    ----------
    num_classes
        ``C`` (≥ 2).
    alpha
        NCE weight, default 1.0 (APL, CIFAR-10). CIFAR-100: 10; WebVision: 50.
        Valid: ``α >= 0``.
    beta
        RCE weight, default 1.0 (APL, CIFAR-10). CIFAR-100 and WebVision: 0.1.
        Valid: ``β >= 0``; not both zero.
    """

    def __init__(self, num_classes: int, alpha: float = 1.0, beta: float = 1.0) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.alpha, self.beta = check_loss_weights(alpha, beta)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Return the mean NCE+RCE of ``logits`` ``[B, C]`` against ``labels`` ``[B]``."""
        check_inputs(logits, labels, self.num_classes)
        nce = nce_per_sample(logits, labels).mean()
        return self.alpha * nce + self.beta * reverse_ce(logits, labels).mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, alpha={self.alpha:g}, beta={self.beta:g}"
