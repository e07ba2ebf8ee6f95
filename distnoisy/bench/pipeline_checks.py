"""The pipeline bench's checks of a finished job's outputs against the truth it knows.

The truth is the run's own noise label file (``data/noise/noise-train-*.parquet``: the given
and the clean label of every training sample, by global index), read here independently of
the run's summary. Every table is read part by part; the checks hold ``N``-long label, score
and flag columns only (about 30 bytes a sample).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any

import numpy as np


def _truth(out: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``(given, corrupted)`` by global index, from the run's noise label file."""
    from distnoisy.data.noise import load_label_file

    files = sorted((out / "data" / "noise").glob("noise-train-*.parquet"))
    if len(files) != 1:
        raise RuntimeError(f"expected one training noise file in {out / 'data' / 'noise'}")
    lf = load_label_file(files[0], n, 10)
    assert lf.clean_labels is not None
    return lf.labels, lf.labels != lf.clean_labels


def check_label_issues(out: Path, n: int, given: np.ndarray, corrupted: np.ndarray) -> dict:
    """``label_issues`` covers every training sample once, with its given label; the AUROC of
    its score and the precision and recall of its flags against the noisy subset."""
    from distnoisy.finished.runs import open_run
    from distnoisy.issues.ranking import auroc

    run = open_run(str(out / "run"), require=("summary.json", "label_issues.parquet"))
    seen = np.zeros(n, dtype=np.int64)
    score = np.full(n, np.nan)
    flag = np.zeros(n, dtype=bool)
    trained = np.zeros(n, dtype=bool)
    label_ok = True
    rows = 0
    columns = ["index", "given_label", "score", "is_label_issue", "trained"]
    for part in run.iter_table("label_issues.parquet", columns):
        idx = part["index"]
        rows += len(idx)
        np.add.at(seen, idx, 1)
        score[idx], flag[idx], trained[idx] = part["score"], part["is_label_issue"], part["trained"]
        label_ok = label_ok and bool((part["given_label"] == given[idx]).all())
    flagged = int(flag.sum())
    hits = int((flag & corrupted).sum())
    return {
        "rows": rows,
        "every_sample_once": bool(rows == n and (seen == 1).all()),
        "given_labels_match_noise_file": label_ok,
        "trained": int(trained.sum()),
        "noisy": int(corrupted.sum()),
        "auroc": round(float(auroc(score[trained], corrupted[trained])), 4),
        "flagged": flagged,
        "flag_precision": round(hits / flagged, 4) if flagged else None,
        "flag_recall": round(hits / max(int(corrupted.sum()), 1), 4),
        "run_summary_auroc": run.summary.get("label_issue_auroc"),
        "test_acc": run.summary.get("test_acc"),
        "memorized": run.summary.get("memorized"),
    }


ROUND_KEYS = ("round", "removed", "precision_removed", "val_acc_noisy", "test_acc")


def check_posttrain(out: Path, n: int, corrupted: np.ndarray) -> dict:
    """Precision of post-training's removed set against the noisy subset (read by index)."""
    import pyarrow.parquet as pq

    dirs = sorted((out / "run").glob("posttrain-*"))
    if not dirs:
        return {"missing": True}
    summary = json.loads((dirs[0] / "summary.json").read_text())
    removed = pq.read_table(dirs[0] / "removed.parquet", columns=["index", "round"])
    idx = removed.column("index").to_numpy()
    rnd = removed.column("round").to_numpy()
    kept_rounds = rnd <= max(summary["best_round"], 0)
    chosen = idx[kept_rounds & (rnd >= 1)]
    return {
        "removed": len(chosen),
        "removed_fraction": round(len(chosen) / n, 4),
        "precision_removed": round(float(corrupted[chosen].mean()), 4) if len(chosen) else None,
        "noise_rate": round(float(corrupted.mean()), 4),
        "summary_precision_removed": summary.get("precision_removed"),
        "best_round": summary.get("best_round"),
        "test_acc_before": summary.get("test_acc_before"),
        "test_acc_refit_only": summary.get("test_acc_refit_only"),
        "test_acc": summary.get("test_acc"),
        # the first round's ranking of every training sample, and every round tried (the
        # stopping rule may undo them: then nothing is removed)
        "ranking_auroc": summary.get("auroc"),
        "precision_first_20pct": summary.get("precision_first_20pct"),
        "rounds": [{k: r.get(k) for k in ROUND_KEYS} for r in summary.get("rounds", [])],
    }


def check_analysis(out: Path, n: int) -> dict:
    """The analysis table, and that its buckets hold every training sample."""
    with open(out / "analysis" / "analysis.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    n_train = sum(int(r["n_train"]) for r in rows)
    keep = ("bucket", "n_train", "n_corrupted", "memorized", "n_test", "test_acc", "confidence")
    return {
        "buckets_cover_training_set": n_train == n,
        "table": [{k: r[k] for k in keep} for r in rows],
        "markdown": (out / "analysis" / "analysis.md").read_text(),
    }


def check_outputs(out: Path, n: int) -> dict[str, Any]:
    """Every check of a finished pipeline in ``out`` with ``n`` training samples."""
    given, corrupted = _truth(out, n)
    return {
        "label_issues": check_label_issues(out, n, given, corrupted),
        "posttrain": check_posttrain(out, n, corrupted),
        "analysis": check_analysis(out, n),
    }
