"""Per-sample training dynamics from the store's histories, one call each (numpy in, numpy out).

Every run keeps, per sample and epoch, the training loss on the given label (``loss_hist``, NaN
where the sample was not visited), the training prediction (``pred_hist``, -1 where not
visited) and the margin (``margin_hist``: logit of the given label minus the largest other
logit, NaN where not visited). The functions here turn a block of those rows (a whole run's, or
one partition's of :func:`distnoisy.store.export.iter_sample_stats`) into the aggregates that
later phases rank samples by (definitions in ``docs/methods.md#training-dynamics``):

- :func:`first_memorized_epoch`: the first epoch from which the prediction equals the given
  label at every later visit;
- :func:`forgetting_events`: how often a sample goes from predicted right to wrong between two
  consecutive visits;
- :func:`area_under_margin`: the mean margin over the visited epochs;
- :func:`mean_loss`: the mean training loss over the visited epochs.

All are row-wise, so a partitioned export is processed partition by partition.
"""

from __future__ import annotations

import numpy as np


def _correct(pred_hist: np.ndarray, given: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(visited, correct)``: ``[n, E]`` bool each (correct is False where not visited)."""
    pred = np.asarray(pred_hist)
    if pred.ndim != 2 or len(pred) != len(given):
        raise ValueError(f"pred_hist must be [n, epochs] with n = {len(given)}, got {pred.shape}")
    visited = pred >= 0
    correct = visited & (pred == np.asarray(given, dtype=np.int64)[:, None])
    return visited, correct


def first_memorized_epoch(pred_hist: np.ndarray, given: np.ndarray) -> np.ndarray:
    """First epoch from which every visit predicts the given label; -1 if none.

    Parameters
    ----------
    pred_hist : np.ndarray
        ``[n, E]`` training predictions per epoch, -1 where the sample was not visited.
    given : np.ndarray
        ``[n]`` given labels.

    Returns
    -------
    np.ndarray
        ``[n]`` int64: the epoch of the first visit of the final run of correct visits (the
        last visit must be correct); -1 when the last visit is wrong or there is none.

    Examples
    --------
    >>> first_memorized_epoch(np.array([[0, 1, -1, 1], [1, 1, 0, -1]]), np.array([1, 1])).tolist()
    [1, -1]
    """
    visited, correct = _correct(pred_hist, given)
    e = visited.shape[1]
    # The last wrong visit, then the first visit after it.
    wrong = visited & ~correct
    last_wrong = np.where(wrong.any(1), e - 1 - np.argmax(wrong[:, ::-1], axis=1), -1)
    after = visited & (np.arange(e)[None, :] > last_wrong[:, None])
    first_after = np.where(after.any(1), np.argmax(after, axis=1), -1)
    return first_after.astype(np.int64)


def forgetting_events(pred_hist: np.ndarray, given: np.ndarray) -> np.ndarray:
    """Number of right-to-wrong transitions between consecutive visits.

    Parameters
    ----------
    pred_hist : np.ndarray
        ``[n, E]`` training predictions per epoch, -1 where not visited (skipped).
    given : np.ndarray
        ``[n]`` given labels.

    Returns
    -------
    np.ndarray
        ``[n]`` int64 counts.

    Examples
    --------
    >>> forgetting_events(np.array([[1, 0, -1, 1, 2]]), np.array([1])).tolist()
    [2]
    """
    visited, correct = _correct(pred_hist, given)
    events = np.zeros(len(visited), dtype=np.int64)
    last = np.full(len(visited), -1, dtype=np.int64)  # -1 none, 0 wrong, 1 right
    for col in range(visited.shape[1]):
        now = np.where(visited[:, col], correct[:, col].astype(np.int64), -1)
        events += (last == 1) & (now == 0)
        last = np.where(now >= 0, now, last)
    return events


def _visited_mean(hist: np.ndarray) -> np.ndarray:
    h = np.asarray(hist, dtype=np.float64)
    seen = np.isfinite(h)
    count = seen.sum(axis=1)
    total = np.where(seen, h, 0.0).sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, total / np.maximum(count, 1), np.nan)


def area_under_margin(margin_hist: np.ndarray) -> np.ndarray:
    """Mean margin (given-label logit minus the largest other logit) over visited epochs.

    Parameters
    ----------
    margin_hist : np.ndarray
        ``[n, E]`` margins, NaN where not visited.

    Returns
    -------
    np.ndarray
        ``[n]`` float64, NaN for a sample never visited; low (negative) = likely mislabelled.
    """
    return _visited_mean(margin_hist)


def mean_loss(loss_hist: np.ndarray) -> np.ndarray:
    """Mean training loss on the given label over visited epochs (NaN if never visited)."""
    return _visited_mean(loss_hist)
