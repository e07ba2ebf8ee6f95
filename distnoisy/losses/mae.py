"""Mean absolute error between the softmax and the one-hot label."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distnoisy.losses._common import check_inputs, gather_label


class MAELoss(nn.Module):
    r"""MAE loss, ``1 - p_y`` per sample, mean over the batch.

    .. math:: L = \frac{1}{B}\sum_i \left(1 - p_{i,\tilde y_i}\right),\quad p = \mathrm{softmax}(z)

    This is ``½‖p - e_y‖₁`` (docs/methods.md#mae; the DAL repository's ``MAE`` class uses the
    same ``1 - p_y`` scale). It is symmetric, hence robust to uniform noise, but underfits on hard
    datasets. No hyperparameters; no clamp is needed since ``p_y`` enters linearly.
    """

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Return the mean of ``1 - softmax(logits)[y]``."""
        check_inputs(logits, labels)
        p_y = gather_label(F.softmax(logits, dim=1), labels)
        return (1.0 - p_y).mean()
