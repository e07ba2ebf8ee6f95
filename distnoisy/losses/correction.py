"""Forward and backward loss correction with a noise transition matrix (Patrini et al., CVPR 2017),
and the anchor-point estimator of that matrix."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distnoisy.core.errors import ConfigError
from distnoisy.losses._common import check_inputs, check_range, gather_label

# Forward correction clamps p into [1e-10, 1] before multiplying by T
# (docs/methods.md#forward-and-backward-correction).
FORWARD_P_FLOOR = 1e-10
# Tolerance on row sums of T: an estimated T is row-normalised in float32, user-supplied
# matrices are often written with 3-4 decimals.
ROW_SUM_TOL = 1e-4
# A T whose condition number exceeds this is treated as singular by backward correction.
MAX_CONDITION = 1e8


def check_transition_matrix(transition_matrix: Tensor | object) -> Tensor:
    """Validate a noise transition matrix and return it as a float64 tensor.

    ``T[j, k] = P(ỹ = k | y = j)``: square (``C x C``, ``C >= 2``), finite, non-negative, and
    row-stochastic (each row sums to 1 within ``1e-4``).

    Raises
    ------
    ConfigError
        Naming the first offending row when a row is negative or does not sum to 1.
    """
    try:
        t = torch.as_tensor(transition_matrix, dtype=torch.float64).detach().cpu()
    except (TypeError, ValueError, RuntimeError) as exc:
        raise ConfigError(f"transition_matrix must be a C x C matrix of numbers: {exc}") from None
    if t.dim() != 2 or t.shape[0] != t.shape[1] or t.shape[0] < 2:
        raise ConfigError(
            f"transition_matrix must be a square C x C matrix with C >= 2, got shape "
            f"{tuple(t.shape)}"
        )
    if not torch.isfinite(t).all():
        row = int(torch.nonzero(~torch.isfinite(t))[0, 0])
        raise ConfigError(f"transition_matrix row {row} has non-finite entries: {t[row].tolist()}")
    neg = (t < 0).any(dim=1)
    if neg.any():
        row = int(torch.nonzero(neg)[0, 0])
        raise ConfigError(
            f"transition_matrix row {row} has negative entries: {t[row].tolist()} "
            f"(T[j, k] = P(noisy label k | true label j) must be >= 0)"
        )
    sums = t.sum(dim=1)
    bad = (sums - 1.0).abs() > ROW_SUM_TOL
    if bad.any():
        row = int(torch.nonzero(bad)[0, 0])
        raise ConfigError(
            f"transition_matrix row {row} sums to {float(sums[row]):.6g}, not 1 "
            f"(each row T[j, :] is the distribution of the noisy label given true label j)"
        )
    return t


class ForwardCorrectionLoss(nn.Module):
    r"""Forward-corrected cross-entropy, mean over the batch.

    .. math:: L = \frac{1}{B}\sum_i -\log\bigl(T^\top \hat p_i\bigr)_{\tilde y_i}
              = \frac{1}{B}\sum_i -\log \sum_k \hat p_{ik} T_{k\tilde y_i},
              \qquad \hat p = \mathrm{clamp}(\mathrm{softmax}(z), 10^{-10}, 1)

    docs/methods.md#forward-and-backward-correction (the clamp is the LIMIT repository's baseline).
    ``T^T p`` is the model's predicted distribution of the *noisy* label, so the network's own
    softmax estimates the clean posterior. With ``T = I`` this is CE (up to the clamp).

    Parameters
    ----------
    transition_matrix
        ``C x C`` matrix ``T[j, k] = P(ỹ = k | y = j)``: non-negative, rows summing to 1 (within
        1e-4). Estimate it with :func:`estimate_transition_matrix` or pass the known one. Kept
        as a float64 buffer (cast to the logits' dtype at use), so it follows ``.to(device)``
        and is saved in ``state_dict``.

    Notes
    -----
    If column ``ỹ`` of ``T`` is all zeros (label ``ỹ`` can never be observed), a sample with that
    label has infinite loss; such a ``T`` contradicts the data it is used with.
    """

    transition_matrix: Tensor

    def __init__(self, transition_matrix: Tensor) -> None:
        super().__init__()
        t = check_transition_matrix(transition_matrix)
        self.num_classes = t.shape[0]
        self.register_buffer("transition_matrix", t)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Return the mean forward-corrected CE of ``logits`` ``[B, C]`` against ``labels``."""
        check_inputs(logits, labels, self.num_classes)
        p = F.softmax(logits, dim=1).clamp(min=FORWARD_P_FLOOR, max=1.0)
        noisy_p = p @ self.transition_matrix.to(p.dtype)  # row i is (T^T p_i)^T
        return -torch.log(gather_label(noisy_p, labels)).mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"


class BackwardCorrectionLoss(nn.Module):
    r"""Backward-corrected cross-entropy, mean over the batch.

    .. math:: L = \frac{1}{B}\sum_i \bigl[T^{-1}\,\ell(p_i)\bigr]_{\tilde y_i},
              \qquad \ell(p) = (-\log p_1, \dots, -\log p_C)^\top

    docs/methods.md#forward-and-backward-correction. It is an unbiased estimate of the clean-label
    CE, but ``T^{-1}`` has negative entries, so the loss can go negative and training is unstable.
    ``l`` is computed with ``log_softmax`` (no clamp; the paper specifies none for this loss).

    Parameters
    ----------
    transition_matrix
        ``C x C`` row-stochastic, non-negative ``T`` as for :class:`ForwardCorrectionLoss`, and
        invertible: a singular (or numerically singular, condition number > 1e8) ``T`` raises
        :class:`~distnoisy.core.errors.ConfigError`. ``T^{-1}`` is computed once in float64 and kept
        as the ``inverse`` buffer.
    """

    transition_matrix: Tensor
    inverse: Tensor

    def __init__(self, transition_matrix: Tensor) -> None:
        super().__init__()
        t = check_transition_matrix(transition_matrix)
        cond = float(torch.linalg.cond(t))
        if not cond < MAX_CONDITION:  # also catches inf/nan
            raise ConfigError(
                f"transition_matrix is singular (condition number {cond:.3g}); backward "
                f"correction needs an invertible T, e.g. noise rate < (C-1)/C for symmetric noise"
            )
        self.num_classes = t.shape[0]
        self.register_buffer("transition_matrix", t)
        self.register_buffer("inverse", torch.linalg.inv(t))

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Return the mean backward-corrected CE of ``logits`` ``[B, C]`` against ``labels``."""
        check_inputs(logits, labels, self.num_classes)
        losses = -F.log_softmax(logits, dim=1)  # [B, C], row i is l(p_i)^T
        corrected = losses @ self.inverse.to(losses.dtype).T  # row i is (T^{-1} l(p_i))^T
        return gather_label(corrected, labels).mean()

    def extra_repr(self) -> str:
        return f"num_classes={self.num_classes}"


def estimate_transition_matrix(probs: Tensor, percentile: float = 97.0) -> Tensor:
    """Estimate ``T`` from a CE-trained model's softmax outputs by anchor points.

    For each class ``j``: take the ``percentile``-th percentile of ``probs[:, j]`` (NumPy's
    ``interpolation='higher'``, i.e. an actual data value), discard the samples whose ``p_j`` is
    at or above it (near-certain samples tend to be outliers the model memorised), and take the
    sample with the highest remaining ``p_j`` as the anchor for class ``j``; its whole probability
    vector becomes row ``j``. Finally every row is normalised to sum to 1.

    This follows the LIMIT repository's ``modules/baseline_utils.py::estimate_transition``
    (adapted from Patrini et al.'s code), docs/methods.md#forward-and-backward-correction. One
    difference: that code zeroes the discarded entries *in place* through a NumPy view of the
    prediction matrix, which also
    alters column ``j`` of the rows read for later classes; here ``probs`` is never modified.

    Parameters
    ----------
    probs
        ``[N, C]`` softmax probabilities (rows summing to 1), e.g. of a CE-trained model on the
        noisy training set.
    percentile
        Outlier cut in ``(0, 100]``, default 97 (Patrini et al.; LIMIT). With 100 only the
        single largest value(s) are discarded.

    Returns
    -------
    Tensor
        ``[C, C]`` row-stochastic estimate, float32 on ``probs``' device. If every sample of a
        column ties at the threshold (nothing remains), the anchor is the argmax without the cut.
    """
    percentile = check_range("percentile", percentile, low=0.0, high=100.0, low_inclusive=False)
    if probs.dim() != 2 or probs.shape[1] < 2 or probs.shape[0] < 1:
        raise ValueError(f"probs must have shape [N, C] with C >= 2, got {tuple(probs.shape)}")
    # NumPy, not torch.quantile: the latter refuses inputs above 2**24 elements, and NumPy's
    # percentile is what the reference code uses.
    p = probs.detach().to(device="cpu", dtype=torch.float64).numpy()
    rows = []
    for j in range(p.shape[1]):
        col = p[:, j]
        thresh = np.percentile(col, percentile, method="higher")
        keep = col < thresh
        anchor = int(np.argmax(np.where(keep, col, -1.0))) if keep.any() else int(np.argmax(col))
        rows.append(p[anchor])
    t = np.stack(rows)
    t = t / t.sum(axis=1, keepdims=True)
    return torch.as_tensor(t, dtype=torch.float32, device=probs.device)
