"""Label issues from a finished run: ranking, flags and their quality (numpy in, numpy out).

Every method gives each training sample a *label-issue score* (higher = more likely mislabelled,
see ``docs/methods.md#label-issue-scores``). The functions here turn scores and the run's own
predicted probabilities into what a user acts on:

- :func:`rank_by_score`: the review order (highest score first, ties by sample index);
- :func:`estimate_noise_rate`: the fraction of mislabelled samples, from the two clusters that
  the scores form (a two-component Gaussian mixture);
- :func:`is_label_issue`: a yes/no flag per sample, a number of top-ranked samples (a run's
  outputs use the calibrated count of :mod:`distnoisy.issues.find`);
- :func:`estimate_num_label_issues`: the cleanlab-style count from the confident joint
  (:func:`confident_joint`) of given labels and predicted probabilities, for predictions on
  held-out samples;
- :func:`precision_at_k` and :func:`auroc`: how well a ranking finds the known corrupted samples.

All functions are pure: they do not modify their inputs and use no global state.
"""

from __future__ import annotations

import numpy as np


def rank_by_score(score: np.ndarray, last: np.ndarray | None = None) -> np.ndarray:
    """Sample positions ordered from the most to the least likely label issue.

    Parameters
    ----------
    score : np.ndarray
        ``[N]`` label-issue scores, higher = more likely mislabelled.
    last : np.ndarray, optional
        ``[N]`` bool, samples ranked after all others whatever their score (those never trained
        on: their score carries no training signal, e.g. ELR's target is still all zeros).

    Returns
    -------
    np.ndarray
        ``[N]`` int64 positions: by decreasing score, ties broken by increasing position, NaN
        scores last; the ``last`` samples after everything else, in the same order.

    Examples
    --------
    >>> rank_by_score(np.array([0.2, 0.9, 0.2, 0.5])).tolist()
    [1, 3, 0, 2]
    >>> rank_by_score(np.array([0.2, 0.9, 0.2, 0.5]), last=np.array([0, 1, 0, 0], bool)).tolist()
    [3, 0, 2, 1]
    """
    score = np.asarray(score, dtype=np.float64)
    tail = np.zeros(len(score), bool) if last is None else np.asarray(last, dtype=bool)
    # lexsort sorts by the last key first; NaN compares as largest, so -score puts NaN last.
    return np.lexsort((np.arange(len(score)), -score, tail)).astype(np.int64)


def precision_at_k(score: np.ndarray, is_issue: np.ndarray, k: int | None = None) -> float:
    """Fraction of true label issues among the ``k`` highest-scored samples.

    Parameters
    ----------
    score : np.ndarray
        ``[N]`` label-issue scores, higher = more likely mislabelled.
    is_issue : np.ndarray
        ``[N]`` bool, the samples whose given label is known to be wrong.
    k : int, optional
        How many top-ranked samples to inspect; defaults to the number of true issues, at which
        precision equals recall.

    Returns
    -------
    float
        In ``[0, 1]``; ties at the cut are resolved by :func:`rank_by_score`.
    """
    is_issue = np.asarray(is_issue, dtype=bool)
    if len(is_issue) != len(score):
        raise ValueError(f"score has {len(score)} entries, is_issue {len(is_issue)}")
    k = int(is_issue.sum()) if k is None else int(k)
    if not 0 < k <= len(is_issue):
        raise ValueError(f"k must be in [1, {len(is_issue)}], got {k}")
    return float(is_issue[rank_by_score(score)[:k]].mean())


