"""Plain cross-entropy, for symmetry with the robust losses."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distnoisy.losses._common import check_inputs


class CELoss(nn.Module):
    r"""Cross-entropy on the noisy label, mean over the batch.

    .. math:: L = \frac{1}{B}\sum_i -\log \mathrm{softmax}(z_i)_{\tilde y_i}

    docs/methods.md#ce. No hyperparameters. Computed with ``F.cross_entropy`` on the raw
    logits (log-softmax, so it is finite for any finite logits).
    """

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Return the mean CE of ``logits`` ``[B, C]`` against integer ``labels`` ``[B]``."""
        check_inputs(logits, labels)
        return F.cross_entropy(logits, labels.long())
