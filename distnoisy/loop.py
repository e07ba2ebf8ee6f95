"""The per-worker building blocks of training: plain torch + torch.distributed, no Ray.

A launcher (Ray Train, or the in-process/multiprocess local launcher) calls :func:`run_worker`
on every rank with a :class:`WorkerContext` that supplies ``report`` (metrics + optional
checkpoint, once per epoch on every rank) and ``restore`` (the latest checkpoint, if any);
:class:`distnoisy.trainer.Trainer` runs the recipe from the pieces here: one training step,
prediction and accuracy passes, the bad-sample and class-mix checks, the run's outputs.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from distnoisy import dist
from distnoisy.config import Config
from distnoisy.data.mixing import (
    POOR_MIX,
    expected_distinct_classes,
    poor_mix_message,
)
from distnoisy.data.prepare import DataSpec
from distnoisy.label_issues import is_label_issue, rank_by_score
from distnoisy.methods import Method
from distnoisy.methods.base import Networks
from distnoisy.metrics import auroc
from distnoisy.models import build_model

# Re-exported for callers: the hot path lives in distnoisy.step (torch-only imports).
from distnoisy.step import declare_run_fields, run_field_specs, train_step  # noqa: F401
from distnoisy.store import Store
from distnoisy.store.export import (
    LABEL_ISSUES_DIR,
    LABEL_ISSUES_TOP,
    SAMPLE_STATS_DIR,
    write_top_k,
)

log = logging.getLogger(__name__)

# Skipped samples listed by name in summary.json (all are counted).
MAX_LISTED_BAD = 1000
OUTPUTS_DIR = "outputs"


@dataclass
class WorkerContext:
    """What a launcher gives the loop.

    ``report(metrics, checkpoint_dir)`` is called by every rank once per epoch; only rank 0
    passes a directory. ``restore()`` is a context manager yielding the latest checkpoint
    directory or None.
    """

    rank: int
    world_size: int
    device: torch.device
    report: Callable[[dict[str, float], Path | None], None]
    restore: Callable[[], contextlib.AbstractContextManager[Path | None]]


@contextlib.contextmanager
def no_checkpoint() -> Iterator[Path | None]:
    yield None


def training_labels(spec: DataSpec) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Given labels, clean labels (or None) and keys of the training set, by global index."""
    from distnoisy.data.noise import load_label_file
    from distnoisy.data.shards import read_labels, read_manifest

    # Clean labels may be known for a subset only (-1 elsewhere), e.g. Clothing1M's overlap.
    labels, clean, keys = read_labels(read_manifest(spec.train_dir), partial_clean=True)
    if spec.label_file is not None:
        lf = load_label_file(spec.label_file, spec.num_train, spec.num_classes)
        labels = lf.labels
        if lf.clean_labels is not None:
            clean = lf.clean_labels
    return np.asarray(labels, dtype=np.int64), clean, list(keys)


def network_builder(cfg: Config, num_classes: int, in_channels: int) -> Callable[..., nn.Module]:
    """``build(name=None, weights=None)``: ``model.name`` with ``model.weights`` by default."""

    def build(name: str | None = None, weights: str | None = None) -> nn.Module:
        if name is None:
            name, weights = cfg.model.name, cfg.model.weights
        return build_model(name, num_classes, in_channels, weights)

    return build


def make_optimizer(cfg: Config, params: Any) -> torch.optim.Optimizer:
    """The ``train.optimizer`` (SGD with momentum, or Adam) over ``params``."""
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