def auroc(score: np.ndarray, positive: np.ndarray) -> float:
    """Area under the ROC curve of ``score`` for the boolean labels ``positive``.

    Computed as the Mann-Whitney U statistic with average ranks for ties, i.e. the probability
    that a random positive scores above a random negative (ties count one half).

    Parameters
    ----------
    score : np.ndarray
        ``[N]`` scores, higher = more likely positive.
    positive : np.ndarray
        ``[N]`` bool labels; both classes must occur.

    Returns
    -------
    float
        In ``[0, 1]``; 0.5 is a random ranking.
    """
    score = np.asarray(score, dtype=np.float64)
    positive = np.asarray(positive, dtype=bool)
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("AUROC needs at least one positive and one negative sample")
    order = np.argsort(score, kind="mergesort")
    sorted_scores = score[order]
    ranks = np.empty(len(score), dtype=np.float64)
    # Average 1-based rank over each run of tied scores.
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(score)]])
    for s, e in zip(starts, ends, strict=True):
        ranks[order[s:e]] = (s + 1 + e) / 2.0
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def _check_labels_probs(labels: np.ndarray, pred_probs: np.ndarray) -> tuple[np.ndarray, ...]:
    labels = np.asarray(labels, dtype=np.int64)
    pred_probs = np.asarray(pred_probs, dtype=np.float64)
    if pred_probs.ndim != 2 or len(pred_probs) != len(labels):
        raise ValueError(
            f"pred_probs must be [N, C] with N = len(labels) = {len(labels)}, "
            f"got shape {pred_probs.shape}"
        )
    if len(labels) and (labels.min() < 0 or labels.max() >= pred_probs.shape[1]):
        raise ValueError(f"labels must lie in [0, {pred_probs.shape[1]}), got {labels.min()}..")
    return labels, pred_probs


def per_class_thresholds(labels: np.ndarray, pred_probs: np.ndarray) -> np.ndarray:
    """Mean self-confidence per class: ``t_j = mean_{i: ỹ_i = j} p_{i,j}``.

    Parameters
    ----------
    labels : np.ndarray
        ``[N]`` given (possibly noisy) labels in ``0..C-1``.
    pred_probs : np.ndarray
        ``[N, C]`` predicted class probabilities.

    Returns
    -------
    np.ndarray
        ``[C]`` float64 thresholds; ``inf`` for a class that no sample is labelled with (no
        sample can then be confidently assigned to it).
    """
    labels, pred_probs = _check_labels_probs(labels, pred_probs)
    c = pred_probs.shape[1]
    counts = np.bincount(labels, minlength=c)
    sums = np.bincount(labels, weights=pred_probs[np.arange(len(labels)), labels], minlength=c)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(counts > 0, sums / np.maximum(counts, 1), np.inf)


def confident_joint(labels: np.ndarray, pred_probs: np.ndarray) -> np.ndarray:
    """Counts ``C[ỹ, y*]`` of samples given label ``ỹ`` that are confidently of class ``y*``.

    A sample is *confidently* of class ``j`` when ``p_{i,j} >= t_j``
    (:func:`per_class_thresholds`). When several classes pass, the one with the largest
    probability is taken; a sample passing none is not counted.

    Parameters
    ----------
    labels : np.ndarray
        ``[N]`` given labels.
    pred_probs : np.ndarray
        ``[N, C]`` predicted class probabilities.

    Returns
    -------
    np.ndarray
        ``[C, C]`` int64 matrix, rows = given label, columns = confident class.
    """
    labels, pred_probs = _check_labels_probs(labels, pred_probs)
    c = pred_probs.shape[1]
    above = pred_probs >= per_class_thresholds(labels, pred_probs)[None, :]
    counted = above.any(axis=1)
    confident = np.where(above, pred_probs, -np.inf).argmax(axis=1)
    joint = np.zeros((c, c), dtype=np.int64)
    np.add.at(joint, (labels[counted], confident[counted]), 1)
    return joint


def estimate_num_label_issues(labels: np.ndarray, pred_probs: np.ndarray) -> int:
    """Estimated number of mislabelled samples: the off-diagonal sum of the confident joint.

    The samples counted off the diagonal are those whose prediction confidently names another
    class than the given one, with "confidently" relative to how sure the model typically is
    about that class (its mean self-confidence), so that hard classes are not over-flagged.

    Parameters
    ----------
    labels : np.ndarray
        ``[N]`` given labels.
    pred_probs : np.ndarray
        ``[N, C]`` predicted class probabilities.

    Returns
    -------
    int
        In ``[0, N]``.
    """
    joint = confident_joint(labels, pred_probs)
    return int(joint.sum() - np.trace(joint))


