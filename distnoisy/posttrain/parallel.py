"""Scoring of the kept samples by several ranks inside ``python -m distnoisy.posttrain``.

With ``posttrain.num_workers > 1`` (or a run trained on several workers), the approximate-Hessian
scores (``influence`` and ``self_influence`` with ``hessian=ekfac`` or ``kfac``) are computed by
:func:`distnoisy.posttrain.ranks.score_rank` on the run's launcher: each round writes the indices
and labels of the kept rows to a scratch ``.npy`` (16 bytes a row; the features stay in the
run's cached, memory-mapped feature file) and every rank scores its contiguous share of them.
The ranks start once for all rounds (:func:`distnoisy.launch.ranks.rank_group`).
The Kronecker factors are all-reduced, so the scores equal the one-process ones up to float64
summation order. The exact Hessian, ``grad_norm`` and ``loss_history`` are scored in-process
(they are cheap, or only exist for small heads).
"""

from __future__ import annotations

import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from distnoisy.launch.ranks import RankGroup

#: ``(theta, kept rows (indices into the training features), their labels, mu) -> scores``
Scorer = Callable[[np.ndarray, np.ndarray, np.ndarray, float], np.ndarray]


def parallel_applies(kind: str, hessian: str, world: int) -> bool:
    """Whether the rank-parallel scorer computes this score (module docstring)."""
    return world > 1 and kind in ("influence", "self_influence") and hessian in ("ekfac", "kfac")


def rank_scorer(ranks: RankGroup, kind: str, hessian: str, scratch: Path, features: Path) -> Scorer:
    """A scorer that runs :func:`~distnoisy.posttrain.ranks.score_rank` on the ranks of
    ``ranks`` (started once for every round) over rows of the ``(N, d)`` ``.npy`` file
    ``features``; ``scratch`` holds each call's files (removed after the call)."""

    def score(theta: np.ndarray, rows: np.ndarray, y: np.ndarray, mu: float) -> np.ndarray:
        from distnoisy.posttrain.ranks import ScoreTask, score_rank

        scratch.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix="score-", dir=scratch))
        try:
            np.save(tmp / "rows.npy", np.asarray(rows, dtype=np.int64))
            np.save(tmp / "y.npy", np.asarray(y, dtype=np.int64))
            out = tmp / "scores.npy"
            np.lib.format.open_memmap(out, mode="w+", dtype=np.float64, shape=(len(y),)).flush()
            task = ScoreTask(
                features=str(features),
                labels=str(tmp / "y.npy"),
                rows=str(tmp / "rows.npy"),
                theta=np.asarray(theta, np.float64),
                mu=float(mu),
                scores=str(out),
                report=str(tmp / "report-{rank}.json"),
                corrected=hessian == "ekfac",
                kind=kind,
            )
            ranks.run(score_rank, task)
            return np.array(np.load(out))
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    return score
