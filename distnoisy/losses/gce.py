"""Generalised cross-entropy (Zhang & Sabuncu 2018) and its truncated form."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from distnoisy.losses._common import DAL_EPS, check_inputs, check_range, gather_label


def gce_per_sample(logits: Tensor, labels: Tensor, q: float, floor: float = DAL_EPS) -> Tensor:
    """Per-sample GCE ``(1 - clamp(p_y, floor, 1)^q) / q`` (shape ``[B]``).

    The clamp (the DAL repository's ``eps = 1e-6``) keeps ``p_y^q`` and its gradient finite when the
    softmax underflows; for ``p_y <= floor`` the gradient is exactly zero.
    """
    p_y = gather_label(F.softmax(logits, dim=1), labels).clamp(min=floor, max=1.0)
    return (1.0 - p_y.pow(q)) / q


class GCELoss(nn.Module):
    r"""Generalised cross-entropy, mean over the batch.

    .. math:: L = \frac{1}{B}\sum_i \frac{1 - \hat p_{i,\tilde y_i}^{\,q}}{q},
              \qquad \hat p = \mathrm{clamp}(\mathrm{softmax}(z), 10^{-6}, 1)

    docs/methods.md#gce. ``q → 0`` recovers CE and ``q = 1`` is MAE. The relative weight of a
    sample's CE gradient is ``p_y^q``, so larger ``q`` favours confident samples.

    Parameters
    ----------
    q
        Exponent, default 0.7 (Zhang & Sabuncu; also the DAL repository's ``cifar.py`` default).
        Valid range ``q > 0``. The paper uses ``q ∈ (0, 1]``; ``q > 1`` is allowed because DAL's
        schedule goes up to 1.5 (the loss then lies in ``[0, 1/q]``).

    Notes
    -----
    ``p`` is clamped to ``≥ 1e-6`` as in the DAL repository (docs/methods.md#gce), so the loss is
    finite and its gradient zero when the softmax underflows.
    """

    def __init__(self, q: float = 0.7) -> None:
        super().__init__()
        self.q = check_range("q", q, low=0.0, low_inclusive=False)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Return the mean GCE of ``logits`` ``[B, C]`` against ``labels`` ``[B]``."""
        check_inputs(logits, labels)
        return gce_per_sample(logits, labels, self.q).mean()

    def extra_repr(self) -> str:
        return f"q={self.q:g}"


class TruncatedGCELoss(nn.Module):
    r"""Truncated GCE (Zhang & Sabuncu 2018), mean over the batch.

    .. math:: L_i = w_i \,\frac{1 - p_{\tilde y}^{\,q}}{q} + (1 - w_i)\,\frac{1 - k^q}{q}

    with per-sample weights ``w_i`` in {0, 1}. The paper starts with ``w = 1`` (plain GCE) and,
    from a pruning epoch on, periodically sets ``w_i = [p_{i,ỹ} > k]``: a pruned sample
    contributes the constant ``(1 - k^q)/q`` and no gradient. Pass the weights as ``keep``
    (the trainer keeps them in the per-sample store, see ``distnoisy.methods.gce``).

    Without ``keep`` the module applies the stateless cap of docs/methods.md#gce,
    ``(1 - max(p_ỹ, k)^q)/q``, i.e. it prunes with the *current* ``p_ỹ``. Do not train from
    scratch with that form: at initialisation every ``p_ỹ ≈ 1/C <= k``, so every gradient is zero
    and the network never learns (measured on digits: chance accuracy after 60 epochs).

    Parameters
    ----------
    q
        Exponent, default 0.7 (Zhang & Sabuncu). Valid range ``q > 0``.
    k
        Truncation threshold, default 0.5 (Zhang & Sabuncu). Valid range ``0 <= k < 1``;
        ``k = 0`` is plain GCE (with the 1e-6 clamp of :class:`GCELoss`).
    """

    def __init__(self, q: float = 0.7, k: float = 0.5) -> None:
        super().__init__()
        self.q = check_range("q", q, low=0.0, low_inclusive=False)
        self.k = check_range("k", k, low=0.0, high=1.0, high_inclusive=False)

    def forward(self, logits: Tensor, labels: Tensor, keep: Tensor | None = None) -> Tensor:
        """Mean truncated GCE of ``logits`` ``[B, C]`` against ``labels`` ``[B]``; ``keep``
        ``[B]`` holds the weights ``w_i`` (1 = kept, 0 = pruned)."""
        check_inputs(logits, labels)
        if keep is None:
            # Clamping p_y from below at k is exactly the cap, and gives zero gradient below it.
            return gce_per_sample(logits, labels, self.q, floor=max(self.k, DAL_EPS)).mean()
        keep = keep.to(logits.device, logits.dtype)
        pruned_value = (1.0 - self.k**self.q) / self.q
        per_sample = gce_per_sample(logits, labels, self.q)
        return (keep * per_sample + (1.0 - keep) * pruned_value).mean()

    def extra_repr(self) -> str:
        return f"q={self.q:g}, k={self.k:g}"