def estimate_noise_rate(score: np.ndarray, max_iter: int = 500, tol: float = 1e-10) -> float:
    """Estimated fraction of mislabelled samples: the weight of the high-score component of a
    two-component 1-D Gaussian mixture fitted to the label-issue scores.

    A method's label-issue score (e.g. the mean training loss on the given label over epochs,
    or ``1 -`` the ELR target's mass on it) is low for clean samples, which the network fits
    early, and high for mislabelled ones, which it fits late or never. The scores then form two
    clusters; the mixture's weight on the upper one estimates the noise rate. The fit is plain
    EM, started from the scores' quartiles with equal weights and variances, so it is
    deterministic.

    Parameters
    ----------
    score : np.ndarray
        ``[N]`` finite label-issue scores, higher = more likely mislabelled.
    max_iter : int
        Upper bound on EM iterations.
    tol : float
        Stop when the log-likelihood per sample improves by less than this.

    Returns
    -------
    float
        In ``[0, 1]``; 0 when all scores are equal (nothing separates two groups).
    """
    x = np.asarray(score, dtype=np.float64)
    if len(x) < 2 or not np.isfinite(x).all():
        raise ValueError("estimate_noise_rate needs at least two finite scores")
    if np.ptp(x) == 0:
        return 0.0
    # Variances are floored so that a component collapsing onto tied scores stays finite.
    floor = 1e-6 * x.var()
    mu = np.quantile(x, [0.25, 0.75])
    if mu[0] == mu[1]:
        mu = np.array([x.min(), x.max()])
    var = np.full(2, x.var())
    weight = np.array([0.5, 0.5])
    last = -np.inf
    for _ in range(max_iter):
        log_p = -0.5 * ((x[:, None] - mu) ** 2 / var + np.log(2 * np.pi * var)) + np.log(weight)
        top = log_p.max(axis=1, keepdims=True)
        log_lik = float((top[:, 0] + np.log(np.exp(log_p - top).sum(axis=1))).mean())
        resp = np.exp(log_p - top)
        resp /= resp.sum(axis=1, keepdims=True)
        n_k = np.maximum(resp.sum(axis=0), 1e-12)
        weight = n_k / len(x)
        mu = (resp * x[:, None]).sum(axis=0) / n_k
        var = np.maximum((resp * (x[:, None] - mu) ** 2).sum(axis=0) / n_k, floor)
        if log_lik - last < tol:
            break
        last = log_lik
    return float(weight[np.argmax(mu)])


