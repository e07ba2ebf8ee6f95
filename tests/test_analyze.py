"""The analysis' pure functions against hand computations and float64 re-implementations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from distnoisy.analyze.buckets import (
    RunSamples,
    add_excess_error,
    assign_buckets,
    bucket_edges,
    bucket_stats,
)
from distnoisy.analyze.config import load_analyze_config
from distnoisy.analyze.knn import knn_density
from distnoisy.analyze.memorization import first_memorized_epoch, stays_memorized
from distnoisy.core.errors import ConfigError

# --- memorisation from a hand-written history ---------------------------------------------------

# 5 samples x 6 epochs; -1 = not visited that epoch.
PRED_HIST = np.array(
    [
        [0, 0, 2, 2, 2, 2],  # corrupted (given 2, clean 0): first 2, stays
        [1, 3, 1, 3, 3, 3],  # corrupted (given 3, clean 1): first 1, falls back at 2
        [4, 4, 4, 4, 4, 4],  # clean (given 4): never "memorised"
        [0, -1, 5, -1, 5, 5],  # corrupted (given 5, clean 0): first 2; unvisited epochs ignored
        [1, 1, 1, 1, 1, 1],  # corrupted (given 2, clean 1): never predicted as 2
    ],
    dtype=np.int16,
)
GIVEN = np.array([2, 3, 4, 5, 2])
CLEAN = np.array([0, 1, 4, 0, 1])


def test_first_memorized_epoch_hand_history():
    assert first_memorized_epoch(PRED_HIST, GIVEN, CLEAN).tolist() == [2, 1, -1, 2, -1]


def test_stays_memorized_hand_history():
    first = first_memorized_epoch(PRED_HIST, GIVEN, CLEAN)
    assert stays_memorized(PRED_HIST, GIVEN, first).tolist() == [True, False, False, True, False]


# --- buckets and per-bucket statistics on a hand-made tiny case ----------------------------------


def test_bucket_edges_and_assignment_hand_case():
    train = np.array([0.1, 0.2, 0.3, 0.4, 0.5, 0.6])
    edges = bucket_edges(train, 3)
    # numpy's default (linear) quantiles at 1/3 and 2/3 of 6 points: 0.2667, 0.4333
    np.testing.assert_allclose(edges, [0.1 + 0.5 / 3, 0.1 + 1.0 / 3])
    assert assign_buckets(train, edges).tolist() == [0, 0, 1, 1, 2, 2]
    assert assign_buckets(np.array([-5.0, 0.3, 9.0]), edges).tolist() == [0, 1, 2]


def test_bucket_stats_hand_case():
    samples = RunSamples(
        train_bucket=np.array([0, 0, 0, 1, 1, 1]),
        corrupted=np.array([True, True, False, True, False, False]),
        memorized_final=np.array([True, False, False, True, False, False]),
        first_epoch=np.array([3, 5, -1, 1, -1, -1]),
        stays=np.array([True, False, False, False, False, False]),
        test_bucket=np.array([0, 0, 1, 1, 1]),
        test_correct=np.array([True, False, True, True, False]),
        test_confidence=np.array([0.9, 0.5, 0.8, 0.6, 0.7]),
    )
    rows = bucket_stats(samples, 2)
    b0, b1 = rows
    assert (b0["n_train"], b0["n_corrupted"], b0["n_test"]) == (3, 2, 2)
    assert b0["noise_rate"] == pytest.approx(2 / 3)
    assert b0["memorized"] == pytest.approx(0.5)
    assert b0["stays_memorized"] == pytest.approx(0.5)
    assert b0["first_memorized_epoch"] == pytest.approx(4.0)  # (3 + 5) / 2
    assert b0["test_acc"] == pytest.approx(0.5)
    assert b0["confidence"] == pytest.approx(0.7)
    assert (b1["n_train"], b1["n_corrupted"], b1["n_test"]) == (3, 1, 3)
    assert b1["memorized"] == 1.0 and b1["stays_memorized"] == 0.0
    assert b1["first_memorized_epoch"] == 1.0
    assert b1["test_acc"] == pytest.approx(2 / 3)
    assert b1["confidence"] == pytest.approx(0.7)
    ref = [dict(r, test_acc=1.0) for r in rows]
    add_excess_error(rows, ref)
    assert b0["excess_error"] == pytest.approx(0.5)
    assert b1["excess_error"] == pytest.approx(1 / 3)


def test_empty_bucket_is_nan_not_an_error():
    samples = RunSamples(
        *(np.zeros(2, dtype=int), np.zeros(2, bool), np.zeros(2, bool), -np.ones(2, int)),
        np.zeros(2, bool),
        np.zeros(1, int),
        np.ones(1, bool),
        np.ones(1),
    )
    rows = bucket_stats(samples, 2)
    assert math.isnan(rows[1]["test_acc"]) and math.isnan(rows[0]["memorized"])


def test_more_buckets_than_samples_is_one_line():
    with pytest.raises(ConfigError, match=r"analysis\.buckets=7 but there are 6 training samples"):
        bucket_edges(np.arange(6.0), 7)


# --- the k-NN density against an independent float64 re-implementation -------------------------


def _knn_reference(q, ref, k, metric, is_self):
    qn = q / np.linalg.norm(q, axis=1, keepdims=True)
    rn = ref / np.linalg.norm(ref, axis=1, keepdims=True)
    out = []
    for i, x in enumerate(qn):
        if metric == "cosine":
            vals = [float(x @ r) for j, r in enumerate(rn) if not (is_self and i == j)]
            out.append(np.mean(sorted(vals, reverse=True)[:k]))
        else:
            vals = [
                float(np.linalg.norm(x - r)) for j, r in enumerate(rn) if not (is_self and i == j)
            ]
            out.append(-np.mean(sorted(vals)[:k]))
    return np.array(out)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_knn_density_matches_float64_loop(metric):
    rng = np.random.default_rng(0)
    train = rng.standard_normal((50, 7))
    test = rng.standard_normal((13, 7))
    got_self = knn_density(train, None, k=4, metric=metric, block_rows=8)  # several blocks
    np.testing.assert_allclose(got_self, _knn_reference(train, train, 4, metric, True), atol=1e-5)
    got = knn_density(test, train, k=4, metric=metric, block_rows=5)
    np.testing.assert_allclose(got, _knn_reference(test, train, 4, metric, False), atol=1e-5)


def test_knn_k_larger_than_the_set_is_one_line():
    with pytest.raises(ConfigError, match=r"analysis\.k=10 .* 5 other samples"):
        knn_density(np.eye(6), None, k=10)


# --- config ---------------------------------------------------------------------------------------


def test_config_parses_run_list_and_rejects_unknown_keys():
    cfg = load_analyze_config(["run=[/a/b, /c/d]", "analysis.buckets=3"])
    assert cfg.run == ["/a/b", "/c/d"] and cfg.analysis.buckets == 3
    assert load_analyze_config(["run=/a/b"]).run == ["/a/b"]
    with pytest.raises(ConfigError, match=r"analysis\.bukets"):
        load_analyze_config(["run=[/a]", "analysis.bukets=3"])
    with pytest.raises(ConfigError, match="no runs to analyse"):
        load_analyze_config([])
    with pytest.raises(ConfigError, match=r"analysis\.metric"):
        load_analyze_config(["run=[/a]", "analysis.metric=manhattan"])


@pytest.mark.slow  # the only fast test that needed the session's Ray cluster (~20-30 s to start)
def test_knn_density_on_ray_tasks_equals_in_process(ray_cluster):
    """Row blocks on Ray tasks give the same scores as one process (self-exclusion offsets)."""
    rng = np.random.default_rng(1)
    train = rng.standard_normal((90, 6))
    test = rng.standard_normal((31, 6))
    kw = dict(k=3, block_rows=8, parallel_min_rows=0)
    for ref, queries in ((None, train), (train, test)):
        local = knn_density(queries, ref, **kw)
        parallel = knn_density(queries, ref, num_workers=2, **kw)
        np.testing.assert_allclose(parallel, local, rtol=0, atol=1e-6)
