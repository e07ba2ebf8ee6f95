"""The references of post-training on the same frozen features, head and penalty: cleanlab's
recipe (the peer) and the perfect removal (the ceiling).

Confident learning (cleanlab, Northcutt et al. 2021) finds label issues from out-of-sample
predicted probabilities. Here those come from the same model post-training refits, the linear
head on the run's frozen features with the same L2 penalty ``mu``, fitted by K-fold
cross-validation (stratified by given label): each sample's probabilities come from the head fitted
on the other folds. :func:`cleanlab.filter.find_label_issues` flags the issues, they are
removed, and the head is refit on the kept samples from round 0's head, exactly as a
post-training round refits. The only difference from post-training is which samples are
removed, so the two can be compared on test accuracy and on the precision and recall of the
removed set.

The perfect removal removes exactly the truly corrupted samples (known for synthetic noise) and
refits the same way: no removal on these features with this head does better except by chance,
so it measures how much a removal could gain at all.

cleanlab is an optional dependency (``pip install 'distnoisy[bench]'``); this module imports
it only when the recipe runs.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from distnoisy.core.errors import ConfigError
from distnoisy.posttrain.influence import CHUNK, augment, softmax
from distnoisy.posttrain.refit import fit_head
from distnoisy.posttrain.rounds import RoundsInput, evaluate

#: What to install when cleanlab is missing.
INSTALL_HINT = "pip install 'distnoisy[bench]' (or pip install 'cleanlab>=2.6')"


def require_cleanlab() -> Any:
    """The ``cleanlab.filter`` module, or a one-line :class:`ConfigError` saying what to
    install."""
    try:
        from cleanlab import filter as cleanlab_filter
    except ImportError:
        raise ConfigError(f"cleanlab's recipe needs the cleanlab package: {INSTALL_HINT}") from None
    return cleanlab_filter


def stratified_folds(y: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """A fold number in ``[0, folds)`` per sample: each class dealt round-robin over the folds
    in a seeded random order, so every fold holds each class in proportion."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(y), dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        members = rng.permutation(np.flatnonzero(y == c))
        fold[members] = (np.arange(len(members)) + offset) % folds
        offset += len(members)  # the next class starts where this one ended: balanced folds
    return fold


def predict_proba(
    theta: np.ndarray, h: np.ndarray, chunk: int = CHUNK, rows: np.ndarray | None = None
) -> np.ndarray:
    """Softmax probabilities of rows ``h`` (or of its rows ``rows``) under head
    ``theta = [W b]``, read chunk by chunk (``h`` may be a memory map)."""
    n = len(h) if rows is None else len(rows)
    out = np.empty((n, theta.shape[0]))
    for lo in range(0, n, chunk):
        part = h[lo : lo + chunk] if rows is None else h[rows[lo : lo + chunk]]
        out[lo : lo + chunk] = softmax(augment(np.asarray(part, np.float64)) @ theta.T)
    return out


def out_of_sample_probs(
    train: np.ndarray,
    given: np.ndarray,
    num_classes: int,
    mu: float,
    folds: int = 5,
    seed: int = 0,
    max_iter: int = 300,
) -> np.ndarray:
    """``(N, C)`` probabilities, each row from the head fitted without that row's fold.

    Every fold's head starts from zero (not from the run's head, which was trained on every
    sample), so no sample's own label reaches its probabilities.
    """
    fold = stratified_folds(given, folds, seed)
    probs = np.empty((len(given), num_classes))
    theta0 = np.zeros((num_classes, train.shape[1] + 1))
    for k in range(folds):
        # The rows by index, read chunk by chunk (as post-training's refit): no copy of the
        # folds' features, which may be a memory map.
        fit, held = np.flatnonzero(fold != k), np.flatnonzero(fold == k)
        theta = fit_head(theta0, train, given[fit], mu, max_iter, rows=fit)
        probs[held] = predict_proba(theta, train, rows=held)
    return probs


def cleanlab_recipe(
    inp: RoundsInput,
    mu: float,
    theta_refit: np.ndarray,
    refit_iters: int,
    folds: int = 5,
    seed: int = 0,
    filter_by: str = "prune_by_noise_rate",
) -> dict[str, Any]:
    """Remove cleanlab's label issues and refit; the metrics of a post-training round.

    Parameters
    ----------
    inp
        The rounds' input (features, given labels, evaluation splits, truth when known).
    mu
        The head's L2 strength, the same as post-training's.
    theta_refit
        Round 0's head (every sample, refit): the warm start of the final refit.
    refit_iters
        L-BFGS iterations of the final refit (as post-training's).
    folds, seed, filter_by
        K of the K-fold, the fold assignment's seed and cleanlab's ``filter_by``.

    Returns
    -------
    dict
        ``removed`` (count), ``removed_fraction``, ``val_acc_noisy``, ``val_acc``, ``test_acc``,
        ``train_acc_kept``, ``precision_removed``/``recall_removed`` (when the truth is known),
        ``removed_index`` (the removed global indices), ``folds`` and ``filter_by``.
    """
    cleanlab_filter = require_cleanlab()
    num_classes = inp.theta.shape[0]
    given = np.asarray(inp.given, np.int64)
    probs = out_of_sample_probs(inp.train, given, num_classes, mu, folds, seed)
    issues = np.asarray(
        # n_jobs=1: cleanlab's own process pool relies on fork-inherited globals and fails in
        # a spawned worker (the experiment's); one class at a time is quick at this size.
        cleanlab_filter.find_label_issues(given, probs, filter_by=filter_by, n_jobs=1),
        dtype=bool,
    )
    return {
        **refit_without(inp, issues, mu, theta_refit, refit_iters),
        "removed_index": np.flatnonzero(issues),
        "folds": folds,
        "filter_by": filter_by,
    }


def perfect_removal(
    inp: RoundsInput, mu: float, theta_refit: np.ndarray, refit_iters: int
) -> dict[str, Any]:
    """Remove exactly the truly corrupted samples and refit as a round does: the metrics of a
    post-training round (as :func:`cleanlab_recipe`'s), for runs whose noise is known."""
    if inp.corrupted is None:
        raise ConfigError("the perfect removal needs the truly corrupted samples (synthetic noise)")
    return refit_without(inp, np.asarray(inp.corrupted, bool), mu, theta_refit, refit_iters)


def refit_without(
    inp: RoundsInput, removed: np.ndarray, mu: float, theta_refit: np.ndarray, refit_iters: int
) -> dict[str, Any]:
    """Refit the head from ``theta_refit`` on the samples not in the boolean mask ``removed``,
    as a post-training round does; that round's metrics, ``removed`` the count."""
    kept = ~removed
    rows = np.flatnonzero(kept)
    given = np.asarray(inp.given, np.int64)
    theta = fit_head(theta_refit, inp.train, given[rows], mu, refit_iters, rows=rows)
    gone = np.flatnonzero(removed)
    return {**evaluate(inp, theta, kept, gone.tolist()), "removed": len(gone)}