def is_label_issue(
    score: np.ndarray,
    eligible: np.ndarray | None = None,
    num_issues: int | None = None,
) -> np.ndarray:
    """Yes/no label-issue flag per sample: the top of the ranking, cut at the estimated count.

    The ``num_issues`` eligible samples ranked first by :func:`rank_by_score` are flagged, so
    the flags agree with the ranking (no flagged sample scores below an unflagged eligible one;
    ties are broken by index). By default ``num_issues = round(ρ̂ · n)`` with ``n`` eligible
    samples and ``ρ̂ = estimate_noise_rate`` of their finite scores (0 with fewer than two).

    A run's outputs pass the calibrated count of :func:`distnoisy.issues.find.find_label_issues`
    (a confident joint on the run's early-learning probabilities, ``docs/methods.md#flags``)
    as ``num_issues``; the mixture default over-counts where the scores have a long upper tail
    (1.2x the corrupted samples for CE on digits, 1.3x on Fashion-MNIST). The confident joint
    of :func:`estimate_num_label_issues` needs predictions on samples the model did not train
    on: a run's own final predictions follow the given labels once the network has memorised
    them, and it then finds (almost) no issues.

    Parameters
    ----------
    score : np.ndarray
        ``[N]`` label-issue scores, higher = more likely mislabelled.
    eligible : np.ndarray, optional
        ``[N]`` bool, samples that may be flagged (e.g. those trained on at least once; a
        never-trained sample's score carries no signal). Default: all.
    num_issues : int, optional
        How many samples to flag; default: estimated as above.

    Returns
    -------
    np.ndarray
        ``[N]`` bool flags.
    """
    score = np.asarray(score, dtype=np.float64)
    eligible = np.ones(len(score), bool) if eligible is None else np.asarray(eligible, bool)
    if eligible.shape != score.shape:
        raise ValueError(f"eligible has shape {eligible.shape}, score {score.shape}")
    flags = np.zeros(len(score), dtype=bool)
    positions = np.flatnonzero(eligible)
    if len(positions) == 0:
        return flags
    if num_issues is None:
        # Non-finite scores (a diverged sample) are ranked (NaN last) but not fitted.
        finite = score[positions][np.isfinite(score[positions])]
        rate = estimate_noise_rate(finite) if len(finite) >= 2 else 0.0
        num_issues = round(rate * len(positions))
    if not 0 <= num_issues <= len(positions):
        raise ValueError(f"num_issues must be in [0, {len(positions)}], got {num_issues}")
    flags[positions[rank_by_score(score[positions])[:num_issues]]] = True
    return flags


def flag_cut(
    score: np.ndarray,
    eligible: np.ndarray | None = None,
    num_issues: int | None = None,
    fit_at_most: int | None = None,
) -> tuple[float, int] | None:
    """Where :func:`is_label_issue` cuts the ranking: ``(score, position)`` of the last sample
    it flags, or None when it flags none.

    With the cut, each partition of a partitioned dataset flags its own rows
    (:func:`flags_from_cut`) exactly as :func:`is_label_issue` flags the whole table; only the
    score column (8 bytes per sample) is needed in one place.

    ``fit_at_most``: estimate the noise rate from at most this many scores, evenly spaced
    quantiles of the eligible finite scores (the mixture fit is iterative, 500 passes at most;
    on 10M scores it takes many minutes, on a 1M-quantile sketch of them seconds). None: all.
    """
    score = np.asarray(score, dtype=np.float64)
    if num_issues is None and fit_at_most is not None:
        mask = np.ones(len(score), bool) if eligible is None else np.asarray(eligible, bool)
        finite = np.sort(score[mask & np.isfinite(score)])
        if len(finite) > fit_at_most:
            finite = finite[np.linspace(0, len(finite) - 1, fit_at_most).round().astype(np.int64)]
        rate = estimate_noise_rate(finite) if len(finite) >= 2 else 0.0
        num_issues = round(rate * int(mask.sum()))
    flags = is_label_issue(score, eligible, num_issues)
    positions = np.flatnonzero(flags)
    if len(positions) == 0:
        return None
    last = positions[rank_by_score(score[positions])[-1]]
    return float(score[last]), int(last)


def flags_from_cut(
    score: np.ndarray,
    index: np.ndarray,
    eligible: np.ndarray | None,
    cut: tuple[float, int] | None,
) -> np.ndarray:
    """Flags of some rows (global positions ``index``): eligible and ranked no later than
    ``cut`` (from :func:`flag_cut`: higher score, or the same score and a smaller index; NaN
    ranks last)."""
    score = np.asarray(score, dtype=np.float64)
    index = np.asarray(index, dtype=np.int64)
    eligible = np.ones(len(score), bool) if eligible is None else np.asarray(eligible, bool)
    if cut is None:
        return np.zeros(len(score), dtype=bool)
    cut_score, cut_index = cut
    nan = np.isnan(score)
    if np.isnan(cut_score):
        before = ~nan | (index <= cut_index)
    else:
        before = ~nan & ((score > cut_score) | ((score == cut_score) & (index <= cut_index)))
    return eligible & before
