"""A finished run's outputs: the ranked label issues, the per-sample stats and the summary.

Two layouts, by the store's backend:

- **replicated** (the store fits in every rank's memory): rank 0 writes ``label_issues.parquet``
  and ``sample_stats.parquet``, one file each, plus the top-k (:func:`write_outputs`);
- **partitioned** (web scale): every rank writes the rows it owns, in parallel, as its part of
  ``sample_stats/`` and ``label_issues/`` (:func:`write_rank_outputs`). The label-issue count
  (the calibrated confident joint of :mod:`distnoisy.issues.find`) is built from per-class and
  per-epoch sums that every rank adds up (all-reduces of ``[2, E]``, ``[2, C]``, ``[C]`` and
  ``[C, C]`` arrays); the flags need one global cut (:func:`distnoisy.issues.ranking.flag_cut`),
  the top-k a merge of the parts' heads and the summary a few global figures: rank 0 receives
  the per-sample columns these need (score, final prediction, trained, read: 18 bytes a sample)
  and each part's ``top_k`` first rows, never a part's table.

The layout of the partitioned datasets is :mod:`distnoisy.store.export`'s.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distnoisy.config import Config
from distnoisy.data.prepare import DataSpec
from distnoisy.engine import collectives
from distnoisy.issues.count import NoiseEstimate, estimate_label_noise
from distnoisy.issues.find import EVIDENCE_COLUMNS, early_window, run_evidence
from distnoisy.issues.ranking import auroc, flag_cut, flags_from_cut, rank_by_score
from distnoisy.issues.suggest import suggest_labels
from distnoisy.methods import Method
from distnoisy.store import Store
from distnoisy.store.export import (
    LABEL_ISSUES_DIR,
    LABEL_ISSUES_TOP,
    SAMPLE_STATS_DIR,
    atomic_write_table,
    field_columns,
    order_issues,
    rank_part,
    write_index,
    write_part,
)

#: Skipped samples listed by name in summary.json (all are counted).
MAX_LISTED_BAD = 1000


@dataclass
class RunInfo:
    """What every rank knows about the run besides its store (labels by global index)."""

    method: Method
    given: np.ndarray
    clean: np.ndarray | None
    keys: list[str]
    history: list[dict[str, float]]
    spec: DataSpec
    cfg: Config
    bad_samples: int = 0
    bad_sample_list: list[dict[str, str]] | None = None


@dataclass
class Rows:
    """One block of rows ``[lo, hi)`` (all of them, or one rank's part) and what is derived
    from them: the label-issue scores, the suggested labels and the final predictions."""

    lo: int
    hi: int
    fields: Mapping[str, torch.Tensor]
    score: np.ndarray
    suggested: np.ndarray  # the best alternative to the given label (-1: never trained on)
    confidence: np.ndarray  # the evidence's share for the suggestion
    trained: np.ndarray  # trained on at least once (a training prediction was recorded)
    pred: np.ndarray  # the final model's prediction
    read: np.ndarray  # the final pass could read the sample (its probability row is not 0)


@dataclass
class Found:
    """The label-issue figures every rank agrees on (docs/methods.md#flags)."""

    estimate: NoiseEstimate
    window: int  # epochs of the early-learning phase
    count_source: str
    suggest_source: str


#: A sum over every block of rows (an all-reduce across ranks, or nothing for one table).
Reduce = Callable[[np.ndarray], np.ndarray]


def score_rows(info: RunInfo, fields: Mapping[str, torch.Tensor], lo: int) -> Rows:
    """Label-issue scores and predictions of the rows ``[lo, lo + n)`` held in ``fields``
    (the suggestions are filled in by :func:`find_issues`)."""
    probs = fields["final_prob"].float().numpy()
    loss_hist = fields["loss_hist"].float().numpy()
    hi = lo + len(probs)
    # The method's own suggestion (its final prediction or target argmax) is replaced by
    # find_issues', which never names the given label.
    score, _ = info.method.label_issue_scores(info.given[lo:hi], probs, loss_hist, fields)
    # Samples never trained on (lost in a truncated shard, or never drawn by class-balanced
    # epochs) have scores without training signal: they rank last, unflagged, with no suggestion.
    trained = fields["train_pred"].numpy() >= 0
    n = hi - lo
    return Rows(
        lo,
        hi,
        fields,
        np.asarray(score, dtype=np.float64),
        np.full(n, -1, dtype=np.int64),
        np.zeros(n),
        trained,
        probs.argmax(1),
        probs.sum(1) > 0,
    )


def _numpy_fields(fields: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The store columns the label-issue evidence reads, as numpy (low-precision as float32)."""
    out = {}
    for name in EVIDENCE_COLUMNS:
        if name in fields:
            t = fields[name]
            out[name] = (t.float() if t.is_floating_point() else t).numpy()
    return out


def find_issues(info: RunInfo, rows: Rows, reduce: Reduce | None = None) -> Found:
    """The calibrated label-issue count of the whole table and this block's suggestions
    (filled into ``rows``). ``reduce``: adds the blocks' sums across ranks (a collective, in
    the same order on every rank); None for a single table."""
    given = info.given[rows.lo : rows.hi]
    fields = _numpy_fields(rows.fields)
    window = early_window(fields["pred_hist"], given, mask=rows.trained, reduce_sum=reduce)
    ev = run_evidence(fields, given, num_classes=info.spec.num_classes, window=window)
    estimate = estimate_label_noise(given, ev.count, mask=rows.trained, reduce_sum=reduce)
    suggested, confidence = suggest_labels(given, ev.suggest, tiebreak=ev.tiebreak)
    rows.suggested = np.where(rows.trained, suggested, -1)
    rows.confidence = np.where(rows.trained, confidence, 0.0)
    return Found(estimate, window, ev.count_source, ev.suggest_source)


def _issue_table(info: RunInfo, rows: Rows, flags: np.ndarray) -> Any:
    """The label-issue rows of a block, in sample order (rank them with ``rank_part``)."""
    import pyarrow as pa

    lo, hi = rows.lo, rows.hi
    table = {
        "index": np.arange(lo, hi),
        "key": np.asarray(info.keys[lo:hi], dtype=object),
        "given_label": info.given[lo:hi],
        "suggested_label": rows.suggested,
        "score": rows.score,
        "is_label_issue": flags,
        "trained": rows.trained,
        "suggestion_confidence": rows.confidence,
    }
    if info.clean is not None:
        known, noisy = _truth(info, lo, hi)
        table["is_corrupted"] = pa.array(noisy, mask=~known)  # null: clean label unknown
    return pa.table(table)


def _stats_table(info: RunInfo, rows: Rows) -> Any:
    """The per-sample stats of a block: labels, score, final prediction and every field."""
    import pyarrow as pa

    lo, hi = rows.lo, rows.hi
    cols: dict[str, Any] = {
        "index": pa.array(np.arange(lo, hi)),
        "key": pa.array(np.asarray(info.keys[lo:hi], dtype=object)),
        "given_label": pa.array(info.given[lo:hi]),
        "label_issue_score": pa.array(rows.score),
        "final_pred": pa.array(rows.pred),
    }
    if info.clean is not None:
        known, noisy = _truth(info, lo, hi)
        cols["clean_label"] = pa.array(info.clean[lo:hi])
        cols["is_corrupted"] = pa.array(noisy, mask=~known)
    cols.update(field_columns(dict(rows.fields)))
    return pa.table(cols)


def _truth(info: RunInfo, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """``(known, corrupted)`` of rows ``[lo, hi)``: the clean label is known (all, or a
    subset), and it differs from the given one."""
    assert info.clean is not None
    known = info.clean[lo:hi] >= 0
    return known, (info.clean[lo:hi] != info.given[lo:hi]) & known


def _flags(rows: Rows, cut: tuple[float, int] | None) -> np.ndarray:
    return flags_from_cut(rows.score, np.arange(rows.lo, rows.hi), rows.trained, cut)


def _cut(score: np.ndarray, trained: np.ndarray, found: Found) -> tuple[float, int] | None:
    """Where the flags stop (docs/methods.md#flags): the estimated number of issues, at the
    top of the ranking of the samples trained on."""
    return flag_cut(score, trained, num_issues=found.estimate.num_issues)


# -- the replicated layout: rank 0 writes single files -----------------------------------------
def write_outputs(out: Path, store: Store, info: RunInfo) -> dict[str, Any]:
    """Label issues, per-sample stats and summary of a run whose store is whole here (rank 0
    of a replicated store); returns the summary."""
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    rows = score_rows(info, {n: store[n] for n in store.specs}, 0)
    found = find_issues(info, rows)
    flags = _flags(rows, _cut(rows.score, rows.trained, found))
    issues = rank_part(_issue_table(info, rows, flags))
    pq.write_table(issues, out / "label_issues.parquet")
    pq.write_table(issues.slice(0, info.cfg.store.top_k), out / LABEL_ISSUES_TOP)
    atomic_write_table(_stats_table(info, rows), out / "sample_stats.parquet")
    review = _review_counts(info, rows, flags, None)
    return _write_summary(out, store, info, rows, found, review)


# -- the partitioned layout: every rank writes its part ----------------------------------------
def write_rank_outputs(
    out: Path, store: Store, info: RunInfo, comm_device: torch.device
) -> dict[str, Any] | None:
    """This rank's part of ``sample_stats/`` and ``label_issues/`` in ``out`` (a collective:
    every rank calls it, each with its own directory); rank 0 also writes the parts' indexes,
    the merged top-k and ``summary.json``, and returns the summary (None elsewhere).
    ``comm_device``: where the collectives run (the CUDA device under NCCL)."""
    lo = store.owned_range()[0]
    rows = score_rows(info, {n: store.local(n) for n in store.specs}, lo)

    def reduce(a: np.ndarray) -> np.ndarray:
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(comm_device)
        return collectives.all_reduce_sum(t).cpu().numpy()

    found = find_issues(info, rows, reduce)
    whole = _gather_rows(rows, store.num_samples, comm_device)
    cut = _cut(whole.score, whole.trained, found) if whole is not None else None
    cut = collectives.broadcast_object(cut)
    flags = _flags(rows, cut)
    review = _review_counts(info, rows, flags, reduce)
    issues = rank_part(_issue_table(info, rows, flags))
    stats = _stats_table(info, rows)
    part = collectives.rank()
    entries = (
        write_part(out / SAMPLE_STATS_DIR, part, stats, lo),
        write_part(out / LABEL_ISSUES_DIR, part, issues, lo),
    )
    head = issues.slice(0, info.cfg.store.top_k)
    # every rank's part entries and head (at most top_k rows each, small)
    gathered: list[Any] = collectives.all_gather_object(
        (entries, head, stats.schema, issues.schema)
    )
    if whole is None:
        return None
    write_index(out / SAMPLE_STATS_DIR, [g[0][0] for g in gathered], gathered[0][2])
    write_index(out / LABEL_ISSUES_DIR, [g[0][1] for g in gathered], gathered[0][3])
    top = _merge_heads([g[1] for g in gathered], info.cfg.store.top_k)
    atomic_write_table(top, out / LABEL_ISSUES_TOP)
    return _write_summary(out, store, info, whole, found, review)


def _merge_heads(heads: list[Any], k: int) -> Any:
    """The ``k`` most likely issues overall from each ranked part's first ``k`` rows."""
    import pyarrow as pa

    schema = heads[0].schema
    return order_issues(pa.concat_tables([h.cast(schema) for h in heads])).slice(0, k)


def _gather_rows(rows: Rows, num_samples: int, device: torch.device) -> Rows | None:
    """Every rank's score, trained, prediction and read columns, whole on rank 0 (None
    elsewhere; a collective). The fields stay on their ranks."""
    columns = [
        torch.from_numpy(rows.score),
        torch.from_numpy(rows.trained),
        torch.from_numpy(rows.pred.astype(np.int64)),
        torch.from_numpy(rows.read),
    ]
    whole = [collectives.gather_cat(c, device) for c in columns]
    if collectives.rank() != 0:
        return None
    score, trained, pred, read = (w.numpy() for w in whole)
    assert len(score) == num_samples
    empty = np.zeros(0, dtype=np.int64)
    return Rows(0, num_samples, {}, score, empty, np.zeros(0), trained, pred, read)


# -- the summary -------------------------------------------------------------------------------
def _review_counts(
    info: RunInfo, rows: Rows, flags: np.ndarray, reduce: Reduce | None
) -> np.ndarray:
    """``[flagged, flagged suggesting their given label, flagged corrupted, flagged corrupted
    whose suggestion is the clean label]`` over every block (the last two 0 without truth)."""
    given = info.given[rows.lo : rows.hi]
    counts = [flags.sum(), (flags & (rows.suggested == given)).sum(), 0, 0]
    if info.clean is not None:
        _, noisy = _truth(info, rows.lo, rows.hi)
        hit = flags & noisy
        counts[2:] = [hit.sum(), (hit & (rows.suggested == info.clean[rows.lo : rows.hi])).sum()]
    total = np.asarray(counts, dtype=np.float64)
    return reduce(total) if reduce is not None else total


def issue_figures(info: RunInfo, found: Found, review: np.ndarray) -> dict[str, Any]:
    """The summary's label-issue count, estimated noise and review figures
    (docs/methods.md#flags), with the realised noise per class where it is known."""
    est = found.estimate
    flagged, self_suggested, flagged_noisy, right = (int(x) for x in review)
    out: dict[str, Any] = {
        "num_label_issues": flagged,
        "noise_rate_estimated": est.rate,
        "noise_rate_estimated_per_class": [
            None if np.isnan(r) else float(r) for r in est.rate_per_class
        ],
        "label_issue_count_source": found.count_source,
        "early_learning_epochs": found.window,
        "suggested_label_source": found.suggest_source,
        "flagged_suggesting_given_label": self_suggested,
    }
    if info.clean is not None:
        known = info.clean >= 0
        noisy = known & (info.clean != info.given)
        c = info.spec.num_classes
        per = np.bincount(info.given[known], minlength=c)
        wrong = np.bincount(info.given[noisy], minlength=c)
        out["noise_rate_realised_per_class"] = [
            float(w / p) if p else None for w, p in zip(wrong, per, strict=True)
        ]
        if flagged:
            out["label_issue_flag_precision"] = flagged_noisy / flagged
        if noisy.any():
            out["label_issue_flag_recall"] = flagged_noisy / int(noisy.sum())
        if flagged_noisy:
            out["suggestion_acc_on_flagged_corrupted"] = right / flagged_noisy
    return out


def _write_summary(
    out: Path, store: Store, info: RunInfo, rows: Rows, found: Found, review: np.ndarray
) -> dict[str, Any]:
    summary = summarize(store, info, rows)
    summary.update(issue_figures(info, found, review))
    summary["bad_samples"] = info.bad_samples
    # The skipped samples by set, key (zero-padded index, or a shard file) and reason.
    summary["bad_sample_list"] = (info.bad_sample_list or [])[:MAX_LISTED_BAD]
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def summarize(store: Store, info: RunInfo, rows: Rows) -> dict[str, Any]:
    """The run's summary figures (``summary.json`` less the bad-sample fields), from the
    columns of every row (``rows`` covers all samples)."""
    given, clean, history, cfg = info.given, info.clean, info.history, info.cfg
    pred, read, seen, score = rows.pred, rows.read, rows.trained, rows.score
    test_accs = [h["test_acc"] for h in history if h.get("test_acc") is not None]
    val_accs = [h.get("val_acc", float("nan")) for h in history]
    best_val = int(np.nanargmax(val_accs)) if np.isfinite(val_accs).any() else None
    known = (clean >= 0) if clean is not None else None
    summary: dict[str, Any] = {
        "method": cfg.method.name,
        "dataset": info.spec.dataset,
        "num_train": len(given),
        "num_classes": info.spec.num_classes,
        "noise_kind": cfg.noise.kind,
        "noise_rate_realised": info.spec.noise_rate,
        "num_workers": collectives.world_size(),
        "epochs": len(history),
        "test_acc": history[-1].get("test_acc") if history else None,
        "best_test_acc": max(test_accs) if test_accs else None,
        "best_epoch": int(np.argmax(test_accs)) if test_accs else None,
        # Model selection on the validation set (the protocol): the epoch with the best val_acc
        # and the test accuracy at that epoch.
        "val_acc": history[-1].get("val_acc") if history else None,
        "best_val_acc": val_accs[best_val] if best_val is not None else None,
        "best_val_epoch": best_val,
        "test_acc_at_best_val": (
            history[best_val].get("test_acc") if best_val is not None else None
        ),
        "train_acc_given": float((pred[read] == given[read]).mean()) if read.any() else None,
        "memorized": None,
        "clean_train_acc": None,
        "label_issue_auroc": None,
        "label_issue_precision_at_k": None,
        "label_issue_score": info.method.score_description,
        # How many training samples the truth-based metrics (noise rate, memorized, AUROC,
        # clean_train_acc) are measured on: all of them, or those with a known clean label.
        "num_clean_known": int(known.sum()) if known is not None else None,
        "history": history,
        # Class-balanced epochs may leave samples never trained on; their label-issue scores
        # carry no training signal (e.g. ELR's target is still 0): the ranking metrics skip them.
        "num_train_seen": int(seen.sum()),
    }
    # The store's layout and the bytes each method's per-sample state costs (docs/benchmarks.md).
    per_sample = store.bytes_per_sample()
    summary["store"] = {
        "backend": store.backend,
        "dtype": cfg.store.dtype,
        "bytes_per_sample": sum(per_sample.values()),
        "bytes_per_sample_by_field": per_sample,
    }
    if clean is not None:
        summary.update(_truth_metrics(given, clean, pred, read, seen, score))
    return summary


def _truth_metrics(
    given: np.ndarray,
    clean: np.ndarray,
    pred: np.ndarray,
    read: np.ndarray,
    seen: np.ndarray,
    score: np.ndarray,
) -> dict[str, float]:
    """Clean accuracy, memorization and label-issue ranking quality, on the samples whose
    clean label is known."""
    known = clean >= 0
    is_noisy = (clean != given) & known
    out: dict[str, float] = {}
    if not (known & read).any():
        return out
    ok = known & read
    out["clean_train_acc"] = float((pred[ok] == clean[ok]).mean())
    if (is_noisy & read).any():
        noisy = is_noisy & read
        out["memorized"] = float((pred[noisy] == given[noisy]).mean())
    scored = known & seen
    k, m = int(is_noisy[scored].sum()), int(scored.sum())
    order = rank_by_score(score, last=~seen)
    if k:
        ranked = order[scored[order]]  # the ranking restricted to the scored subset
        out["label_issue_precision_at_k"] = float(is_noisy[ranked[:k]].mean())
    if 0 < k < m:
        out["label_issue_auroc"] = auroc(score[scored], is_noisy[scored])
    return out
