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

    docs/methods.md#peer-loss. The peer term pairs one sample's prediction with another,
    random sample's label, which penalises simply agreeing with the label marginal. ``n₁`` and
    ``n₂`` are two **independent uniformly random permutations of the batch** (so every
    prediction and every label is used exactly once in the peer term); the paper draws the two
    peer samples independently from the whole training set, and within-batch permutations are the
    usual mini-batch approximation. ``n₁(n) = n₂(n)`` can happen, as it can for independent
    draws.

    Both terms use a *stable* cross-entropy, ``-log(softmax(z)_y + eps)``, as the peer-loss
    code does (``CrossEntropyLossStable``, "as the original CrossEntropyLoss is likely to blow
    up when used in the peer term"), so the peer term is bounded by ``-log(eps)``. With plain
    CE it is unbounded below, and on digits Adam drove the loss to -2e11 while accuracy fell to
    18%. ``eps = 0`` gives plain CE. The default ``eps = 1e-8`` (bound ≈ 18.4) is the value of
    the later CAL repository's ``PeerLossOne``; Liu & Guo's own peer-loss scripts use
    ``eps = 1e-5`` (bound ≈ 11.5). Pass ``eps=1e-5`` to match them (docs/methods.md#peer-loss).

    Parameters
    ----------
    alpha
        Weight of the peer term, default 1.0. The paper uses ``α ∈ [0, 1]``, often ramped up
        during training (assign ``.alpha`` per epoch); ``α = 0`` is CE. Valid: ``α >= 0``
        (values above 1 are accepted for experiments).
    eps
        Added to the softmax inside the log, default 1e-8 (the CAL repository's; the
        peer-loss paper's code uses 1e-5). Valid: ``0 <= eps < 1``.
    """

    def __init__(self, alpha: float = 1.0, eps: float = 1e-8) -> None:
        super().__init__()
        self.alpha = check_range("alpha", alpha, low=0.0)
        self.eps = check_range("eps", eps, low=0.0, high=1.0, high_inclusive=False)

    def _ce(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.eps == 0.0:
            return F.cross_entropy(logits, labels)
        p_label = torch.softmax(logits, dim=1).gather(1, labels[:, None])[:, 0]
        return -torch.log(p_label + self.eps).mean()

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
        ce = self._ce(logits, labels)
        # Draw the permutations even when alpha == 0 so that ramping alpha from 0 does not change
        # how much of the generator (or the global RNG) each step consumes.
        n = logits.shape[0]
        n1 = _permutation(n, logits.device, generator)
        n2 = _permutation(n, logits.device, generator)
        peer = self._ce(logits[n1], labels.to(logits.device)[n2])
        return ce - self.alpha * peer

    def extra_repr(self) -> str:
        return f"alpha={self.alpha:g}, eps={self.eps:g}"
