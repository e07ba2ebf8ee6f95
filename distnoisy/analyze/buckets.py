"""Frequency buckets and the per-bucket statistics of one run (pure numpy).

Buckets are quantiles of the *training* frequency scores: with ``B`` buckets the inner edges are
the ``j/B`` quantiles (``j = 1..B-1``) and a sample (training or test) with score ``s`` falls in
bucket ``#{edges <= s}``, so bucket 0 is the rarest and ``B-1`` the most frequent. Test samples
use the training edges, so a bucket means the same density for both (docs/analysis.md#buckets).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from distnoisy.core.errors import ConfigError


def bucket_edges(train_scores: np.ndarray, num_buckets: int) -> np.ndarray:
    """The ``num_buckets - 1`` inner edges: quantiles ``j / num_buckets`` of the training scores.

    Raises
    ------
    ConfigError
        If ``num_buckets`` is below 1 or above the number of training samples.
    """
    n = len(train_scores)
    if not 1 <= num_buckets <= n:
        raise ConfigError(
            f"analysis.buckets={num_buckets} but there are {n} training samples; set "
            f"analysis.buckets between 1 and {n} (5 is the default)"
        )
    qs = np.arange(1, num_buckets) / num_buckets
    return np.quantile(np.asarray(train_scores, dtype=np.float64), qs)


def assign_buckets(scores: np.ndarray, edges: np.ndarray) -> np.ndarray:
    """Bucket of every score: the number of inner edges at or below it (0 = rarest)."""
    return np.searchsorted(edges, np.asarray(scores, dtype=np.float64), side="right")


@dataclass(frozen=True)
class RunSamples:
    """What the per-bucket statistics of one run need, per sample (row = global index).

    Training: ``train_bucket``, ``corrupted`` (given != clean), ``memorized_final`` (final
    prediction == given label), ``first_epoch`` (-1 = never memorised), ``stays``. Test:
    ``test_bucket``, ``test_correct`` (prediction == clean label), ``test_confidence``
    (max softmax probability).
    """

    train_bucket: np.ndarray
    corrupted: np.ndarray
    memorized_final: np.ndarray
    first_epoch: np.ndarray
    stays: np.ndarray
    test_bucket: np.ndarray
    test_correct: np.ndarray
    test_confidence: np.ndarray


def _mean(values: np.ndarray) -> float:
    return float(np.mean(values)) if len(values) else float("nan")


def bucket_stats(samples: RunSamples, num_buckets: int) -> list[dict[str, float]]:
    """One row of statistics per bucket (docs/analysis.md#per-bucket-statistics).

    Rates are over the bucket's corrupted training samples (``memorized``, ``stays_memorized``,
    ``first_memorized_epoch`` over the memorised ones) or its test samples (``test_acc``,
    ``confidence``); NaN where the bucket has none.
    """
    rows = []
    for b in range(num_buckets):
        tr = samples.train_bucket == b
        bad = tr & samples.corrupted
        te = samples.test_bucket == b
        ever = bad & (samples.first_epoch >= 0)
        rows.append(
            {
                "bucket": b,
                "n_train": int(tr.sum()),
                "n_corrupted": int(bad.sum()),
                "noise_rate": _mean(samples.corrupted[tr].astype(float)),
                "memorized": _mean(samples.memorized_final[bad].astype(float)),
                "stays_memorized": _mean(samples.stays[bad].astype(float)),
                "first_memorized_epoch": _mean(samples.first_epoch[ever].astype(float)),
                "n_test": int(te.sum()),
                "test_acc": _mean(samples.test_correct[te].astype(float)),
                "confidence": _mean(samples.test_confidence[te]),
            }
        )
    return rows


def add_excess_error(rows: list[dict[str, float]], reference: list[dict[str, float]]) -> None:
    """``excess_error`` = reference test accuracy - this run's, per bucket (in place): the test
    error the noise (and the method) cost against the reference run on clean labels."""
    for row, ref in zip(rows, reference, strict=True):
        row["ref_test_acc"] = ref["test_acc"]
        row["excess_error"] = ref["test_acc"] - row["test_acc"]
