"""Peer loss (Liu & Guo, ICML 2020)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distnoisy.losses._common import check_inputs, check_range


def _permutation(n: int, device: torch.device, generator: torch.Generator | None) -> Tensor:
    if generator is None:
        return torch.randperm(n, device=device)
    # randperm needs the generator's device; the result is moved to the logits' device.
    return torch.randperm(n, generator=generator, device=generator.device).to(device)


class PeerLoss(nn.Module):
    r"""Peer loss with cross-entropy, mean over the batch.

    .. math:: L = \frac{1}{B}\sum_n \mathrm{CE}(z_n, \tilde y_n)
                  - \alpha\,\frac{1}{B}\sum_n \mathrm{CE}(z_{n_1(n)}, \tilde y_{n_2(n)})

    METHODS.md §7, row "Peer loss". The peer term pairs one sample's prediction with another,
    random sample's label, which penalises simply agreeing with the label marginal. ``n₁`` and
    ``n₂`` are two **independent uniformly random permutations of the batch** (so every
    prediction and every label is used exactly once in the peer term); the paper draws the two
    peer samples independently from the whole training set, and within-batch permutations are the
    usual mini-batch approximation. ``n₁(n) = n₂(n)`` can happen, as it can for independent
    draws. CE uses ``log_softmax`` (finite for any finite logits).

    Parameters
    ----------
    alpha
        Weight of the peer term, default 1.0. METHODS.md gives ``α ∈ [0, 1]``, often ramped up
        during training (assign ``.alpha`` per epoch); ``α = 0`` is CE. Valid: ``α >= 0``
        (values above 1 are accepted for experiments but make the loss unbounded below faster).
    """

    def __init__(self, alpha: float = 1.0) -> None:
        super().__init__()
        self.alpha = check_range("alpha", alpha, low=0.0)

    def forward(
        self, logits: Tensor, labels: Tensor, generator: torch.Generator | None = None
    ) -> Tensor:
        """Return the peer loss of ``logits`` ``[B, C]`` against ``labels`` ``[B]``.

        Parameters
        ----------
        generator
            Optional ``torch.Generator`` for the two permutations (``n₁`` is drawn first, then
            ``n₂``), for reproducibility; the global RNG is used when ``None``.
        """
        check_inputs(logits, labels)
        labels = labels.long()
        ce = F.cross_entropy(logits, labels)
        # Draw the permutations even when alpha == 0 so that ramping alpha from 0 does not change
        # how much of the generator (or the global RNG) each step consumes.
        n = logits.shape[0]
        n1 = _permutation(n, logits.device, generator)
        n2 = _permutation(n, logits.device, generator)
        peer = F.cross_entropy(logits[n1], labels.to(logits.device)[n2])
        return ce - self.alpha * peer

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}"
