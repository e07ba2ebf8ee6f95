"""The calibrated label-issue count: a confident joint built from per-class sums (numpy).

Confident learning (Northcutt et al. 2021, cleanlab's ``find_label_issues``) estimates how many
labels are wrong from predicted probabilities on samples the model has not fitted. Here those
probabilities are the run's own out-of-sample evidence (the early-learning votes of
:mod:`distnoisy.issues.dynamics`, or a method's targets), and every step is a sum over rows, so
a partitioned store computes it part by part and adds ``[C]`` and ``[C, C]`` arrays across ranks:

1. :func:`self_confidence_sums`: per given class ``j``, the sum of ``p_{i,j}`` over the samples
   labelled ``j`` and their number (``[2, C]``);
2. :func:`thresholds_from_sums`: ``t_j`` = their ratio, the mean self-confidence of class ``j``;
3. :func:`joint_counts`: ``C[ỹ, y*]``, samples given ``ỹ`` that are confidently of class ``y*``
   (``p_{i,y*} >= t_{y*}``, the largest such ``p`` if several; ``[C, C]``);
4. :func:`calibrate_joint`: each row rescaled to the number of samples given that label;
5. :func:`noise_from_joint`: per given class, the estimated number and rate of wrong labels.

:func:`estimate_label_noise` runs 1-5 on a table, block by block (``reduce_sum`` adds the
blocks' sums). ``thresholds="agreeing"`` sets the thresholds from the samples whose evidence
agrees with their given label only (:func:`threshold_mask`; cleanlab's is ``"all"``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


def _check(labels: np.ndarray, probs: np.ndarray, num_classes: int | None = None):
    labels = np.asarray(labels, dtype=np.int64)
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or len(probs) != len(labels):
        raise ValueError(
            f"probs must be [N, C] with N = len(labels) = {len(labels)}, got shape {probs.shape}"
        )
    c = probs.shape[1]
    if num_classes is not None and c != num_classes:
        raise ValueError(f"probs has {c} columns, num_classes is {num_classes}")
    if len(labels) and (labels.min() < 0 or labels.max() >= c):
        raise ValueError(f"labels must lie in [0, {c}), got {labels.min()}..{labels.max()}")
    return labels, probs


def _rows(mask: np.ndarray | None, n: int) -> np.ndarray:
    return np.ones(n, bool) if mask is None else np.asarray(mask, dtype=bool)


def self_confidence_sums(
    labels: np.ndarray, probs: np.ndarray, *, mask: np.ndarray | None = None
) -> np.ndarray:
    """Per class ``j``: the sum of ``probs[i, j]`` over rows labelled ``j``, and their count.

    Parameters
    ----------
    labels : np.ndarray
        ``[N]`` given labels in ``0..C-1``.
    probs : np.ndarray
        ``[N, C]`` out-of-sample class probabilities (or vote shares).
    mask : np.ndarray, optional
        ``[N]`` bool, the rows to count (e.g. those trained on). Default: all.

    Returns
    -------
    np.ndarray
        ``[2, C]`` float64: row 0 the sums, row 1 the counts. Sums of blocks add up.

    Examples
    --------
    >>> self_confidence_sums(np.array([0, 0, 1]), np.array([[.8, .2], [.4, .6], [.3, .7]]))
    array([[1.2, 0.7],
           [2. , 1. ]])
    """
    labels, probs = _check(labels, probs)
    keep = _rows(mask, len(labels))
    c = probs.shape[1]
    own = probs[np.arange(len(labels)), labels]
    sums = np.bincount(labels[keep], weights=own[keep], minlength=c)
    counts = np.bincount(labels[keep], minlength=c).astype(np.float64)
    return np.stack([sums, counts])


def thresholds_from_sums(sums: np.ndarray) -> np.ndarray:
    """Per-class thresholds ``t_j = sum_j / count_j`` from :func:`self_confidence_sums`.

    Returns
    -------
    np.ndarray
        ``[C]`` float64; ``inf`` for a class no counted row is labelled with (no row can then be
        confidently assigned to it).
    """
    sums = np.asarray(sums, dtype=np.float64)
    if sums.ndim != 2 or sums.shape[0] != 2:
        raise ValueError(f"sums must be [2, C], got shape {sums.shape}")
    total, count = sums
    return np.where(count > 0, total / np.maximum(count, 1), np.inf)


def joint_counts(
    labels: np.ndarray,
    probs: np.ndarray,
    *,
    thresholds: np.ndarray,
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """The confident joint's counts ``C[ỹ, y*]`` of a block of rows.

    A row is *confidently* of class ``j`` when ``probs[i, j] >= thresholds[j]``; when several
    classes pass, the one with the largest probability is taken (the lowest class on ties); a
    row passing none is not counted.

    Parameters
    ----------
    labels : np.ndarray
        ``[N]`` given labels.
    probs : np.ndarray
        ``[N, C]`` out-of-sample probabilities.
    thresholds : np.ndarray
        ``[C]`` from :func:`thresholds_from_sums` (of the whole table).
    mask : np.ndarray, optional
        ``[N]`` bool, rows to count. Default: all.

    Returns
    -------
    np.ndarray
        ``[C, C]`` int64, rows = given label, columns = confident class. Blocks add up.
    """
    labels, probs = _check(labels, probs)
    c = probs.shape[1]
    thresholds = np.asarray(thresholds, dtype=np.float64)
    if thresholds.shape != (c,):
        raise ValueError(f"thresholds must be [{c}], got shape {thresholds.shape}")
    above = probs >= thresholds[None, :]
    counted = above.any(axis=1) & _rows(mask, len(labels))
    confident = np.where(above, probs, -np.inf).argmax(axis=1)
    joint = np.zeros((c, c), dtype=np.int64)
    np.add.at(joint, (labels[counted], confident[counted]), 1)
    return joint


def calibrate_joint(joint: np.ndarray, label_counts: np.ndarray) -> np.ndarray:
    """Rescale each row of the confident joint to the number of samples given that label.

    Rows that passed no threshold are not in the joint; calibration spreads them over their
    given label's row in the proportions of the counted ones (cleanlab's
    ``calibrate_confident_joint``, without its final normalisation to a distribution). A row of
    zeros (no sample of that label counted) gets all its samples on the diagonal: with no
    evidence, no label of that class is estimated wrong.

    Parameters
    ----------
    joint : np.ndarray
        ``[C, C]`` counts from :func:`joint_counts`.
    label_counts : np.ndarray
        ``[C]`` number of (counted) samples per given label.

    Returns
    -------
    np.ndarray
        ``[C, C]`` float64 whose row ``j`` sums to ``label_counts[j]``.

    Examples
    --------
    >>> calibrate_joint(np.array([[3, 1], [0, 0]]), np.array([8, 5])).tolist()
    [[6.0, 2.0], [0.0, 5.0]]
    """
    joint = np.asarray(joint, dtype=np.float64)
    label_counts = np.asarray(label_counts, dtype=np.float64)
    c = len(label_counts)
    if joint.shape != (c, c):
        raise ValueError(f"joint must be [{c}, {c}], got shape {joint.shape}")
    rows = joint.sum(axis=1, keepdims=True)
    share = np.divide(joint, rows, out=np.eye(c), where=rows > 0)
    return share * label_counts[:, None]


@dataclass(frozen=True)
class NoiseEstimate:
    """The estimated label noise of a training set, per given class and overall."""

    #: ``[C]`` estimated number of wrong labels among the samples given each class (integers
    #: that add up to ``num_issues``).
    num_per_class: np.ndarray
    #: ``[C]`` estimated rate of wrong labels per given class (``nan`` for an empty class).
    rate_per_class: np.ndarray
    #: Estimated number of wrong labels overall.
    num_issues: int
    #: Estimated overall rate: ``num_issues / num_counted``.
    rate: float
    #: ``[C, C]`` calibrated joint.
    joint: np.ndarray


def noise_from_joint(joint: np.ndarray, label_counts: np.ndarray) -> NoiseEstimate:
    """Estimated wrong labels per given class: the calibrated joint's off-diagonal row sums.

    The per-class counts are rounded so that they add up to the rounded total (largest
    remainders first).

    Parameters
    ----------
    joint : np.ndarray
        ``[C, C]`` confident-joint counts (:func:`joint_counts`, summed over blocks).
    label_counts : np.ndarray
        ``[C]`` counted samples per given label.

    Returns
    -------
    NoiseEstimate

    Examples
    --------
    >>> est = noise_from_joint(np.array([[3, 1], [0, 0]]), np.array([8, 5]))
    >>> est.num_per_class.tolist(), est.num_issues, round(est.rate, 4)
    ([2, 0], 2, 0.1538)
    """
    label_counts = np.asarray(label_counts, dtype=np.float64)
    cal = calibrate_joint(joint, label_counts)
    off = cal.sum(axis=1) - np.diag(cal)
    off = np.clip(off, 0.0, label_counts)
    total = round(float(off.sum()))
    floor = np.floor(off + 1e-9)
    extra = total - int(floor.sum())
    order = np.lexsort((np.arange(len(off)), -(off - floor)))
    num = floor.astype(np.int64)
    if extra > 0:
        num[order[:extra]] += 1
    elif extra < 0:  # floating error only: take from the smallest remainders
        num[order[::-1][:-extra]] -= 1
    num = np.minimum(num, label_counts.astype(np.int64))
    rates = np.divide(off, label_counts, out=np.full(len(off), np.nan), where=label_counts > 0)
    n = float(label_counts.sum())
    return NoiseEstimate(num, rates, int(num.sum()), float(num.sum() / n) if n else 0.0, cal)


#: Which samples set the per-class thresholds (:func:`threshold_mask`).
THRESHOLDS = ("all", "agreeing")


def threshold_mask(
    labels: np.ndarray,
    probs: np.ndarray,
    *,
    thresholds: str = "all",
    mask: np.ndarray | None = None,
) -> np.ndarray:
    """The rows whose self-confidence sets the per-class thresholds.

    ``"all"`` (the default): every (masked) row, cleanlab's choice: ``t_j`` is the mean
    ``p_{i,j}`` over the samples labelled ``j``. ``"agreeing"``: only the rows whose evidence
    names their given label (``argmax_k p_{i,k} = ỹ_i``). Under heavy noise the mislabelled
    samples (``p_{i,j}`` near 0) drag the mean of ``"all"`` down to about ``(1 - ρ)`` times the
    typical confidence; with coarse evidence (the share of epochs that predicted each class)
    a weak model's consistent errors on clean samples then pass it, and ``"agreeing"`` counts
    closer to the truth (``docs/methods.md#flags``). With evidence as sharp for the mislabelled
    samples' true class as for the clean ones' it is the other way round.

    Returns
    -------
    np.ndarray
        ``[N]`` bool.
    """
    labels, probs = _check(labels, probs)
    keep = _rows(mask, len(labels))
    if thresholds == "all":
        return keep
    if thresholds != "agreeing":
        raise ValueError(f"thresholds must be one of {THRESHOLDS}, got {thresholds!r}")
    return keep & (probs.argmax(axis=1) == labels) & (probs.sum(axis=1) > 0)


def estimate_label_noise(
    labels: np.ndarray,
    probs: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    thresholds: str = "all",
    reduce_sum: Callable[[np.ndarray], np.ndarray] | None = None,
) -> NoiseEstimate:
    """The calibrated confident-joint noise estimate (steps 1-5) of a table, block by block.

    Parameters
    ----------
    labels : np.ndarray
        ``[N]`` given labels of this block of rows.
    probs : np.ndarray
        ``[N, C]`` out-of-sample probabilities or vote shares of the same rows.
    mask : np.ndarray, optional
        ``[N]`` bool, the rows to use (e.g. those trained on). Default: all.
    thresholds : {"all", "agreeing"}
        Which rows set the per-class thresholds (:func:`threshold_mask`); ``"all"``: cleanlab's.
    reduce_sum : callable, optional
        Sums an array over every block of the table (e.g. an all-reduce across the ranks of a
        partitioned store); called three times, on ``[2, C]``, ``[C]`` and ``[C, C]`` arrays, in
        the same order on every block. Default: this block is the whole table.

    Returns
    -------
    NoiseEstimate
        The same on every block.
    """
    reduce = reduce_sum if reduce_sum is not None else (lambda x: x)
    labels, probs = _check(labels, probs)
    keep = _rows(mask, len(labels))
    c = probs.shape[1]
    sums = reduce(
        self_confidence_sums(
            labels, probs, mask=threshold_mask(labels, probs, thresholds=thresholds, mask=keep)
        )
    )
    counts = reduce(np.bincount(labels[keep], minlength=c).astype(np.float64))
    joint = reduce(
        joint_counts(labels, probs, thresholds=thresholds_from_sums(sums), mask=keep).astype(
            np.float64
        )
    )
    return noise_from_joint(np.rint(joint).astype(np.int64), counts)
