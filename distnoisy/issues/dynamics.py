"""Out-of-sample evidence from the training dynamics a run already records (numpy in and out).

A network fits the clean labels first and the wrong ones later (the *early-learning* phase,
Liu et al. 2020; Arpit et al. 2017). Its training predictions during that phase are therefore
close to predictions on samples it has not fitted: the evidence that the label-issue count and
the suggested labels are built on (``docs/methods.md#suggested-labels`` and
``docs/methods.md#flags``). The store keeps every sample's training prediction per epoch
(``pred_hist``, -1 where the sample was not visited), so this works on any finished run.

- :func:`switch_counts`: per epoch, how many samples that the network had mostly predicted as
  another class are now predicted as their given label (sums: a partitioned store adds its
  parts' counts);
- :func:`early_learning_end`: where the early-learning phase ends, from those sums;
- :func:`prediction_votes`: each sample's share of visited epochs (in a window) that predicted
  each class;
- :func:`early_probabilities`: each sample's training probabilities averaged over the visited
  epochs of a window, from the loss, prediction and margin histories (the evidence the
  label-issue count is built on).

All functions are row-wise or return sums, so they run on a whole table or on one part of a
partitioned one; none modifies its inputs.
"""

from __future__ import annotations

import numpy as np


def _check_hist(pred_hist: np.ndarray, n: int | None = None) -> np.ndarray:
    pred = np.asarray(pred_hist)
    if pred.ndim != 2 or (n is not None and len(pred) != n):
        want = "[n, epochs]" if n is None else f"[{n}, epochs]"
        raise ValueError(f"pred_hist must be {want}, got shape {pred.shape}")
    return pred.astype(np.int64, copy=False)