def make_scheduler(cfg: Config, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The ``train.scheduler`` of ``opt``, stepped once per epoch (constant by default)."""
    t = cfg.train
    if t.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs)
    if t.scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=list(t.milestones), gamma=t.gamma
        )
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)


@torch.no_grad()
def predict(
    method: Method, nets: Networks, stream: Any, device: torch.device
) -> tuple[Tensor, ...]:
    """(index, probs) of this rank's share of an eval stream, from the method's prediction."""
    for net in nets.values():
        net.eval()
    idx, probs = [], []
    for batch in stream.batches():
        logits = method.predict(nets, batch["image"].to(device, non_blocking=True))
        idx.append(batch["index"])
        probs.append(torch.softmax(logits.float(), dim=1).cpu())
    for net in nets.values():
        net.train()
    if not idx:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, 0)
    return torch.cat(idx), torch.cat(probs)


def accuracies(
    method: Method, nets: Networks, stream: Any, labels: list[Tensor], device: torch.device
) -> list[float]:
    """Accuracy against each label vector, from one prediction pass (all ranks)."""
    index, probs = predict(method, nets, stream, device)
    pred = probs.argmax(1) if len(index) else torch.zeros(0, dtype=torch.long)
    counts = [float((pred == lab[index]).sum()) for lab in labels] + [float(len(index))]
    totals = dist.all_reduce_sum(torch.tensor(counts, device=device))
    n = totals[-1]
    return [float(t / n) if n > 0 else float("nan") for t in totals[:-1]]


def check_bad_samples(stream: Any, n: int, cfg: Config, comm_device: torch.device) -> int:
    """Unusable training samples met so far (all ranks); abort past ``data.max_bad_fraction``.

    Each sample counts once however many ranks or passes met it, and a truncated shard counts
    every sample it lost (:func:`distnoisy.data.stream.count_bad`): those are never trained on.
    Every rank gathers the same records and gets the same total, so every rank raises together
    (no rank left waiting in a collective).
    """
    from distnoisy.data.stream import count_bad, samples_lost

    del comm_device  # the records are gathered as objects (kept for the trainer's call)
    records = [
        ("train", k, r) for part in dist.all_gather_object(stream.bad_samples) for k, r in part
    ]
    total = count_bad(records)
    limit = cfg.data.max_bad_fraction * n
    if total > limit:
        from distnoisy.errors import DataError

        # The records that lost the most samples first: a truncated shard before a bad image.
        named = sorted(
            dict.fromkeys((k, r) for _, k, r in records), key=lambda kr: -samples_lost(kr[1])
        )
        first = "; ".join(f"{k}: {r}" for k, r in named[:3])
        raise DataError(
            f"{total} unusable training samples, more than data.max_bad_fraction="
            f"{cfg.data.max_bad_fraction:g} of {n}; first: {first}. "
            "Repair or re-convert the data, or raise data.max_bad_fraction"
        )
    return total


def check_class_mix(
    mean_distinct: float, class_counts: np.ndarray, batch_size: int, cfg: Config, *, warn: bool
) -> float:
    """``batch_class_mix`` of an epoch's batches; warns (once) when the stream cannot mix."""
    expected = expected_distinct_classes(class_counts, batch_size)
    if warn and mean_distinct < POOR_MIX * expected:
        log.warning(
            poor_mix_message(
                mean_distinct,
                expected,
                batch_size=batch_size,
                open_shards=cfg.data.open_shards,
                buffer=cfg.data.shuffle_buffer,
            )
        )
    return mean_distinct / expected


def gather_bad_samples(*named: tuple[str, Any]) -> list[dict[str, str]]:
    """Distinct skipped samples of every rank's streams (a collective: call on all ranks).

    One entry per ``(set, key, reason)``; count them with :func:`count_bad_samples`.
    """
    local = [
        {"set": name, "key": key, "reason": reason}
        for name, stream in named
        if stream is not None
        for key, reason in stream.bad_samples
    ]
    seen: dict[tuple[str, str, str], None] = {}
    for part in dist.all_gather_object(local):
        for item in part:  # type: ignore[attr-defined]
            seen.setdefault((item["set"], item["key"], item["reason"]), None)
    return [{"set": a, "key": b, "reason": c} for a, b, c in seen]


def count_bad_samples(bad_list: list[dict[str, str]]) -> int:
    """Distinct bad samples of a :func:`gather_bad_samples` list: each ``(set, key)`` once
    (the training stream and the final pass over the training set meet the same corrupt
    image), a truncated shard as the number of samples it lost."""
    from distnoisy.data.stream import count_bad

    return count_bad((b["set"], b["key"], b["reason"]) for b in bad_list)


def _write_outputs(
    out: Path,
    method: Method,
    store: Store,
    given: np.ndarray,
    clean: np.ndarray | None,
    keys: list[str],
    history: list[dict[str, float]],
    spec: DataSpec,
    cfg: Config,
    bad_samples: int = 0,
    bad_sample_list: list[dict[str, str]] | None = None,
) -> dict[str, Any]:
    """Label-issue table, per-sample export and summary of the finished run (rank 0)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    n = len(given)
    probs = store["final_prob"].numpy()
    loss_hist = store["loss_hist"].numpy()
    score, suggested = method.label_issue_scores(given, probs, loss_hist)
    # Truth-based metrics use the samples whose clean label is known (all, or a subset).
    known = (clean >= 0) if clean is not None else None
    is_noisy = (clean != given) & known if clean is not None else None
    # Samples never trained on (lost in a truncated shard, or never drawn by class-balanced
    # epochs) have scores without training signal: they rank last, unflagged, with no suggestion.
    trained = store["train_pred"].numpy() >= 0
    order = rank_by_score(score, last=~trained)
    # Flag the estimated number of issues among the samples trained on (docs/methods.md#flags).
    flagged = is_label_issue(score, trained)
    suggested = np.where(trained, np.asarray(suggested, dtype=np.int64), -1)
    table = {
        "index": np.arange(n)[order],
        "key": np.asarray(keys, dtype=object)[order],
        "given_label": given[order],
        "suggested_label": suggested[order],
        "score": np.asarray(score, dtype=np.float64)[order],
        "is_label_issue": flagged[order],
        "trained": trained[order],
    }
    if is_noisy is not None:
        # null where the clean label is unknown
        table["is_corrupted"] = pa.array(is_noisy[order], mask=~known[order])
    issues = pa.table(table)

    pred = probs.argmax(1)
    extra: dict[str, Any] = {"key": np.asarray(keys, dtype=object), "given_label": given}
    extra["label_issue_score"] = np.asarray(score, dtype=np.float64)
    extra["final_pred"] = pred
    if clean is not None:
        extra["clean_label"] = clean
        extra["is_corrupted"] = pa.array(is_noisy, mask=~known)
    if store.backend == "partitioned":
        _write_partitioned(out, store, issues, order, extra, dist.world_size(), cfg.store.top_k)
    else:
        pq.write_table(issues, out / "label_issues.parquet")
        pq.write_table(issues.slice(0, cfg.store.top_k), out / LABEL_ISSUES_TOP)
        store.export_parquet(out / "sample_stats.parquet", extra=extra)

    summary = _summary(method, store, given, clean, pred, score, order, history, spec, cfg)
    summary["bad_samples"] = bad_samples
    # The skipped samples by set, key (zero-padded index, or a shard file) and reason.
    summary["bad_sample_list"] = (bad_sample_list or [])[:MAX_LISTED_BAD]
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=float))
    return summary


def _write_partitioned(
    out: Path,
    store: Store,
    issues: Any,
    order: np.ndarray,
    extra: dict[str, Any],
    parts: int,
    top_k: int,
) -> None:
    """``sample_stats/`` and ``label_issues/`` as one part per rank's row range, each part of
    the label issues ranked on its own, and their merged top-k (``label_issues_top.parquet``).

    Written here by rank 0 from the gathered store, part by part (the outputs travel in rank
    0's checkpoint); :mod:`distnoisy.store.export` is the same layout that ranks write in
    parallel (``python -m distnoisy.bench store``).
    """
    import pyarrow as pa

    from distnoisy.store.export import field_columns, rank_part, write_index, write_part

    n = store.num_samples
    per = -(-n // parts)
    position = np.empty(n, dtype=np.int64)
    position[order] = np.arange(n)  # where each sample's row sits in the ranked table
    stats_parts, issue_parts, stats_schema, issue_schema = [], [], None, None
    for k, lo in enumerate(range(0, n, per)):
        hi = min(lo + per, n)
        cols: dict[str, Any] = {"index": pa.array(np.arange(lo, hi))}
        cols.update({name: v[lo:hi] for name, v in extra.items()})
        cols.update(field_columns({name: store[name][lo:hi] for name in store.specs}))
        stats = pa.table(cols)
        stats_parts.append(write_part(out / SAMPLE_STATS_DIR, k, stats, lo))
        ranked = rank_part(issues.take(pa.array(position[lo:hi])))
        issue_parts.append(write_part(out / LABEL_ISSUES_DIR, k, ranked, lo))
        stats_schema, issue_schema = stats.schema, ranked.schema
    write_index(out / SAMPLE_STATS_DIR, stats_parts, stats_schema)
    write_index(out / LABEL_ISSUES_DIR, issue_parts, issue_schema)
    write_top_k(out / LABEL_ISSUES_DIR, out / LABEL_ISSUES_TOP, top_k)


def _summary(
    method: Method,
    store: Store,
    given: np.ndarray,
    clean: np.ndarray | None,
    pred: np.ndarray,
    score: np.ndarray,
    order: np.ndarray,
    history: list[dict[str, float]],
    spec: DataSpec,
    cfg: Config,
) -> dict[str, Any]:
    """The run's summary figures (``summary.json`` less the bad-sample fields)."""
    n = len(given)
    known = (clean >= 0) if clean is not None else None
    is_noisy = (clean != given) & known if clean is not None else None
    # The final predictions exist for the samples the final pass could read (not those lost in
    # a damaged shard, whose probability rows stay zero).
    read = store["final_prob"].numpy().sum(1) > 0
    test_accs = [h["test_acc"] for h in history if h.get("test_acc") is not None]
    val_accs = [h.get("val_acc", float("nan")) for h in history]
    best_val = int(np.nanargmax(val_accs)) if np.isfinite(val_accs).any() else None
    summary: dict[str, Any] = {
        "method": cfg.method.name,
        "dataset": spec.dataset,
        "num_train": n,
        "num_classes": spec.num_classes,
        "noise_kind": cfg.noise.kind,
        "noise_rate_realised": spec.noise_rate,
        "num_workers": dist.world_size(),
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
        "label_issue_score": method.score_description,
        # How many training samples the truth-based metrics (noise rate, memorized, AUROC,
        # clean_train_acc) are measured on: all of them, or those with a known clean label.
        "num_clean_known": int(known.sum()) if known is not None else None,
        "history": history,
    }
    # Class-balanced epochs may leave samples never trained on; their label-issue scores carry
    # no training signal (e.g. ELR's target is still 0), so the ranking metrics skip them.
    seen = store["train_pred"].numpy() >= 0
    summary["num_train_seen"] = int(seen.sum())
    # The store's layout and the bytes each method's per-sample state costs (docs/benchmarks.md).
    per_sample = store.bytes_per_sample()
    summary["store"] = {
        "backend": store.backend,
        "dtype": cfg.store.dtype,
        "bytes_per_sample": sum(per_sample.values()),
        "bytes_per_sample_by_field": per_sample,
    }
    if is_noisy is not None and (known & read).any():
        ok = known & read
        summary["clean_train_acc"] = float((pred[ok] == clean[ok]).mean())
        if (is_noisy & read).any():
            noisy = is_noisy & read
            summary["memorized"] = float((pred[noisy] == given[noisy]).mean())
        scored = known & seen
        k, m = int(is_noisy[scored].sum()), int(scored.sum())
        if k:
            ranked = order[scored[order]]  # the ranking restricted to the scored subset
            summary["label_issue_precision_at_k"] = float(is_noisy[ranked[:k]].mean())
        if 0 < k < m:
            summary["label_issue_auroc"] = auroc(score[scored], is_noisy[scored])
    return summary
