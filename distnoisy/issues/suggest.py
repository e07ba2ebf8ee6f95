"""Suggested labels with a confidence, from a run's per-sample evidence (numpy in and out).

A reviewer who finds a label wrong needs the right one. A run's final prediction is no use for
that once the network has memorised the wrong label: it then *is* the given label. The
suggestion is instead the class other than the given label that the method's evidence
supports most (``docs/methods.md#suggested-labels``): the training predictions of every epoch
for loss-only methods (the wrong label wins only late, after the clean class has been
predicted for many epochs), ELR's and ELR+'s targets, LIMIT's q-network. Its confidence is the
evidence's share for it.

- :func:`suggest_labels`: the best alternative to the given label per sample, ties broken by
  further evidence, and its confidence;
- :func:`alternative_share`: how much of a sample's evidence names any class other than the
  given one.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _check(given: np.ndarray, evidence: np.ndarray, name: str = "evidence") -> np.ndarray:
    ev = np.asarray(evidence, dtype=np.float64)
    if ev.ndim != 2 or len(ev) != len(given):
        raise ValueError(f"{name} must be [N, C] with N = {len(given)}, got shape {ev.shape}")
    return ev


def suggest_labels(
    given: np.ndarray,
    evidence: np.ndarray,
    *,
    tiebreak: Sequence[np.ndarray] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """The class other than the given label with the most evidence, and its evidence share.

    Parameters
    ----------
    given : np.ndarray
        ``[N]`` given labels in ``0..C-1``.
    evidence : np.ndarray
        ``[N, C]`` non-negative evidence per class (vote shares, a target distribution,
        probabilities); rows need not sum to 1.
    tiebreak : sequence of np.ndarray
        Further ``[N, C]`` evidence, consulted in turn among the classes tied on everything
        before it (e.g. the votes of every epoch, then the final probabilities). Remaining
        ties go to the lowest class.

    Returns
    -------
    tuple of np.ndarray
        ``(suggested, confidence)``: ``[N]`` int64, never equal to ``given`` (with ``C >= 2``),
        and ``[N]`` float64, ``evidence[i, suggested_i]`` divided by the row's total evidence
        (0 when the row has none).

    Examples
    --------
    >>> ev = np.array([[0.6, 0.2, 0.2], [0.5, 0.5, 0.0]])
    >>> s, c = suggest_labels(np.array([0, 1]), ev, tiebreak=[np.array([[0, .1, .3], [0, 0, 0]])])
    >>> s.tolist(), c.tolist()
    ([2, 0], [0.2, 0.5])
    """
    given = np.asarray(given, dtype=np.int64)
    ev = _check(given, evidence)
    n, c = ev.shape
    if c < 2:
        raise ValueError("suggestions need at least two classes")
    if n and (given.min() < 0 or given.max() >= c):
        raise ValueError(f"given labels must lie in [0, {c})")
    rows = np.arange(n)
    keys = [ev, *(_check(given, t, "tiebreak") for t in tiebreak)]
    candidate = np.ones((n, c), dtype=bool)
    candidate[rows, given] = False
    for key in keys:
        masked = np.where(candidate, key, -np.inf)
        best = masked.max(axis=1, keepdims=True)
        # ties within floating error of the best stay candidates for the next key
        candidate &= masked >= best - 1e-12 * np.maximum(np.abs(best), 1.0)
    suggested = candidate.argmax(axis=1).astype(np.int64)
    total = ev.sum(axis=1)
    confidence = np.divide(ev[rows, suggested], total, out=np.zeros(n), where=total > 0)
    return suggested, confidence


def alternative_share(given: np.ndarray, evidence: np.ndarray) -> np.ndarray:
    """Share of each row's evidence on classes other than the given label (0 without any).

    Examples
    --------
    >>> alternative_share(np.array([0, 1]), np.array([[3.0, 1.0], [0.0, 0.0]])).tolist()
    [0.25, 0.0]
    """
    given = np.asarray(given, dtype=np.int64)
    ev = _check(given, evidence)
    total = ev.sum(axis=1)
    own = ev[np.arange(len(given)), given]
    return np.divide(total - own, total, out=np.zeros(len(given)), where=total > 0)
