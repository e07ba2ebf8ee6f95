"""Label issues of a finished run from what its store recorded: flags, count and suggestions.

The peer users know is cleanlab's ``find_label_issues(labels, pred_probs)``, which needs
out-of-sample probabilities (a model trained ``k`` times, cross-validated). A distnoisy run
already holds the out-of-sample evidence in its per-sample store (``docs/methods.md#flags``,
``docs/methods.md#suggested-labels``):

- the **early-learning probabilities**: each sample's training probabilities (from
  ``loss_hist``, ``pred_hist`` and ``margin_hist``) averaged over the epochs before the network
  starts fitting wrong labels (:mod:`distnoisy.issues.dynamics`), what the count is built on;
- the **votes** of every epoch (``pred_hist``): what loss-only methods' suggestions come from;
- the **method's own per-sample state** where it has one: ELR's target, the mean of ELR+'s two
  targets, LIMIT's q-network probabilities (``elr_target``, ``elr_target_net1``/``_net2``,
  ``limit_q_prob``).

:func:`run_evidence` picks them from a block of store columns; :func:`early_window` finds the
early-learning phase; :func:`find_label_issues` returns, for one table, the calibrated count per
class (:mod:`distnoisy.issues.count`), the flags (the top of the method's ranking, as many as
estimated) and the suggested labels with their confidence
(:mod:`distnoisy.issues.suggest`). Each step is row-wise or a sum over rows, so the engine runs
the same functions part by part on a partitioned store (``distnoisy.engine.outputs``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import numpy as np

from distnoisy.issues.count import NoiseEstimate, estimate_label_noise
from distnoisy.issues.dynamics import (
    early_learning_end,
    early_probabilities,
    prediction_votes,
    switch_counts,
)
from distnoisy.issues.ranking import is_label_issue
from distnoisy.issues.suggest import suggest_labels

#: Store columns holding a method's per-sample class distribution, in the order they are
#: looked for, with how a row of evidence is made of them.
METHOD_FIELDS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("ELR+ targets (mean of the two networks')", ("elr_target_net1", "elr_target_net2")),
    ("ELR target", ("elr_target",)),
    ("LIMIT q-network", ("limit_q_prob",)),
)

#: The store columns :func:`run_evidence` may read.
EVIDENCE_COLUMNS = (
    "pred_hist",
    "loss_hist",
    "margin_hist",
    "final_prob",
    *(name for _, names in METHOD_FIELDS for name in names),
)


@dataclass(frozen=True)
class Evidence:
    """A block of rows' out-of-sample evidence, each ``[n, C]``.

    ``count``: what the confident joint counts on; ``suggest``: what the suggested label is
    the best alternative in, with ``tiebreak`` consulted in turn on ties.
    """

    count: np.ndarray
    suggest: np.ndarray
    tiebreak: tuple[np.ndarray, ...]
    #: Human-readable sources (written into ``summary.json``).
    count_source: str
    suggest_source: str


def method_distribution(fields: Mapping[str, np.ndarray]) -> tuple[str, np.ndarray] | None:
    """The method's own per-sample class distribution in ``fields``, with its name, or None
    (loss-only methods keep none)."""
    for name, columns in METHOD_FIELDS:
        if all(c in fields for c in columns):
            arrays = [np.asarray(fields[c], dtype=np.float64) for c in columns]
            return name, sum(arrays[1:], arrays[0]) / len(arrays)
    return None


def run_evidence(
    fields: Mapping[str, np.ndarray], given: np.ndarray, *, num_classes: int, window: int
) -> Evidence:
    """The evidence of a block of rows of a run's store.

    Parameters
    ----------
    fields : mapping of str to np.ndarray
        The block's store columns: ``pred_hist``, ``loss_hist``, ``margin_hist`` ``[n, E]`` and
        ``final_prob`` ``[n, C]`` always; a method's distribution (:data:`METHOD_FIELDS`) where
        it has one.
    given : np.ndarray
        ``[n]`` the rows' given labels.
    num_classes : int
        ``C``.
    window : int
        The early-learning phase's length in epochs (:func:`early_window`).

    Returns
    -------
    Evidence
        Counted on: the early-learning probabilities. Suggested from: the method's
        distribution, or (loss-only methods) the votes of every epoch, whose best alternative
        to the given label is the class predicted longest before the network memorised the
        wrong label. Ties are broken by the early-learning probabilities, the votes of every
        epoch and the final probabilities.
    """
    pred_hist = np.asarray(fields["pred_hist"])
    final = np.asarray(fields["final_prob"], dtype=np.float64)
    early = early_probabilities(
        pred_hist,
        fields["loss_hist"],
        fields["margin_hist"],
        given,
        num_classes=num_classes,
        epochs=window,
    )
    every = prediction_votes(pred_hist, num_classes=num_classes)
    own = method_distribution(fields)
    source = f"training probabilities of epochs 0-{window - 1}"
    if own is None:
        return Evidence(early, every, (early, final), source, "training predictions, every epoch")
    name, dist = own
    return Evidence(early, dist, (early, every, final), source, name)


def early_window(
    pred_hist: np.ndarray,
    given: np.ndarray,
    *,
    mask: np.ndarray | None = None,
    reduce_sum: Callable[[np.ndarray], np.ndarray] | None = None,
) -> int:
    """The early-learning phase's length (:func:`~distnoisy.issues.dynamics.early_learning_end`)
    from a table's ``pred_hist``, block by block (``reduce_sum`` adds the blocks' ``[2, E]``
    counts; default: this block is the whole table). ``mask``: rows to use (default all)."""
    pred = np.asarray(pred_hist)
    keep = np.ones(len(pred), bool) if mask is None else np.asarray(mask, dtype=bool)
    switched, suspects = switch_counts(pred[keep], np.asarray(given)[keep])
    counts = np.stack([switched, suspects]).astype(np.float64)
    if reduce_sum is not None:
        counts = reduce_sum(counts)
    return early_learning_end(counts[0], counts[1])


@dataclass(frozen=True)
class LabelIssues:
    """What :func:`find_label_issues` finds in one table."""

    #: ``[N]`` bool, the flagged rows.
    is_label_issue: np.ndarray
    #: ``[N]`` int64, the suggested label (never the given one; -1 for ineligible rows).
    suggested_label: np.ndarray
    #: ``[N]`` float64 in ``[0, 1]``, the evidence's share for the suggestion.
    suggestion_confidence: np.ndarray
    #: The calibrated count, per class and overall.
    estimate: NoiseEstimate
    #: Epochs of the early-learning phase.
    window: int
    count_source: str
    suggest_source: str


def find_label_issues(
    given: np.ndarray,
    fields: Mapping[str, np.ndarray],
    score: np.ndarray,
    *,
    num_classes: int,
    eligible: np.ndarray | None = None,
) -> LabelIssues:
    """Flags, calibrated count and suggested labels of a whole table of a run's store.

    Parameters
    ----------
    given : np.ndarray
        ``[N]`` given labels.
    fields : mapping of str to np.ndarray
        The store columns of the same rows (:func:`run_evidence`).
    score : np.ndarray
        ``[N]`` the method's label-issue score, higher = more likely wrong; the flags are the
        top of its ranking (:func:`~distnoisy.issues.ranking.is_label_issue`).
    num_classes : int
        ``C``.
    eligible : np.ndarray, optional
        ``[N]`` bool, samples that may be flagged and are counted (those trained on at least
        once). Default: all.

    Returns
    -------
    LabelIssues
        ``estimate.num_issues`` eligible samples flagged, the highest-scored ones.
    """
    given = np.asarray(given, dtype=np.int64)
    keep = np.ones(len(given), bool) if eligible is None else np.asarray(eligible, dtype=bool)
    window = early_window(fields["pred_hist"], given, mask=keep)
    ev = run_evidence(fields, given, num_classes=num_classes, window=window)
    estimate = estimate_label_noise(given, ev.count, mask=keep)
    flags = is_label_issue(score, keep, estimate.num_issues)
    suggested, confidence = suggest_labels(given, ev.suggest, tiebreak=ev.tiebreak)
    return LabelIssues(
        flags,
        np.where(keep, suggested, -1),
        np.where(keep, confidence, 0.0),
        estimate,
        window,
        ev.count_source,
        ev.suggest_source,
    )
