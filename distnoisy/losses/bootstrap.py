"""Bootstrapping loss (Reed et al., ICLR 2015 workshop), soft and hard."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distnoisy.losses._common import check_inputs, check_range, soft_target_ce

# Reed et al.'s values (docs/methods.md#bootstrapping): β = 0.95 soft, 0.8 hard.
DEFAULT_BETA_SOFT = 0.95
DEFAULT_BETA_HARD = 0.8


class BootstrapLoss(nn.Module):
    r"""Bootstrapping: cross-entropy against a mix of the label and the model's own prediction.

    .. math:: L = \frac{1}{B}\sum_i -\sum_k \bigl[\beta\,[k=\tilde y_i]
                  + (1-\beta)\,a_{ik}\bigr]\log p_{ik}

    with ``a = sg(p)`` (soft) or ``a = e_{argmax p}`` (hard). docs/methods.md#bootstrapping;
    computed with ``log_softmax``.

    The soft form **detaches** ``p`` in the target: the prediction acts as a pseudo-label, as in
    the commonly used PyTorch implementation of Reed et al. (the ``as_pseudo_label`` default).
    Without the detach, the extra term ``-(1-β)Σ_k p_k log p_k`` is an entropy-minimisation
    regulariser whose gradient differs (it is DAL's bootstrapping term, see
    :class:`~distnoisy.losses.dal.DALLoss`); keeping the two distinct keeps this baseline the
    "label correction with a moving target" that Reed et al. describe. ``argmax`` carries no
    gradient in the hard form, so the two forms agree in that respect.

    Parameters
    ----------
    beta
        Weight of the given label. Default ``None`` means Reed et al.'s value for the chosen
        form: 0.95 (soft) or 0.8 (hard). Valid range ``[0, 1]``; ``β = 1`` is plain CE.
    hard
        ``False`` for soft bootstrapping (default), ``True`` for hard.
    """

    def __init__(self, beta: float | None = None, hard: bool = False) -> None:
        super().__init__()
        self.hard = bool(hard)
        if beta is None:
            beta = DEFAULT_BETA_HARD if self.hard else DEFAULT_BETA_SOFT
        self.beta = check_range("beta", beta, low=0.0, high=1.0)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Return the mean bootstrapping loss of ``logits`` ``[B, C]`` against ``labels``."""
        check_inputs(logits, labels)
        num_classes = logits.shape[1]
        one_hot = F.one_hot(labels.long(), num_classes).to(logits.dtype)
        pred = logits.detach()
        if self.hard:
            own = F.one_hot(pred.argmax(dim=1), num_classes).to(logits.dtype)
        else:
            own = F.softmax(pred, dim=1)
        target = self.beta * one_hot + (1.0 - self.beta) * own
        return soft_target_ce(logits, target).mean()

    def extra_repr(self) -> str:
        return f"beta={self.beta:g}, hard={self.hard}"
