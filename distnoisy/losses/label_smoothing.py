"""Label smoothing, positive or negative (Wei et al. 2022)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distnoisy.losses._common import check_inputs, check_num_classes, check_range, soft_target_ce


class LabelSmoothingLoss(nn.Module):
    r"""Cross-entropy against the smoothed target ``(1 - ε)e_ỹ + ε/C``, mean over the batch.

    .. math:: L = \frac{1}{B}\sum_i -\sum_k \Bigl[(1-\varepsilon)[k=\tilde y_i]
                  + \frac{\varepsilon}{C}\Bigr] \log p_{ik}

    docs/methods.md#label-smoothing; computed with ``log_softmax`` (no clamp needed).

    Parameters
    ----------
    num_classes
        ``C`` (≥ 2).
    epsilon
        Smoothing, default 0.1 (the common choice; the papers give none). Valid range
        ``[-1, 1)``. ``ε = 1`` would ignore the label entirely. ``ε < 0`` is *negative* label
        smoothing (Wei et al. 2022, "To smooth or not?"): the target then has the negative
        entries ``ε/C`` off the label and ``1 - ε + ε/C > 1`` on it, so the gradient
        ``p_k - ε/C > 0`` keeps pushing every non-label probability to 0 and the loss is
        unbounded below (it goes negative as the model becomes confident). We cap it at
        ``ε >= -1``, beyond the range studied in that paper, to catch sign or scale mistakes.
    """

    def __init__(self, num_classes: int, epsilon: float = 0.1) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.epsilon = check_range("epsilon", epsilon, low=-1.0, high=1.0, high_inclusive=False)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Return the mean smoothed CE of ``logits`` ``[B, C]`` against ``labels`` ``[B]``."""
        check_inputs(logits, labels, self.num_classes)
        one_hot = F.one_hot(labels.long(), self.num_classes).to(logits.dtype)
        target = (1.0 - self.epsilon) * one_hot + self.epsilon / self.num_classes
        return soft_target_ce(logits, target).mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}, epsilon={self.epsilon:g}"
