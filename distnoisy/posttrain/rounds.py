"""The post-training rounds: score the kept samples, remove the top ones, refit the head, repeat.

Round 0 refits the run's head on every training sample with the post-training regulariser
(nothing removed) so that every later round starts from an optimum of the objective the
influence scores differentiate. Round ``r >= 1`` scores the kept samples with the current head,
removes the top ``fraction_per_round`` of the training set (within each given class in
proportion to its kept size when ``class_balanced``), refits warm-started, and evaluates. The
rounds stop at the removal budget, or when the accuracy on the *noisy* validation labels has not
fallen below its best for ``patience`` rounds; the result is the round with the best noisy
validation accuracy (the latest one on ties), so the removals after it are undone; when even
that round is below the run's own head on the noisy validation labels, the run's head is kept
and nothing is removed (``best_round = -1``).
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from distnoisy.posttrain import influence as infl
from distnoisy.posttrain.config import PostTrainParams
from distnoisy.posttrain.parallel import Scorer
from distnoisy.posttrain.refit import fit_head, mean_nll, predict

log = logging.getLogger("distnoisy.posttrain")

#: Heads up to this many parameters (C * (d + 1)) get the exact Hessian with ``hessian=auto``.
EXACT_MAX_PARAMS = 4096


@dataclass
class Split:
    """Features and labels of one evaluation split (``labels`` None when unknown)."""

    features: np.ndarray
    labels: np.ndarray | None


@dataclass
class RoundsInput:
    """Everything the rounds read (arrays by global index)."""

    train: np.ndarray  # (N, d) features
    given: np.ndarray  # (N,) given labels
    theta: np.ndarray  # (C, d + 1) the run's head
    val: Split | None = None  # labels: the noisy validation labels
    val_clean: np.ndarray | None = None
    test: Split | None = None
    loss_history: np.ndarray | None = None  # (N,) mean training loss (the store's loss_hist)
    corrupted: np.ndarray | None = None  # (N,) bool, when the truth is known
    train_file: Path | None = None  # the .npy ``train`` is mapped from (rank-parallel scoring)


@dataclass
class RoundsResult:
    """What the rounds found; ``removed_round`` is -1 for kept samples."""

    rounds: list[dict[str, float]]
    best_round: int
    theta: np.ndarray
    removed_round: np.ndarray
    score: np.ndarray  # each sample's score when removed, or in the last scored round
    first_scores: np.ndarray  # round 1's scores of every training sample
    order: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # removal order
    before: dict[str, float | None] = field(default_factory=dict)  # the run's own head
    tried: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))  # incl. undone
    mu: float = 0.0  # the head's absolute L2 strength
    weight_decay: float = 0.0  # its relative value (posttrain.weight_decay)


def hessian_kind(params: PostTrainParams, num_params: int) -> str:
    """``exact``, ``ekfac`` or ``kfac`` (``auto``: exact up to :data:`EXACT_MAX_PARAMS`)."""
    if params.hessian != "auto":
        return params.hessian
    return "exact" if num_params <= EXACT_MAX_PARAMS else "ekfac"


def selection_metric(params: PostTrainParams) -> str:
    """The round metric the rounds select on: ``val_acc_noisy`` (the validation labels as noisy
    as the training labels) or ``val_acc`` (the validation set's own labels, as the run's early
    stopping used them)."""
    return "val_acc" if params.select_on == "val" else "val_acc_noisy"


def absolute_mu(params: PostTrainParams, h: np.ndarray) -> float:
    """The L2 strength ``mu = weight_decay * mean ||x||^2`` (scale-free: multiplying the
    features by ``s`` multiplies it by ``s^2``, which leaves the fitted predictions unchanged)."""
    sq = 0.0
    for lo in range(0, len(h), infl.CHUNK):
        sq += float((np.asarray(h[lo : lo + infl.CHUNK], np.float64) ** 2).sum())
    return params.weight_decay * (sq / len(h) + 1.0)


def score(
    kind: str,
    hessian: str,
    theta: np.ndarray,
    train: np.ndarray,
    rows: np.ndarray,
    y: np.ndarray,
    mu: float,
    loss_history: np.ndarray | None,
    scorer: Scorer | None = None,
) -> np.ndarray:
    """One score per kept row ``rows`` of ``train`` (higher = more likely mislabelled);
    ``y``: their labels, ``loss_history``: theirs too. ``scorer``: the rank-parallel
    EK-FAC/K-FAC scorer (:mod:`distnoisy.posttrain.parallel`), when it applies; it reads the
    rows itself, so they are not gathered here."""
    if scorer is not None and kind in ("influence", "self_influence") and hessian != "exact":
        return scorer(theta, rows, y, mu)
    if kind == "loss_history":
        assert loss_history is not None
        return np.asarray(loss_history, np.float64)
    h = train[rows]
    if kind == "grad_norm":
        return infl.grad_norm_scores(theta, h, y)
    if hessian == "exact":
        return infl.exact_scores(theta, h, y, mu)[kind]
    return infl.approx_scores(theta, h, y, mu, corrected=hessian == "ekfac")[kind]


def select(
    scores: np.ndarray, labels: np.ndarray, count: int, num_classes: int, balanced: bool
) -> np.ndarray:
    """Positions (into ``scores``) of the ``count`` samples to remove, highest score first;
    ``balanced``: per given class in proportion to its size (largest remainders)."""
    count = min(count, len(scores))
    if not balanced:
        return np.argsort(-scores, kind="stable")[:count]
    sizes = np.bincount(labels, minlength=num_classes)
    quota = count * sizes / max(len(labels), 1)
    take = np.floor(quota).astype(int)
    extra = count - take.sum()
    take[np.argsort(-(quota - take), kind="stable")[:extra]] += 1
    picked = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        picked.append(members[np.argsort(-scores[members], kind="stable")[: take[c]]])
    chosen = np.concatenate(picked)
    return chosen[np.argsort(-scores[chosen], kind="stable")]


def _accuracy(theta: np.ndarray, split: Split | None, labels: np.ndarray | None) -> float | None:
    if split is None or labels is None:
        return None
    return float((predict(theta, split.features) == labels).mean())


def _nll(theta: np.ndarray, split: Split | None, labels: np.ndarray | None) -> float | None:
    if split is None or labels is None:
        return None
    return mean_nll(theta, split.features, labels)


def evaluate(
    inp: RoundsInput, theta: np.ndarray, kept: np.ndarray, removed_order: list[int]
) -> dict[str, float | None]:
    """One round's metrics: accuracies, and the removed set's precision when known."""
    out: dict[str, float | None] = {
        "removed": float(len(removed_order)),
        "removed_fraction": len(removed_order) / len(inp.given),
        "val_acc_noisy": _accuracy(theta, inp.val, inp.val.labels if inp.val else None),
        "val_acc": _accuracy(theta, inp.val, inp.val_clean),
        "val_nll_noisy": _nll(theta, inp.val, inp.val.labels if inp.val else None),
        "val_nll": _nll(theta, inp.val, inp.val_clean),
        "test_acc": _accuracy(theta, inp.test, inp.test.labels if inp.test else None),
        "train_acc_kept": float(
            (predict(theta, inp.train, rows=np.flatnonzero(kept)) == inp.given[kept]).mean()
        ),
    }
    if inp.corrupted is not None:
        gone = np.asarray(removed_order, dtype=np.int64)
        out["precision_removed"] = float(inp.corrupted[gone].mean()) if len(gone) else None
        out["recall_removed"] = float(inp.corrupted[gone].sum() / max(inp.corrupted.sum(), 1))
    return out


def run_rounds(
    inp: RoundsInput, params: PostTrainParams, scorer: Scorer | None = None
) -> RoundsResult:
    """Rounds of remove-and-refit (module docstring); logs one line per round. ``scorer``
    scores on several ranks (:func:`distnoisy.posttrain.parallel.rank_scorer`)."""
    n, num_classes = len(inp.given), inp.theta.shape[0]
    key = selection_metric(params)
    mu = absolute_mu(params, inp.train)
    hessian = hessian_kind(params, inp.theta.size)
    per_round = max(1, math.ceil(params.fraction_per_round * n))
    budget = math.floor(params.max_removed * n)
    kept = np.ones(n, dtype=bool)
    removed_round = np.full(n, -1, dtype=np.int64)
    last_score = np.zeros(n)
    first_scores = np.zeros(n)
    order: list[int] = []

    before = evaluate(inp, inp.theta, kept, order)
    t0 = time.perf_counter()
    theta = fit_head(inp.theta, inp.train, inp.given, mu, params.refit_iters)
    rounds = [{"round": 0, **evaluate(inp, theta, kept, order), "wall_s": time.perf_counter() - t0}]
    thetas = [theta]
    best, since_best = 0, 0
    log.info("round 0 (refit, nothing removed): %s", _fmt(rounds[0]))
    r = 0
    while len(order) < budget and since_best < params.patience:
        r += 1
        t0 = time.perf_counter()
        idx = np.flatnonzero(kept)
        s = score(
            params.score,
            hessian,
            theta,
            inp.train,
            idx,
            inp.given[idx],
            mu,
            None if inp.loss_history is None else inp.loss_history[idx],
            scorer,
        )
        last_score[idx] = s
        if r == 1:
            first_scores = last_score.copy()
        gone = idx[
            select(
                s,
                inp.given[idx],
                min(per_round, budget - len(order)),
                num_classes,
                params.class_balanced,
            )
        ]
        kept[gone] = False
        removed_round[gone] = r
        order.extend(int(i) for i in gone)
        rows = np.flatnonzero(kept)  # read from the features chunk by chunk, never gathered
        theta = fit_head(theta, inp.train, inp.given[rows], mu, params.refit_iters, rows=rows)
        thetas.append(theta)
        rounds.append(
            {"round": r, **evaluate(inp, theta, kept, order), "wall_s": time.perf_counter() - t0}
        )
        log.info("round %d: %s", r, _fmt(rounds[-1]))
        since_best = _update_best(rounds, best, since_best, key)
        if since_best == 0:
            best = r
    if inp.val is None:  # nothing to select on: the last round (the budget) is the result
        best = r
    theta_best = thetas[best]
    if _worse_than_before(rounds[best], before, key):
        # Every round is below the run's own head on the noisy validation labels: keep it.
        best, theta_best = -1, inp.theta
    tried = np.asarray(order, dtype=np.int64)
    undone = removed_round > best if best >= 0 else removed_round >= 0
    removed_round[undone] = -1
    order = [i for i in order if removed_round[i] >= 1]
    return RoundsResult(
        rounds,
        best,
        theta_best,
        removed_round,
        last_score,
        first_scores,
        np.asarray(order, dtype=np.int64),
        before,
        tried,
        mu,
        params.weight_decay,
    )


def _worse_than_before(row: dict, before: dict, key: str) -> bool:
    now, then = row.get(key), before.get(key)
    return now is not None and then is not None and now < then


def _update_best(rounds: list[dict], best: int, since_best: int, key: str) -> int:
    """Rounds since the best noisy validation accuracy (0: this round is the new best)."""
    now, then = rounds[-1].get(key), rounds[best].get(key)
    if now is None or then is None:
        return 0 if now is None else since_best + 1
    # A tie counts as no worse: removal goes on while the noisy accuracy holds (on noisy labels
    # a removed mislabelled sample cannot raise it much; a removed clean one lowers it).
    return 0 if now >= then else since_best + 1


def _fmt(row: dict) -> str:
    keys = ("removed", "val_acc", "val_acc_noisy", "test_acc", "precision_removed")
    return "  ".join(f"{k} {row[k]:.4g}" for k in keys if row.get(k) is not None)
