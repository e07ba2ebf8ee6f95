"""The analysis of a set of finished runs: checks, frequency buckets, per-bucket statistics.

Order matters for the user: every input check (runs exist and finished, one dataset, a history
in every store, a clean reference, a bucket count that fits) runs before any feature is
computed and before the output directory exists (docs/analysis.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np

from distnoisy.analyze.buckets import (
    RunSamples,
    add_excess_error,
    assign_buckets,
    bucket_edges,
    bucket_stats,
)
from distnoisy.analyze.config import AnalyzeConfig
from distnoisy.analyze.embed import Embedding, run_embeddings
from distnoisy.analyze.knn import check_k, train_test_density
from distnoisy.analyze.memorization import first_memorized_epoch, stays_memorized
from distnoisy.core.errors import ConfigError
from distnoisy.finished.runs import FinishedRun, open_run

log = logging.getLogger(__name__)

HISTORY_COLUMNS = ("given_label", "clean_label", "final_pred", "pred_hist", "loss_hist")
#: What :func:`load_history` keeps of each training sample (besides its key).
PER_SAMPLE = ("given_label", "clean_label", "final_pred", "first_epoch", "stays")


@dataclass
class Analysis:
    """The result: per-run labels, per-bucket rows and the bucket edges."""

    labels: list[str]
    rows: dict[str, list[dict[str, Any]]]
    edges: np.ndarray
    dataset: str
    frequency: str
    run_ids: dict[str, str | None]
    reference: str | None


def _dataset_identity(run: FinishedRun) -> tuple:
    """What must agree between compared runs: the data, not the noise or the method."""
    d = run.config.data
    extra = tuple(sorted(vars(d.longtail).items())) if d.name == "longtail" else ()
    return (d.name, d.urls, d.test_fraction, d.val_fraction, d.train_size, extra)


def check_same_dataset(runs: list[FinishedRun]) -> None:
    first = runs[0]
    for run in runs[1:]:
        if _dataset_identity(run) != _dataset_identity(first):
            raise ConfigError(
                f"runs of different datasets in one comparison: {first.run_dir} trained on "
                f"{first.config.data.name} ({first.summary.get('num_train')} samples), "
                f"{run.run_dir} on {run.config.data.name} ({run.summary.get('num_train')}); "
                "analyse runs of one dataset together"
            )


def load_history(run: FinishedRun, keys: bool = False) -> dict[str, np.ndarray]:
    """Per-sample memorisation of a run, checked: a history and known clean labels.

    Read part by part (:meth:`FinishedRun.iter_table`): each batch's ``N x epochs`` loss and
    prediction histories are reduced to the first memorised epoch and whether it stays
    memorised, so only per-sample scalars (about 40 bytes a sample; and the keys with
    ``keys=True``, which only ``analysis.frequency=subpopulation`` reads) are held for the
    whole set.
    """
    kept: dict[str, list[np.ndarray]] = {c: [] for c in (*PER_SAMPLE, *(("key",) if keys else ()))}
    visited = history_left = False
    columns = (*HISTORY_COLUMNS, *(("key",) if keys else ()))
    for part in run.iter_table(columns=columns):
        given, clean = part["given_label"], part["clean_label"]
        if (clean < 0).any():
            raise ConfigError(
                f"run {run.run_dir}: clean labels are not known for every training sample, so "
                "corrupted samples cannot be told apart; analyse runs with synthetic noise"
            )
        pred_hist = part["pred_hist"]
        visited = visited or bool((pred_hist >= 0).any())
        history_left = history_left or bool(np.isfinite(part["loss_hist"]).any())
        first = first_memorized_epoch(pred_hist, given, clean)
        derived = {"first_epoch": first, "stays": stays_memorized(pred_hist, given, first)}
        for c in kept:
            kept[c].append(derived[c] if c in derived else part[c])
    if not (visited and history_left):
        raise ConfigError(
            f"run {run.run_dir}: its store holds no loss/prediction history (no epoch visited "
            "any sample); analyse a run that trained at least one epoch"
        )
    return {c: np.concatenate(v) for c, v in kept.items()}


def check_reference(ref: FinishedRun) -> None:
    rate = ref.summary.get("noise_rate_realised")
    if ref.config.noise.kind != "none" and rate not in (None, 0, 0.0):
        raise ConfigError(
            f"reference={ref.run_dir} trained on noisy labels (noise.kind="
            f"{ref.config.noise.kind}, realised rate {rate:.1%}); the reference must be the same "
            "job on clean labels: train it with noise.kind=none"
        )


def _label(run: FinishedRun, taken: set[str]) -> str:
    """A short unique name for a run in tables: its method, then its directory name."""
    name = run.config.method.name
    return name if name not in taken else f"{name} ({run.run_dir.name})"


def _frequency_scores(
    cfg: AnalyzeConfig, emb: dict[str, Embedding], runs_keys: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(train, test) frequency scores from one run's embeddings (or the longtail truth)."""
    a = cfg.analysis
    if a.frequency == "subpopulation":
        from distnoisy.data.longtail import parse_keys

        assert runs_keys is not None
        train_ids = parse_keys(runs_keys)
        sizes = np.bincount(train_ids)
        test_ids = parse_keys(emb["test"].keys)
        return sizes[train_ids].astype(float), sizes[test_ids].astype(float)
    tr, te = emb["train"].features, emb["test"].features
    k = dict(k=a.k, metric=a.metric, num_workers=a.num_workers, search=a.search, probes=a.probes)
    return train_test_density(tr, te, **k)


