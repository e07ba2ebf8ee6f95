"""Shared helpers for the loss modules: argument checks and small numeric building blocks."""

from __future__ import annotations

import math
import operator

import torch.nn.functional as F
from torch import Tensor

from distnoisy.core.errors import ConfigError

# Clamp used by the DAL repository (``eps = 1e-6`` in ``utils/losses.py``) for GCE, RCE and DAL,
# which distnoisy adopts for these baselines
# (docs/methods.md#conventions).
DAL_EPS = 1e-6

# RCE clamps the one-hot label to [1e-4, 1]; log(1e-4) is the constant that multiplies (1 - p_y).
RCE_LABEL_FLOOR = 1e-4


def check_finite(name: str, value: float) -> float:
    """Return ``float(value)`` or raise :class:`ConfigError` if it is not a finite number."""
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{name} must be a number, got {value!r}") from None
    if not math.isfinite(value):
        raise ConfigError(f"{name} must be finite, got {value!r}")
    return value


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_inclusive: bool = True,
    high_inclusive: bool = True,
) -> float:
    """Check that ``value`` lies in the interval given and return it as a float.

    Raises
    ------
    ConfigError
        If the value is not finite or lies outside the interval; the message names the parameter
        and the valid interval.
    """
    value = check_finite(name, value)
    ok = True
    if low is not None:
        ok &= value >= low if low_inclusive else value > low
    if high is not None:
        ok &= value <= high if high_inclusive else value < high
    if not ok:
        lo = "(-inf" if low is None else ("[" if low_inclusive else "(") + f"{low:g}"
        hi = "inf)" if high is None else f"{high:g}" + ("]" if high_inclusive else ")")
        raise ConfigError(f"{name} must be in {lo}, {hi}, got {value:g}")
    return value


def check_loss_weights(alpha: float, beta: float) -> tuple[float, float]:
    """Validate the two non-negative weights of a combined loss (not both zero)."""
    alpha = check_range("alpha", alpha, low=0.0)
    beta = check_range("beta", beta, low=0.0)
    if alpha == 0.0 and beta == 0.0:
        raise ConfigError("alpha and beta must not both be 0 (the loss would be constant)")
    return alpha, beta


def check_int(name: str, value: int, low: int) -> int:
    """Return ``value`` as an int, or raise :class:`ConfigError` unless it is an integer >= low."""
    try:
        if isinstance(value, bool):
            raise TypeError
        ivalue = operator.index(value)
    except TypeError:
        raise ConfigError(f"{name} must be an integer >= {low}, got {value!r}") from None
    if ivalue < low:
        raise ConfigError(f"{name} must be an integer >= {low}, got {ivalue}")
    return ivalue


def check_num_classes(num_classes: int) -> int:
    """Return ``num_classes`` as an int, or raise :class:`ConfigError` unless it is >= 2."""
    return check_int("num_classes", num_classes, 2)


def check_inputs(logits: Tensor, labels: Tensor, num_classes: int | None = None) -> None:
    """Raise ``ValueError`` if ``logits`` is not ``[B, C]`` or ``labels`` is not ``[B]``.

    Shape errors are programming errors in the caller's loop, not configuration errors, so they
    are plain ``ValueError``\\ s.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must have shape [B, C], got {tuple(logits.shape)}")
    if labels.shape != logits.shape[:1]:
        raise ValueError(
            f"labels must have shape [B] = [{logits.shape[0]}], got {tuple(labels.shape)}"
        )
    if num_classes is not None and logits.shape[1] != num_classes:
        raise ValueError(
            f"logits have {logits.shape[1]} classes but the loss was built for {num_classes}"
        )


def gather_label(values: Tensor, labels: Tensor) -> Tensor:
    """Return ``values[i, labels[i]]`` for each row ``i`` (shape ``[B]``)."""
    return values.gather(1, labels.long().unsqueeze(1)).squeeze(1)


def reverse_ce(logits: Tensor, labels: Tensor, p_floor: float = DAL_EPS) -> Tensor:
    """Per-sample reverse cross-entropy ``-sum_k p_k log(clamp(e_y, 1e-4, 1)_k)``.

    ``p`` is the softmax clamped to ``[p_floor, 1]`` (the DAL repository's ``RCE``). Since the
    clamped one-hot has log 0 at the label and log(1e-4) elsewhere, this equals
    ``-log(1e-4) * sum_{k != y} clamp(p_k)``, i.e. ``≈ 9.21 * (1 - p_y)`` away from the clamp.
    """
    p = F.softmax(logits, dim=1).clamp(min=p_floor, max=1.0)
    one_hot = F.one_hot(labels.long(), logits.shape[1]).to(p.dtype)
    log_label = one_hot.clamp(min=RCE_LABEL_FLOOR, max=1.0).log()
    return -(p * log_label).sum(dim=1)


def soft_target_ce(logits: Tensor, target: Tensor) -> Tensor:
    """Per-sample cross-entropy ``-sum_k target_k log softmax(logits)_k`` (shape ``[B]``)."""
    return -(target * F.log_softmax(logits, dim=1)).sum(dim=1)
