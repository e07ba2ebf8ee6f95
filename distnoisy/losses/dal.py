"""Dynamics-Aware Loss (Xiu-Chuan Li et al., arXiv 2303.11562).

GCE whose exponent ``q`` grows linearly per epoch (from fitting like CE towards robust, easy-sample
weighted GCE), plus a bootstrapping (entropy) term that switches on once ``q`` exceeds 1.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distnoisy.core.errors import ConfigError
from distnoisy.losses._common import check_inputs, check_int, check_num_classes, check_range
from distnoisy.losses.gce import gce_per_sample

# ``+1e-6`` inside the entropy's log, as in the DAL repository's ``BS`` class
# (docs/methods.md#dal).
ENTROPY_EPS = 1e-6


def dal_q(t: float, q_start: float, q_end: float, epochs: int) -> float:
    """GCE exponent at (0-based) epoch ``t``: ``q_t = q_s + (q_e - q_s) · t / E``.

    Linear, and it never quite reaches ``q_e``: the last epoch ``t = E - 1`` uses
    ``q_s + (q_e - q_s)(E - 1)/E`` (docs/methods.md#dal).
    """
    return q_start + (q_end - q_start) * t / epochs


def dal_t0(q_start: float, q_end: float, epochs: int) -> float:
    """Fractional epoch at which ``q_t`` crosses 1: ``t₀ = (1 - q_s) · E / (q_e - q_s)``.

    For a constant schedule (``q_e == q_s``), where the formula divides by zero, this returns the
    limit that keeps :func:`dal_lambda` meaningful: ``-inf`` if ``q_s > 1`` (bootstrapping fully
    on from the start) and ``+inf`` if ``q_s <= 1`` (never on, since ``q`` never exceeds 1).
    """
    if q_end == q_start:
        return -math.inf if q_start > 1.0 else math.inf
    return (1.0 - q_start) * epochs / (q_end - q_start)


def dal_lambda(t: float, q_start: float, q_end: float, epochs: int) -> float:
    """Bootstrapping weight at epoch ``t``: ``λ_t = max(0, (t - t₀)/(E - t₀))``.

    Zero while ``q_t <= 1`` (i.e. ``t <= t₀``), then a linear ramp that reaches
    ``(E - 1 - t₀)/(E - t₀)`` (≈ 0.988 for the CIFAR defaults) at the last epoch. ``t₀`` may be
    negative (``q_s > 1``: already on at epoch 0) or ``>= E`` (``q_e <= 1``: never on); the
    ``t <= t₀`` test handles the latter, where the bare formula would give a spurious positive
    ratio of two negatives.
    """
    t0 = dal_t0(q_start, q_end, epochs)
    if t <= t0:
        return 0.0
    if math.isinf(t0):  # constant schedule with q > 1
        return 1.0
    return max(0.0, (t - t0) / (epochs - t0))


class DALLoss(nn.Module):
    r"""Dynamics-Aware Loss, mean over the batch (docs/methods.md#dal).

    At epoch ``t`` (0-based, constant within the epoch):

    .. math:: L_t = \frac{1}{B}\sum_i \frac{1 - \hat p_{i,\tilde y_i}^{\,q_t}}{q_t}
                    + \lambda_t \frac{\bar H}{q_t \ln C},
              \qquad \bar H = \frac{1}{B}\sum_i -\sum_k p_{ik}\ln(p_{ik} + 10^{-6})

    - ``p̂ = clamp(softmax(z), 1e-6, 1)`` in the GCE term only;
    - ``H̄`` uses the **unclamped** softmax and is **not** detached (the gradient flows through
      both factors). This is the repository's HEAD "soft bootstrapping" (``bootstrap="soft"``);
    - ``q_t = q_s + (q_e - q_s) t/E``, ``t₀ = (1 - q_s)E/(q_e - q_s)``,
      ``λ_t = max(0, (t - t₀)/(E - t₀))`` (:func:`dal_q`, :func:`dal_t0`, :func:`dal_lambda`).

    ``bootstrap="hard"`` replaces ``H̄`` with ``mean_i CE(z_i, argmax_k p_ik)`` (the argmax is a
    constant; the gradient flows through the CE's logits), still divided by ``q_t ln C``. This is
    the form of the repository's first upload (commit e848776), before three commits on
    2023-03-24 switched to the entropy form; which one the paper reports
    is open (docs/methods.md#dal).

    Parameters
    ----------
    num_classes
        ``C`` (≥ 2; ``ln C`` normalises the bootstrapping term).
    q_start, q_end
        ``q_s`` and ``q_e``, defaults 0.6 and 1.5 (the repository's CIFAR script defaults;
        mini-WebVision uses ``q_s = 0.4``). The per-setting values of the paper's tables are not
        in the repository. Valid: ``q_s > 0`` and ``q_e >= q_s``.
    epochs
        ``E``, the length of the schedule, default 150 (CIFAR). Valid: ``E >= 1``.
    bootstrap
        ``"soft"`` (entropy, default, repository HEAD) or ``"hard"`` (first version).

    Attributes
    ----------
    epoch
        The current epoch (0 until :meth:`set_epoch` is called).
    q, lam
        ``q_t`` and ``λ_t`` at the current epoch, for logging.
    """

    def __init__(
        self,
        num_classes: int,
        q_start: float = 0.6,
        q_end: float = 1.5,
        epochs: int = 150,
        bootstrap: Literal["soft", "hard"] = "soft",
    ) -> None:
        super().__init__()
        self.num_classes = check_num_classes(num_classes)
        self.q_start = check_range("q_start", q_start, low=0.0, low_inclusive=False)
        self.q_end = check_range("q_end", q_end)
        if self.q_end < self.q_start:
            raise ConfigError(
                f"q_end must be >= q_start (q grows during training), got q_start={q_start:g}, "
                f"q_end={q_end:g}"
            )
        self.epochs = check_int("epochs", epochs, 1)
        if bootstrap not in ("soft", "hard"):
            raise ConfigError(f"bootstrap must be 'soft' or 'hard', got {bootstrap!r}")
        self.bootstrap = bootstrap
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Set the 0-based epoch that fixes ``q_t`` and ``λ_t`` until the next call.

        Raises
        ------
        ConfigError
            If ``epoch`` is outside ``[0, epochs)``: the schedule was built for ``epochs`` epochs
            and extrapolating it would silently push ``q`` past ``q_end``.
        """
        epoch = check_int("epoch", epoch, 0)
        if epoch >= self.epochs:
            raise ConfigError(
                f"epoch {epoch} is outside DAL's schedule [0, {self.epochs}); "
                f"set DALLoss(epochs=...) to the number of training epochs"
            )
        self.epoch = epoch

    @property
    def q(self) -> float:
        """``q_t`` at the current epoch."""
        return dal_q(self.epoch, self.q_start, self.q_end, self.epochs)

    @property
    def lam(self) -> float:
        """``λ_t`` at the current epoch."""
        return dal_lambda(self.epoch, self.q_start, self.q_end, self.epochs)

    def forward(self, logits: Tensor, labels: Tensor) -> Tensor:
        """Return the DAL loss of ``logits`` ``[B, C]`` against ``labels`` ``[B]``."""
        check_inputs(logits, labels, self.num_classes)
        q, lam = self.q, self.lam
        loss = gce_per_sample(logits, labels, q).mean()
        if lam > 0.0:  # λ = 0 contributes neither value nor gradient
            if self.bootstrap == "soft":
                p = F.softmax(logits, dim=1)
                boot = (-(p * torch.log(p + ENTROPY_EPS)).sum(dim=1)).mean()
            else:
                boot = F.cross_entropy(logits, logits.detach().argmax(dim=1))
            loss = loss + lam * boot / (q * math.log(self.num_classes))
        return loss

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, q_start={self.q_start:g}, q_end={self.q_end:g}, "
            f"epochs={self.epochs}, bootstrap={self.bootstrap!r}, epoch={self.epoch}"
        )