def switch_counts(pred_hist: np.ndarray, given: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per epoch: samples the network had mostly predicted as another class so far, and how
    many of them it predicts as their given label in that epoch.

    A sample is *suspect* at epoch ``e`` when fewer than half of its visits before ``e``
    predicted its given label. While the network learns the clean signal, few suspects switch
    to their given label (those that do are clean samples it learns late); once it starts
    fitting wrong labels, the share of suspects that switch climbs steadily
    (:func:`early_learning_end`).

    Parameters
    ----------
    pred_hist : np.ndarray
        ``[n, E]`` training predictions, -1 where a sample was not visited that epoch.
    given : np.ndarray
        ``[n]`` given labels.

    Returns
    -------
    tuple of np.ndarray
        ``(switched, suspects)``, each ``[E]`` int64: suspects visited at epoch ``e`` and,
        of those, the ones predicted as their given label (both 0 at epoch 0, which has no
        earlier visit). Sums over rows: the counts of several blocks of rows (the parts of a
        partitioned store) add up to those of the whole table.

    Examples
    --------
    >>> sw, su = switch_counts(np.array([[0, 1, 1, 1], [0, 0, -1, 1]]), np.array([1, 1]))
    >>> sw.tolist(), su.tolist()
    ([0, 1, 0, 1], [0, 2, 0, 1])
    """
    given = np.asarray(given, dtype=np.int64)
    pred = _check_hist(pred_hist, len(given))
    visited = pred >= 0
    hit = visited & (pred == given[:, None])
    # visits and hits strictly before each epoch
    before_v = np.cumsum(visited, axis=1) - visited
    before_h = np.cumsum(hit, axis=1) - hit
    suspect = (before_v > 0) & (2 * before_h < before_v) & visited
    return (
        (suspect & hit).sum(axis=0).astype(np.int64),
        suspect.sum(axis=0).astype(np.int64),
    )


def early_learning_end(
    switched: np.ndarray,
    suspects: np.ndarray,
    *,
    rise: float = 0.05,
    min_epochs: int = 2,
) -> int:
    """The number of epochs of the early-learning phase, from :func:`switch_counts`.

    The share ``s_e = switched_e / suspects_e`` of suspects predicted as their given label falls
    while the network learns (the first epochs' suspects are mostly clean samples not yet
    learnt), stays low while it fits the clean signal, and climbs once it memorises wrong
    labels (to 1 for CE). The phase ends at the first epoch whose share exceeds the lowest
    share of the epochs before it by more than ``rise``.

    Parameters
    ----------
    switched, suspects : np.ndarray
        ``[E]`` sums from :func:`switch_counts` (of the whole training set).
    rise : float
        How far above its running minimum the share must climb to count as memorisation
        (0.05 = 5 points: the share moves by 2-4 points from epoch to epoch while the network
        still learns, ``docs/methods.md#flags``).
    min_epochs : int
        The phase lasts at least this many epochs.

    Returns
    -------
    int
        ``W`` in ``[min(min_epochs, E), E]``: epochs ``0 .. W-1`` are the early-learning phase;
        ``E`` (every epoch) when the share never climbs, as for methods that do not memorise
        (ELR, LIMIT, ...).

    Examples
    --------
    >>> su = np.array([0, 100, 100, 100, 100, 100, 100, 100])
    >>> early_learning_end(np.array([0, 40, 10, 6, 8, 9, 20, 50]), su)
    6
    >>> early_learning_end(np.array([0, 40, 10, 6, 8, 9, 7, 9]), su)
    8
    """
    switched = np.asarray(switched, dtype=np.float64)
    suspects = np.asarray(suspects, dtype=np.float64)
    if switched.shape != suspects.shape or switched.ndim != 1:
        raise ValueError(
            f"switched and suspects must be [E] each, got {switched.shape}, {suspects.shape}"
        )
    if not 0 < rise < 1:
        raise ValueError(f"rise must be in (0, 1), got {rise}")
    epochs = len(switched)
    lowest = np.inf
    for e in range(epochs):
        if suspects[e] <= 0:
            continue
        share = switched[e] / suspects[e]
        if e >= min_epochs and share > lowest + rise:
            return e
        lowest = min(lowest, share)
    return epochs


def prediction_votes(
    pred_hist: np.ndarray, *, num_classes: int, epochs: int | None = None
) -> np.ndarray:
    """Each sample's share of visited epochs that predicted each class.

    Parameters
    ----------
    pred_hist : np.ndarray
        ``[n, E]`` training predictions, -1 where not visited.
    num_classes : int
        ``C``.
    epochs : int, optional
        Count only the first ``epochs`` epochs (e.g. the early-learning phase,
        :func:`early_learning_end`). Default: all.

    Returns
    -------
    np.ndarray
        ``[n, C]`` float64; rows sum to 1, or are all 0 for a sample never visited in the
        window.

    Examples
    --------
    >>> prediction_votes(np.array([[2, 2, 0, -1]]), num_classes=3).tolist()
    [[0.3333333333333333, 0.0, 0.6666666666666666]]
    """
    pred = _check_hist(pred_hist)
    if epochs is not None:
        pred = pred[:, : max(int(epochs), 0)]
    n = len(pred)
    if len(pred) and pred.max(initial=-1) >= num_classes:
        raise ValueError(f"pred_hist holds a class >= num_classes = {num_classes}")
    counts = np.zeros((n, num_classes), dtype=np.float64)
    rows, cols = np.nonzero(pred >= 0)
    np.add.at(counts, (rows, pred[rows, cols]), 1.0)
    total = counts.sum(axis=1, keepdims=True)
    return np.divide(counts, total, out=np.zeros_like(counts), where=total > 0)


def early_probabilities(
    pred_hist: np.ndarray,
    loss_hist: np.ndarray,
    margin_hist: np.ndarray,
    given: np.ndarray,
    *,
    num_classes: int,
    epochs: int | None = None,
) -> np.ndarray:
    """Each sample's training probabilities, averaged over visited epochs (in a window), as far
    as the store's histories determine them.

    Per epoch the store keeps the cross-entropy on the given label (``loss_hist``: so
    ``p_given = exp(-loss)``), the prediction and the margin (the given label's logit minus the
    largest other logit). When the prediction is another class ``k``, the largest other logit
    is ``k``'s, so ``p_k = p_given * exp(-margin)``. Those two entries of the softmax are exact;
    when the prediction is the given label, the runner-up is unknown and gets nothing (rows then
    sum to less than 1).

    Parameters
    ----------
    pred_hist : np.ndarray
        ``[n, E]`` training predictions, -1 where not visited.
    loss_hist, margin_hist : np.ndarray
        ``[n, E]`` training cross-entropy on the given label and margin (NaN where not visited).
    given : np.ndarray
        ``[n]`` given labels.
    num_classes : int
        ``C``.
    epochs : int, optional
        Average only the first ``epochs`` epochs (the early-learning phase,
        :func:`early_learning_end`). Default: all.

    Returns
    -------
    np.ndarray
        ``[n, C]`` float64; all 0 for a sample not visited in the window.

    Examples
    --------
    Epoch 0 predicts class 1 with ``p_0 = 0.4`` and margin ``log(0.4 / 0.6)``, so ``p_1 = 0.6``;
    epoch 1 predicts the given class 0 with ``p_0 = 0.8``:

    >>> p = early_probabilities(np.array([[1, 0]]), -np.log(np.array([[0.4, 0.8]])),
    ...                         np.log(np.array([[0.4 / 0.6, 4.0]])), np.array([0]), num_classes=2)
    >>> p.round(4).tolist()
    [[0.6, 0.3]]
    """
    given = np.asarray(given, dtype=np.int64)
    pred = _check_hist(pred_hist, len(given))
    loss = np.asarray(loss_hist, dtype=np.float64)
    margin = np.asarray(margin_hist, dtype=np.float64)
    if loss.shape != pred.shape or margin.shape != pred.shape:
        raise ValueError(
            f"pred_hist, loss_hist and margin_hist must have one shape, got {pred.shape}, "
            f"{loss.shape}, {margin.shape}"
        )
    if epochs is not None:
        keep = max(int(epochs), 0)
        pred, loss, margin = pred[:, :keep], loss[:, :keep], margin[:, :keep]
    if len(pred) and pred.max(initial=-1) >= num_classes:
        raise ValueError(f"pred_hist holds a class >= num_classes = {num_classes}")
    n = len(pred)
    visited = (pred >= 0) & np.isfinite(loss)
    p_given = np.where(visited, np.exp(-np.where(visited, loss, 0.0)), 0.0)
    other = visited & (pred != given[:, None]) & np.isfinite(margin)
    p_other = np.where(other, p_given * np.exp(-np.where(other, margin, 0.0)), 0.0)
    total = np.zeros((n, num_classes), dtype=np.float64)
    total[np.arange(n), given] = p_given.sum(axis=1)
    rows, cols = np.nonzero(other)
    np.add.at(total, (rows, pred[rows, cols]), p_other[rows, cols])
    count = visited.sum(axis=1, keepdims=True)
    return np.divide(total, count, out=np.zeros_like(total), where=count > 0)
