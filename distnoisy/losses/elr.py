"""Early-Learning Regularization (Liu et al., NeurIPS 2020): functional core and module."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distnoisy.losses._common import check_inputs, check_int, check_num_classes, check_range

# The official ELR clamps the softmax into [1e-4, 1 - 1e-4] both for the target update and for
# the regulariser (docs/methods.md#elr).
ELR_CLAMP = 1e-4


def _clamped_softmax(logits: Tensor) -> Tensor:
    return F.softmax(logits, dim=1).clamp(min=ELR_CLAMP, max=1.0 - ELR_CLAMP)


def elr_target_update(targets: Tensor, logits: Tensor, beta: float) -> Tensor:
    r"""Return the updated ELR targets for one batch: ``t ← β t + (1 - β) p̄``.

    ``p̄`` is the **detached** softmax of ``logits``, clamped into ``[1e-4, 1 - 1e-4]`` and then
    renormalised to sum to 1 (docs/methods.md#elr). No gradient flows into the result.

    Parameters
    ----------
    targets
        ``[B, C]`` current targets of the batch's samples (rows read from the per-sample store by
        global sample index; zeros on a sample's first visit).
    logits
        ``[B, C]`` classifier logits of the same forward pass that produces the loss.
    beta
        Target momentum in ``[0, 1)``.

    Returns
    -------
    Tensor
        ``[B, C]`` new targets, in ``targets``' dtype and device. The caller writes them back to
        its store and passes them to :func:`elr_loss`.
    """
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets {tuple(targets.shape)} and logits {tuple(logits.shape)} must both be [B, C]"
        )
    with torch.no_grad():
        # Work in at least float32 so that an fp16/bf16 forward pass does not quantise the
        # targets, which accumulate over the whole run.
        dtype = torch.promote_types(targets.dtype, torch.float32)
        p = _clamped_softmax(logits.detach().to(dtype))
        p_bar = p / p.sum(dim=1, keepdim=True)
        new = beta * targets.to(dtype) + (1.0 - beta) * p_bar.to(targets.device)
    return new.to(targets.dtype)


def elr_regularizer(logits: Tensor, targets: Tensor) -> Tensor:
    r"""The ELR regulariser ``mean_i log(1 - <t_i, p̂_i>)`` (without the weight λ).

    ``p̂ = clamp(softmax(z), 1e-4, 1 - 1e-4)``, not renormalised; ``t`` is detached. Exposed on its
    own for ELR+, which adds it (times ``r(t)·λ``) to a mixup soft-label CE with mixed targets
    (docs/methods.md#elr-two-networks).

    Parameters
    ----------
    logits
        ``[B, C]`` logits.
    targets
        ``[B, C]`` targets (for ELR: after this step's :func:`elr_target_update`).
    """
    if targets.shape != logits.shape:
        raise ValueError(
            f"targets {tuple(targets.shape)} and logits {tuple(logits.shape)} must both be [B, C]"
        )
    p_hat = _clamped_softmax(logits)
    s = (targets.detach().to(device=p_hat.device, dtype=p_hat.dtype) * p_hat).sum(dim=1)
    return torch.log(1.0 - s).mean()


def elr_loss(logits: Tensor, labels: Tensor, targets: Tensor, lam: float) -> Tensor:
    r"""ELR loss of a batch given its (already updated) targets.

    .. math:: L = \frac{1}{B}\sum_i \mathrm{CE}(z_i, \tilde y_i)
                  + \lambda \frac{1}{B}\sum_i \log\bigl(1 - \langle t_i, \hat p_i\rangle\bigr)

    ``CE`` is taken on the raw logits. ``p̂ = clamp(softmax(z), 1e-4, 1 - 1e-4)`` is **not**
    renormalised, so saturated entries contribute no gradient. ``t`` is treated as a constant
    (it is detached here whatever the caller passes).

    Parameters
    ----------
    logits
        ``[B, C]`` logits.
    labels
        ``[B]`` noisy integer labels.
    targets
        ``[B, C]`` targets *after* this step's :func:`elr_target_update`.
    lam
        Regularisation weight λ >= 0.
    """
    check_inputs(logits, labels)
    return F.cross_entropy(logits, labels.long()) + lam * elr_regularizer(logits, targets)


class ELRLoss(nn.Module):
    r"""Early-Learning Regularization loss with its per-sample targets, mean over the batch.

    Per call, in this order (docs/methods.md#elr):

    1. ``t_i ← β t_i + (1 - β) p̄_i`` for every ``i`` in ``index``, with ``p̄`` the detached softmax
       clamped into ``[1e-4, 1 - 1e-4]`` and renormalised (:func:`elr_target_update`);
    2. ``L = mean_i CE(z_i, ỹ_i) + λ · mean_i log(1 - ⟨t_i, p̂_i⟩)``, with ``p̂`` the clamped,
       *un*-renormalised softmax and no gradient through ``t`` (:func:`elr_loss`).

    The per-sample gradient is ``(p_c - [c = ỹ]) + λ p_c (s - t_c)/(1 - s)`` with ``s = ⟨t, p⟩``
    (divided by ``B`` for the mean) wherever no entry of ``p`` is at a clamp bound.

    Parameters
    ----------
    num_samples
        ``N``, the number of training samples; ``index`` holds global sample indices in
        ``[0, N)``. For Clothing1M this is the size of the full raw training list.
    num_classes
        ``C`` (≥ 2).
    beta
        Target momentum, default 0.7; valid range ``[0, 1)``. docs/methods.md#elr: 0.7 for CIFAR-10
        symmetric noise, 0.9 for CIFAR-10 asymmetric and CIFAR-100 (official configs).
    lam
        Regulariser weight λ, default 3.0; valid range ``λ ≥ 0``. docs/methods.md#elr: 3 for
        CIFAR-10 symmetric, 1 for CIFAR-10 asymmetric, 7 for CIFAR-100.

    Attributes
    ----------
    targets
        ``[N, C]`` float32 buffer, zeros at start (no bias correction: after the first visit a
        row sums to ``1 - β``). It is part of ``state_dict`` so that checkpoints carry it.

    Notes
    -----
    This module is a thin wrapper around :func:`elr_target_update` and :func:`elr_loss`; a
    distributed trainer that keeps the targets in its own per-sample store calls that pair
    directly with the rows it read. If ``index`` repeats a sample within one batch, each
    occurrence is updated from the same old row and the last write wins.
    """

    targets: Tensor

    def __init__(
        self, num_samples: int, num_classes: int, beta: float = 0.7, lam: float = 3.0
    ) -> None:
        super().__init__()
        self.num_samples = check_int("num_samples", num_samples, 1)
        self.num_classes = check_num_classes(num_classes)
        self.beta = check_range("beta", beta, low=0.0, high=1.0, high_inclusive=False)
        self.lam = check_range("lam", lam, low=0.0)
        self.register_buffer("targets", torch.zeros(self.num_samples, self.num_classes))

    def forward(self, logits: Tensor, labels: Tensor, index: Tensor) -> Tensor:
        """Update ``targets[index]`` from ``logits``, then return the ELR loss of the batch.

        Parameters
        ----------
        logits
            ``[B, C]`` logits.
        labels
            ``[B]`` noisy labels.
        index
            ``[B]`` global sample indices (never positions in the batch).
        """
        check_inputs(logits, labels, self.num_classes)
        if index.shape != labels.shape:
            raise ValueError(f"index must have shape [B], got {tuple(index.shape)}")
        idx = index.to(device=self.targets.device, dtype=torch.long)
        new = elr_target_update(self.targets[idx], logits, self.beta)
        self.targets[idx] = new
        return elr_loss(logits, labels, new, self.lam)

    def extra_repr(self) -> str:
        return (
            f"num_samples={self.num_samples}, num_classes={self.num_classes}, "
            f"beta={self.beta:g}, lam={self.lam:g}"
        )