def _run_samples(
    hist: dict[str, np.ndarray], emb: Embedding, train_b: np.ndarray, test_b: np.ndarray
) -> RunSamples:
    given, clean = hist["given_label"], hist["clean_label"]
    raw = np.asarray(emb.logits, dtype=np.float32)  # the test split's: small
    logits = raw - raw.max(axis=1, keepdims=True)
    prob = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return RunSamples(
        train_bucket=train_b,
        corrupted=given != clean,
        memorized_final=hist["final_pred"] == given,
        first_epoch=hist["first_epoch"],
        stays=hist["stays"],
        test_bucket=test_b,
        test_correct=raw.argmax(axis=1) == emb.labels,
        test_confidence=prob.max(axis=1),
    )


def _open_all(cfg: AnalyzeConfig) -> tuple[list[FinishedRun], FinishedRun | None, Any]:
    uri = cfg.tracking.uri
    runs = [open_run(r, uri) for r in cfg.run]
    ref = open_run(cfg.reference, uri) if cfg.reference else None
    f = cfg.analysis.features_from
    feat = None if f in ("reference", "self", "pixels") else open_run(f, uri)
    check_same_dataset(runs + [r for r in (ref, feat) if r is not None])
    if cfg.analysis.frequency == "subpopulation" and runs[0].config.data.name != "longtail":
        raise ConfigError(
            f"analysis.frequency=subpopulation needs runs on data.name=longtail (the true "
            f"subpopulations are known only there), not {runs[0].config.data.name}; use "
            "analysis.frequency=knn"
        )
    if ref is not None:
        check_reference(ref)
    return runs, ref, feat


def _fixed_features(
    cfg: AnalyzeConfig,
    everyone: list[FinishedRun],
    embs: list[dict[str, Embedding]],
    ref: FinishedRun | None,
    feat: FinishedRun | None,
) -> dict[str, Embedding] | None:
    """The embeddings every run is bucketed in, or None for ``features_from=self``."""
    choice = cfg.analysis.features_from
    if choice == "self":
        return None
    if choice == "pixels":
        return run_embeddings(everyone[0], features="pixels")
    if choice == "reference":
        feat = ref if ref is not None else everyone[0]
    for run, emb in zip(everyone, embs, strict=True):
        if feat is not None and run.run_dir == feat.run_dir:
            return emb
    return run_embeddings(feat)


@dataclass
class Inputs:
    """The checked inputs of an analysis: the runs (the reference last), their labels in the
    tables, their per-sample histories, and the run whose features bucket them (or None)."""

    runs: list[FinishedRun]
    labels: list[str]
    hists: list[dict[str, np.ndarray]]
    reference: FinishedRun | None
    features_run: FinishedRun | None

    @property
    def run_ids(self) -> dict[str, str | None]:
        """``{label: MLflow run id}`` of the analysed runs."""
        return {lab: r.mlflow_run_id for lab, r in zip(self.labels, self.runs, strict=True)}


def check_inputs(cfg: AnalyzeConfig) -> Inputs:
    """Every input check (the module docstring's list); raises a one-line ``ConfigError``
    before any feature is computed."""
    runs, ref, feat = _open_all(cfg)
    everyone = runs + ([ref] if ref is not None else [])
    with_keys = cfg.analysis.frequency == "subpopulation"
    hists = [load_history(r, keys=with_keys) for r in everyone]
    n_train = len(hists[0]["given_label"])
    if cfg.analysis.buckets > n_train:
        bucket_edges(np.zeros(n_train), cfg.analysis.buckets)  # raises the one-line error
    if cfg.analysis.frequency == "knn":
        check_k(n_train, cfg.analysis.k, cfg.analysis.metric, is_self=True)
    labels: list[str] = []
    for run in runs:
        labels.append(_label(run, set(labels)))
    if ref is not None:
        labels.append("reference (clean labels)")
    return Inputs(everyone, labels, hists, ref, feat)


def analyse(cfg: AnalyzeConfig, inputs: Inputs | None = None) -> Analysis:
    """Run the whole analysis described by ``cfg`` (no files written) on its checked inputs
    (:func:`check_inputs`, run here when not given)."""
    inputs = check_inputs(cfg) if inputs is None else inputs
    everyone, ref, labels = inputs.runs, inputs.reference, inputs.labels
    embs = [run_embeddings(r) for r in everyone]
    fixed = _fixed_features(cfg, everyone, embs, ref, inputs.features_run)
    rows: dict[str, list[dict[str, Any]]] = {}
    shared = (
        _frequency_scores(cfg, fixed, inputs.hists[0].get("key")) if fixed is not None else None
    )
    for label, hist, emb in zip(labels, inputs.hists, embs, strict=True):
        train_s, test_s = shared or _frequency_scores(cfg, emb, hist.get("key"))
        edges = bucket_edges(train_s, cfg.analysis.buckets)
        samples = _run_samples(
            hist, emb["test"], assign_buckets(train_s, edges), assign_buckets(test_s, edges)
        )
        rows[label] = bucket_stats(samples, cfg.analysis.buckets)
        for row, lo, hi in zip(rows[label], [-np.inf, *edges], [*edges, np.inf], strict=True):
            row.update(score_lo=float(lo), score_hi=float(hi))
    if ref is not None:
        for label in labels[:-1]:
            add_excess_error(rows[label], rows[labels[-1]])
    return Analysis(
        labels=labels,
        rows=rows,
        edges=edges,
        dataset=everyone[0].config.data.name,
        frequency=cfg.analysis.frequency,
        run_ids=inputs.run_ids,
        reference=labels[-1] if ref is not None else None,
    )
