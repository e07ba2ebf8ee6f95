"""Symmetric cross-entropy (Wang et al., ICCV 2019)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distnoisy.losses._common import check_inputs, check_loss_weights, check_num_classes, reverse_ce


class SCELoss(nn.Module):
    r"""Symmetric cross-entropy ``α·CE + β·RCE``, mean over the batch.

    .. math:: L = \frac{1}{B}\sum_i \Bigl[\alpha\,(-\log p_{i,\tilde y_i})
                  - \beta \sum_k \hat p_{ik} \log \mathrm{clamp}(e_{\tilde y_i}, 10^{-4}, 1)_k\Bigr]

    docs/methods.md#sce. CE is taken on the raw logits (log-softmax). In the reverse CE,
    ``p̂ = clamp(softmax(z), 1e-6, 1)`` (the DAL repository's clamp) and the clamped one-hot
    makes ``RCE = -log(1e-4)·Σ_{k≠y} p̂_k ≈ 9.21·(1 - p_y)``.

    The SCE authors' code clamps at 1e-7 instead. Only the ``C - 1`` non-label entries enter
    RCE (the label's ``log 1 = 0``), and each ``max(p_k, 1e-6) - max(p_k, 1e-7)`` lies in
    ``[0, 9e-7]``, so per sample (and for the batch mean) the two RCEs differ by at most
    ``-log(1e-4)·(C - 1)·9e-7 ≈ 8.29e-6·(C - 1)``: 7.5e-5 at C = 10, 8.2e-4 at C = 100,
    times ``β`` in the loss. The bound is reached when every non-label probability is below
    1e-7 (a confident network), and measured at that value in float64.

    Parameters
    ----------
    num_classes
        ``C`` (≥ 2).
    alpha
        CE weight, default 0.1 (SCE paper, CIFAR-10; CIFAR-100 uses 6.0 [unverified]).
        Valid: ``α >= 0``.
    beta
        RCE weight, default 1.0 (SCE paper, CIFAR-10; CIFAR-100 uses 0.1 [unverified]).
        Valid: ``β >= 0``; ``α`` and ``β`` must not both be zero.
    """

    def __init__(self, num_classes: int, alpha: float = 0.1, beta: float = 1.0) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.alpha, self.beta = check_loss_weights(alpha, beta)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Return the mean SCE of ``logits`` ``[B, C]`` against ``labels`` ``[B]``."""
        check_inputs(logits, labels, self.num_classes)
        ce = F.cross_entropy(logits, labels.long())
        return self.alpha * ce + self.beta * reverse_ce(logits, labels).mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, alpha={self.alpha:g}, beta={self.beta:g}"
