"""The label-issue page's grid pieces: cross-validation folds, training order, flag quality,
the list of shortfalls."""

from __future__ import annotations

import numpy as np
import pytest

from distnoisy.driver.grid import cv_fold_dir, cv_folds, run_dir
from distnoisy.issues.experiment import BAR_METHODS, flag_quality, shortfalls, tasks


def test_cv_folds_are_stratified_balanced_and_seeded() -> None:
    given = np.repeat(np.arange(3), [10, 7, 4])
    fold = cv_folds(given, 5, seed=0)
    # every sample in exactly one fold; each class spread over the folds to within one sample
    assert set(fold.tolist()) == set(range(5))
    for c in range(3):
        counts = np.bincount(fold[given == c], minlength=5)
        assert counts.max() - counts.min() <= 1, c
    # dealing continues across classes: fold sizes 21 / 5 -> 5 or 4 each
    sizes = np.bincount(fold, minlength=5)
    assert sizes.max() - sizes.min() <= 1 and sizes.sum() == 21
    np.testing.assert_array_equal(fold, cv_folds(given, 5, seed=0))
    assert not np.array_equal(fold, cv_folds(given, 5, seed=1))


def test_grid_paths_keep_the_shared_layout(tmp_path) -> None:
    assert run_dir(tmp_path, "digits", "pair", "ce", 2) == tmp_path / "digits-pair" / "ce-seed2"
    assert cv_fold_dir(tmp_path, "digits", "pair", 2, 4) == (
        tmp_path / "digits-pair" / "cv-ce-seed2" / "fold4"
    )


def test_tasks_train_the_bars_first_then_seed_by_seed() -> None:
    todo = tasks(["digits", "fashion_mnist"], ["symmetric", "pair"], ["ce", "gce", "elr"], [0, 1])
    assert len(todo) == len(set(todo))
    n_bars = 2 * 2 * len(BAR_METHODS)  # seeds x datasets x (ce, elr), symmetric
    assert all(t[0] == "run" and t[2] == "symmetric" and t[3] in BAR_METHODS for t in todo[:n_bars])
    # every training of seed 0 comes before any other of seed 1
    first_seed1 = next(i for i, t in enumerate(todo[n_bars:]) if t[4] == 1) + n_bars
    assert all(t[4] == 0 for t in todo[n_bars:first_seed1])
    # 2 datasets x 2 noises x 2 seeds x (3 runs + 5 folds)
    assert len(todo) == 2 * 2 * 2 * 8


def test_flag_quality_by_hand() -> None:
    flags = np.array([1, 1, 1, 0, 0], bool)
    corrupted = np.array([1, 1, 0, 1, 0], bool)
    given = np.array([0, 1, 2, 3, 4])
    clean = np.array([5, 6, 2, 7, 4])
    suggested = np.array([5, 0, 2, 7, 1])
    q = flag_quality(flags, corrupted, suggested, given, clean)
    assert q["flagged"] == 3 and q["corrupted"] == 3
    assert q["precision"] == 2 / 3 and q["recall"] == 2 / 3 and q["f1"] == 2 / 3
    assert q["suggestion_acc"] == 0.5  # rows 0 (right) and 1 (wrong)
    assert q["self_suggested"] == 1  # row 2 suggests its given label 2


def test_cleanlab_peer_assembles_the_held_out_rows(tmp_path) -> None:
    filt = pytest.importorskip("cleanlab.filter")
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distnoisy.issues.experiment import measure_cleanlab
    from distnoisy.store.export import field_columns

    rng = np.random.default_rng(0)
    n, c, k = 200, 4, 3
    clean = rng.integers(0, c, n)
    given = np.where(rng.random(n) < 0.3, (clean + 1) % c, clean)
    fold = cv_folds(given, k, seed=0)
    folds, held, want = [], [], np.zeros((n, c))
    for f in range(k):
        # each fold's model: right on its held-out rows' clean class, noise elsewhere
        probs = rng.dirichlet(np.ones(c), n)
        rows = np.flatnonzero(fold == f)
        probs[rows] = 0.1 / (c - 1)
        probs[rows, clean[rows]] = 0.9
        want[rows] = probs[rows]
        out = tmp_path / f"fold{f}"
        out.mkdir()
        cols = {"index": pa.array(np.arange(n)), "given_label": pa.array(given)}
        cols["clean_label"] = pa.array(clean)
        cols.update(field_columns({"final_prob": probs.astype(np.float32)}))
        pq.write_table(pa.table(cols), out / "sample_stats.parquet")
        folds.append(out)
        held.append(rows)
    got = measure_cleanlab(folds, held)
    want = want.astype(np.float32).astype(np.float64)
    probs = want / want.sum(1, keepdims=True)
    flags = filt.find_label_issues(labels=given, pred_probs=probs, n_jobs=1)  # no fork pool
    assert got["flagged"] == int(flags.sum()) and got["corrupted"] == int((given != clean).sum())
    # the held-out probabilities name the clean class: every corrupted row found, suggested right
    assert got["recall"] == 1.0 and got["suggestion_acc"] == 1.0


def _row(seed: int, flagged: int, corrupted: int, sugg: float, f1: float) -> dict:
    return {"seed": seed, "flagged": flagged, "corrupted": corrupted, "suggestion_acc": sugg,
            "f1": f1}  # fmt: skip


def test_shortfalls_name_each_missed_bar_and_by_how_much() -> None:
    results = {
        # within 15% (0.90x, 1.14x), suggestions >= 80%, F1 above cleanlab's: not listed
        ("digits", "symmetric", "ce"): [_row(0, 90, 100, 0.9, 0.9), _row(1, 114, 100, 0.8, 0.9)],
        ("digits", "symmetric", "cleanlab"): [_row(0, 140, 100, 0.7, 0.8)],
        # seed 1 counts 0.43x; seed 0's suggestions 75%; mean F1 0.6 vs cleanlab's 0.7 (seed 0 only)
        ("digits", "pair", "limit"): [_row(0, 100, 100, 0.75, 0.6), _row(1, 43, 100, 0.9, 0.5)],
        ("digits", "pair", "cleanlab"): [_row(0, 120, 100, 0.9, 0.7)],
        ("digits", "instance", "elr"): [],
    }
    text = shortfalls(results)
    assert text.splitlines() == [
        "- LIMIT, digits, pair: count off by more than 15% in 1 of 2 seeds (worst 0.43x, -57%); "
        "suggestions right on 75.0% (worst seed; bar 80%) in 1 of 2 seeds; F1 60.0% below "
        "cleanlab's 70.0% (-10.0 points, 1 seed)."
    ]
    ok = {k: v for k, v in results.items() if k[1] == "symmetric"}
    assert shortfalls(ok) == "Every finished run meets every bar.\n"
