"""ELR+ building blocks (Liu et al., NeurIPS 2020), docs/methods.md#elr-two-networks.

ELR+ trains two networks. Each step of network k: update its targets from the *other* network's
weight-averaged (EMA) copy on the un-mixed batch, mix the batch (one ``ℓ ≥ 0.5`` per batch),
and minimise the soft cross-entropy on the mixed labels plus ``λ · log(1 - <q, p>)`` with the
mixed targets ``q``. The functions here are the pure pieces; :mod:`distnoisy.methods.elr_plus`
runs them over two networks under DDP.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distnoisy.losses._common import check_range

# The clamp of the official code (docs/methods.md#elr-two-networks), on the regulariser's
# probabilities only:
# the ELR+ target update uses the raw softmax.
PROB_CLAMP = 1e-4


def sigmoid_rampup(current: float, length: float) -> float:
    """``exp(-5 (1 - min(current, L)/L)²)``, 1 when ``length == 0`` (Laine & Aila's ramp).

    Drives the λ ramp (``coef_step``) and the EMA ramp (``ema_step``) of ELR+.
    """
    if length <= 0:
        return 1.0
    phase = 1.0 - min(max(current, 0.0), length) / length
    return float(math.exp(-5.0 * phase * phase))


def ema_decay(iteration: int, alpha: float, ramp: bool, ramp_length: int) -> float:
    """The EMA coefficient ``a_t`` at step number ``t`` (docs/methods.md#elr-two-networks).

    ``ramp=True`` (CIFAR): ``alpha · sigmoid_rampup(t + 1, ramp_length)``; ``ramp=False``
    (Clothing1M, WebVision): ``min(1 - 1/(t + 1), alpha)``. The official trainer, and
    :class:`~distnoisy.methods.elr_plus.ELRPlus`, count steps from 1, so the first step uses
    ``t = 1``: ``a = 0.5`` without the ramp, ``alpha · sigmoid_rampup(2, ramp_length)`` with it.
    """
    if ramp:
        return alpha * sigmoid_rampup(iteration + 1, ramp_length)
    return min(1.0 - 1.0 / (iteration + 1), alpha)


@torch.no_grad()
def ema_update(ema: nn.Module, net: nn.Module, decay: float) -> None:
    """``θ̃ ← a θ̃ + (1 - a) θ`` for every parameter; buffers are left alone.

    The official EMA networks run in train mode, so their BatchNorm statistics come from their
    own forward passes and are not averaged (docs/methods.md#elr-two-networks).
    """
    for p_ema, p in zip(ema.parameters(), net.parameters(), strict=True):
        p_ema.mul_(decay).add_(p.detach(), alpha=1.0 - decay)


def mixup_coefficient(alpha: float, rng: np.random.Generator) -> float:
    """``ℓ ~ Beta(α, α)``, then ``ℓ ← max(ℓ, 1 - ℓ)``: the primary sample dominates (§2.8 i).

    One ``ℓ`` per batch, drawn from ``rng`` so that every rank (seeded alike) draws the same.
    """
    check_range("mixup_alpha", alpha, low=0.0, low_inclusive=False)
    lam = float(rng.beta(alpha, alpha))
    return max(lam, 1.0 - lam)


def elr_plus_target_update(old: Tensor, ema_logits: Tensor, beta: float) -> Tensor:
    """``t ← β t + (1 - β) softmax(f̃(x))`` with the other network's EMA logits, no clamp."""
    logits = ema_logits.detach()
    probs = F.softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=1)
    return beta * old.to(probs.dtype) + (1.0 - beta) * probs


def mix(a: Tensor, b: Tensor, lam: float) -> Tensor:
    """``ℓ a + (1 - ℓ) b`` (inputs, one-hot labels or targets, paired row by row)."""
    return lam * a + (1.0 - lam) * b


def elr_plus_loss(
    logits: Tensor,
    mixed_labels: Tensor,
    mixed_targets: Tensor,
    lam: float,
    ramp: float = 1.0,
    reweight: bool = False,
) -> Tensor:
    r"""The ELR+ loss of one mixed batch (docs/methods.md#elr-two-networks), mean over the batch.

    ``L = mean_i -<Y'_i, log_softmax(z_i)> + ramp · λ · mean_i log(1 - <q_i, clamp(p_i)>)``

    Parameters
    ----------
    logits
        ``[B, C]`` logits ``z`` of the network on the mixed inputs.
    mixed_labels
        ``[B, C]`` mixed one-hot labels ``Y_mix = ℓ Y + (1 - ℓ) Y_π``.
    mixed_targets
        ``[B, C]`` mixed ELR targets ``q = ℓ t + (1 - ℓ) t_π`` (no gradient flows into them).
    lam
        λ ≥ 0.
    ramp
        ``r(t)`` of the λ ramp (1 when ``coef_step = 0``).
    reweight
        The CIFAR-100 variant: ``Y' = normalise(Y_mix ⊙ q)``; otherwise ``Y' = Y_mix``. A row
        whose ``Y_mix ⊙ q`` sums to 0 (the mixed labels' classes have zero target mass, e.g.
        targets still at their initial 0) is divided by the smallest positive float instead
        of 0: its CE term is then 0 where the official code gives NaN
        (docs/methods.md#elr-two-networks).
    """
    q = mixed_targets.detach().to(logits.dtype)
    y = mixed_labels.to(logits.dtype)
    if reweight:
        y = y * q
        y = y / y.sum(dim=1, keepdim=True).clamp_min(torch.finfo(y.dtype).tiny)
    ce = -(y * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    p = F.softmax(logits, dim=1).clamp(PROB_CLAMP, 1.0 - PROB_CLAMP)
    reg = torch.log(1.0 - (q * p).sum(dim=1)).mean()
    return ce + ramp * lam * reg
