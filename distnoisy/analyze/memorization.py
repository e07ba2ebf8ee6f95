"""Per-sample memorisation from a run's training-prediction history (pure numpy).

``pred_hist[i, e]`` is the prediction of the training forward pass on sample ``i`` in epoch
``e`` (-1 = not visited that epoch). For a corrupted sample (given label ``ỹ_i`` differs from
its clean label ``y_i``), docs/analysis.md#memorisation defines:

- **first memorised epoch**: the first epoch ``e`` with ``pred_hist[i, e] == ỹ_i``; -1 when it
  never happens (and for clean samples);
- **stays memorised**: from that epoch on, every visited epoch predicts ``ỹ_i``;
- **memorised at the end**: the final model predicts ``ỹ_i`` (``final_pred``, the run's own
  ``memorized`` figure).
"""

from __future__ import annotations

import numpy as np

from distnoisy.core.errors import DataError


def _check(pred_hist: np.ndarray, given: np.ndarray, clean: np.ndarray) -> None:
    if pred_hist.ndim != 2 or pred_hist.shape[0] != len(given) or len(given) != len(clean):
        raise DataError(
            f"prediction history of shape {pred_hist.shape} does not match {len(given)} given and "
            f"{len(clean)} clean labels"
        )


def first_memorized_epoch(
    pred_hist: np.ndarray, given: np.ndarray, clean: np.ndarray
) -> np.ndarray:
    """First 0-based epoch at which each corrupted sample was predicted as its given label.

    Returns
    -------
    numpy.ndarray
        ``(N,)`` int64; -1 for clean samples and corrupted ones never predicted so.
    """
    pred_hist = np.asarray(pred_hist)
    given, clean = np.asarray(given), np.asarray(clean)
    _check(pred_hist, given, clean)
    corrupted = given != clean
    hit = (pred_hist == given[:, None]) & corrupted[:, None]
    return np.where(hit.any(axis=1), hit.argmax(axis=1), -1).astype(np.int64)


def stays_memorized(pred_hist: np.ndarray, given: np.ndarray, first: np.ndarray) -> np.ndarray:
    """Whether each sample, once memorised (``first >= 0``), is predicted as its given label in
    every later visited epoch.

    Returns
    -------
    numpy.ndarray
        ``(N,)`` bool; False where ``first == -1``.
    """
    pred_hist = np.asarray(pred_hist)
    epochs = np.arange(pred_hist.shape[1])[None, :]
    after = epochs >= np.asarray(first)[:, None]
    visited = pred_hist >= 0
    broken = after & visited & (pred_hist != np.asarray(given)[:, None])
    return (np.asarray(first) >= 0) & ~broken.any(axis=1)
