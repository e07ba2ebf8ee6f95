"""One post-training job: open the run, check the input, extract features, rounds, outputs.

Every check (the run, its weights and tables, the dataset, the config) happens before the
output directory is created. The job is tracked as an MLflow child run of the source run
(:func:`~distnoisy.tracking.lifecycle.tracked_run`: FINISHED, FAILED on any error, KILLED on
Ctrl-C or SIGTERM; never left RUNNING).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from distnoisy.core.errors import ConfigError
from distnoisy.finished.runs import FinishedRun, open_run
from distnoisy.posttrain import outputs
from distnoisy.posttrain.config import PostTrainConfig, save
from distnoisy.posttrain.rounds import (
    RoundsInput,
    RoundsResult,
    Split,
    run_rounds,
    selection_metric,
)

if TYPE_CHECKING:
    from distnoisy.launch.ranks import RankGroup

log = logging.getLogger("distnoisy.posttrain")

#: The headline precision is measured on the first this share of the training set removed.
FIRST_SHARE = 0.2


@dataclasses.dataclass
class Prepared:
    """The checked inputs: the run, its data description and where outputs go."""

    run: FinishedRun
    spec: Any
    out_dir: Path
    #: The weights the features come from, ``final`` or ``best`` (``auto`` resolved).
    weights: str = "final"


def resolve_weights(requested: str, run_dir: Path) -> str:
    """``final`` or ``best``; ``auto`` is ``best`` when the run kept its best-by-validation
    weights (``weights_best.pt``: it had a validation set), else ``final``."""
    if requested != "auto":
        return requested
    return "best" if (Path(run_dir) / "weights_best.pt").is_file() else "final"


def check(cfg: PostTrainConfig) -> Prepared:
    """Resolve and check everything; raises :class:`ConfigError` (one line) before any write."""
    from distnoisy.finished.runs import resolve_run_dir

    p = cfg.posttrain
    weights = resolve_weights(p.weights, resolve_run_dir(cfg.run, cfg.tracking.uri)[0])
    run = open_run(
        cfg.run,
        cfg.tracking.uri,
        require=(
            "config.yaml",
            "summary.json",
            "weights_best.pt" if weights == "best" else "weights.pt",
            "sample_stats.parquet",
        ),
    )
    if cfg.data.name is not None and cfg.data.name != run.config.data.name:
        raise ConfigError(
            f"run {run.run_dir} was trained on data.name={run.config.data.name}, not "
            f"data.name={cfg.data.name}; pass a run of that dataset or drop data.name"
        )
    if cfg.data.root is not None:
        data = dataclasses.replace(run.config.data, root=cfg.data.root)
        run = dataclasses.replace(run, config=dataclasses.replace(run.config, data=data))
    if p.score == "loss_history" and run.config.train.epochs < 1:
        raise ConfigError("posttrain.score=loss_history needs the run's loss history")
    from distnoisy.data.prepare import prepare_data

    spec = prepare_data(run.config)  # the run's data, validated (ConfigError/DataError)
    out_dir = Path(cfg.output_dir or run.run_dir / f"posttrain-{p.score}").resolve()
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output_dir={out_dir} is a file; pass a directory")
    if p.finetune_epochs > 0:
        _check_finetune(cfg, run, out_dir)
    return Prepared(run, spec, out_dir, weights)


def _check_finetune(cfg: PostTrainConfig, run: FinishedRun, out_dir: Path) -> None:
    """The fine-tune's training config must be valid and its directory free, before any write."""
    from distnoisy.posttrain.finetune import finetune_config

    if (out_dir / "finetune").exists():
        raise ConfigError(
            f"{out_dir / 'finetune'} exists (an earlier fine-tune); remove it or pass another "
            "output_dir"
        )
    finetune_config(cfg, run.config, out_dir, cfg.tracking.uri or "")


def _labels(spec: Any) -> dict[str, Any]:
    from distnoisy.data.noise import load_label_file
    from distnoisy.data.shards import read_labels, read_manifest
    from distnoisy.engine.components import training_labels

    given, clean, keys = training_labels(spec)
    out: dict[str, Any] = {"given": given, "keys": keys, "corrupted": None}
    if clean is not None and (clean >= 0).all():
        out["corrupted"] = clean != given
    for split, d in (("val", spec.val_dir), ("test", spec.test_dir)):
        out[split] = np.asarray(read_labels(read_manifest(d))[0]) if d else None
    out["val_noisy"] = out["val"]
    if spec.val_dir and spec.val_label_file:
        n = len(out["val"])
        out["val_noisy"] = np.asarray(
            load_label_file(spec.val_label_file, n, spec.num_classes).labels
        )
    return out


def _loss_history(run: FinishedRun, n: int) -> np.ndarray:
    """Mean recorded training loss per sample (0 where none was recorded)."""
    out = np.zeros(n)
    for part in run.iter_table(columns=["index", "loss_hist"]):
        hist = part["loss_hist"].astype(np.float64)
        seen = np.isfinite(hist)
        total = np.where(seen, hist, 0.0).sum(1)
        out[part["index"]] = total / np.maximum(seen.sum(1), 1)
    return out


def build_input(
    prep: Prepared, cfg: PostTrainConfig, ranks: RankGroup
) -> tuple[RoundsInput, dict[str, Any]]:
    """Features (cached in the run directory; extracted on ``ranks``) and labels as the rounds'
    input."""
    from distnoisy.finished.features import extract_features, prediction_head
    from distnoisy.posttrain.influence import head_matrix

    p = cfg.posttrain
    feats = extract_features(
        prep.run,
        weights=prep.weights,
        dtype=p.feature_dtype,
        ranks=ranks,
    )
    labels = _labels(prep.spec)
    best = prep.weights == "best"
    w, b = prediction_head(prep.run.weights(best=best), prep.run.config.method.name)
    n = len(labels["given"])
    val = feats.get("val")
    inp = RoundsInput(
        train=np.asarray(feats["train"].features),
        train_file=feats["train"].path,
        given=labels["given"],
        theta=head_matrix(w, b),
        val=Split(np.asarray(val.features), labels["val_noisy"]) if val is not None else None,
        val_clean=labels["val"] if val is not None else None,
        test=Split(np.asarray(feats["test"].features), labels["test"]) if "test" in feats else None,
        loss_history=_loss_history(prep.run, n) if p.score == "loss_history" else None,
        corrupted=labels["corrupted"],
    )
    # chunk by chunk: a whole-set boolean copy would be N x d bytes
    step = 1 << 16
    bad = sum(
        int((~np.isfinite(inp.train[lo : lo + step]).all(1)).sum()) for lo in range(0, n, step)
    )
    if bad:  # undecodable samples: no features, so neither scored nor fitted
        raise ConfigError(
            f"{bad} training samples of run {prep.run.run_dir} could "
            "not be decoded; post-training needs features of every sample"
        )
    return inp, labels


@contextlib.contextmanager
def job_ranks(prep: Prepared, cfg: PostTrainConfig) -> Iterator[RankGroup]:
    """The ranks of the job's feature extraction and scoring rounds: ``posttrain.num_workers``
    and ``posttrain.launcher`` (default: the run's ``scaling.*``), started once, by the first
    job that needs them (none when the features are cached and the score runs in-process)."""
    from distnoisy.launch.ranks import rank_group

    p, scaling = cfg.posttrain, prep.run.config.scaling
    with rank_group(
        world_size=int(p.num_workers or scaling.num_workers),
        launcher=p.launcher or scaling.launcher,
        use_gpu=scaling.use_gpu,
        address=scaling.address,
        storage_dir=prep.out_dir / ".scratch" / "ray",
    ) as ranks:
        yield ranks


def make_scorer(
    prep: Prepared, cfg: PostTrainConfig, inp: RoundsInput, ranks: RankGroup
) -> tuple[Any, int]:
    """The scorer on ``ranks`` when they are more than one and the score has a rank-parallel
    version (:mod:`distnoisy.posttrain.parallel`); else ``(None, 1)`` (in-process)."""
    from distnoisy.posttrain.parallel import parallel_applies, rank_scorer
    from distnoisy.posttrain.rounds import hessian_kind

    p = cfg.posttrain
    hessian = hessian_kind(p, inp.theta.size)
    if not parallel_applies(p.score, hessian, ranks.world_size):
        return None, 1
    assert inp.train_file is not None
    scratch = prep.out_dir / ".scratch"
    return rank_scorer(ranks, p.score, hessian, scratch, inp.train_file), ranks.world_size


def ranking_metrics(res: RoundsResult, corrupted: np.ndarray | None) -> dict[str, Any]:
    """Round 1's ranking (AUROC, precision@k with k = the number corrupted) and the precision
    of the first :data:`FIRST_SHARE` of the training set removed."""
    if corrupted is None:
        return {}
    from distnoisy.issues.ranking import auroc, precision_at_k

    n = len(corrupted)
    first = res.tried[: math.ceil(FIRST_SHARE * n)]  # removal order, undone rounds included
    return {
        "auroc": auroc(res.first_scores, corrupted),
        "precision_at_k": precision_at_k(res.first_scores, corrupted),
        "precision_first_20pct": float(corrupted[first].mean()) if len(first) else None,
        "first_20pct_complete": bool(len(first) >= math.ceil(FIRST_SHARE * n)),
    }


def summarize(
    prep: Prepared,
    cfg: PostTrainConfig,
    res: RoundsResult,
    extra: dict[str, Any],
    wall_s: float,
    run_id: str | None,
) -> dict[str, Any]:
    best = res.rounds[res.best_round] if res.best_round >= 0 else {**res.before, "round": -1}
    early = prep.run.summary.get("test_acc_at_best_val")
    after = best.get("test_acc")
    return {
        "source_run": str(prep.run.run_dir),
        "source_mlflow_run_id": prep.run.mlflow_run_id,
        "method": prep.run.config.method.name,
        "score": cfg.posttrain.score,
        "test_acc_before": prep.run.summary.get("test_acc"),
        # The run's own early stopping: the test accuracy at its best validation epoch, the
        # figure post-training has to beat.
        "test_acc_at_best_val": early,
        "best_val_epoch": prep.run.summary.get("best_val_epoch"),
        "gain_over_early_stopping": (
            after - early if after is not None and early is not None else None
        ),
        "test_acc_refit_only": res.rounds[0].get("test_acc"),
        "test_acc": after,
        # The run's own head on the same features and validation set (what a round must beat).
        "val_acc_before": res.before.get("val_acc"),
        "val_nll_before": res.before.get("val_nll"),
        "val_acc_noisy_before": res.before.get("val_acc_noisy"),
        "test_acc_before_features": res.before.get("test_acc"),
        "val_acc_noisy": best.get("val_acc_noisy"),
        "removed": int((res.removed_round >= 1).sum()),
        "removed_fraction": best["removed_fraction"],
        "precision_removed": best.get("precision_removed"),
        "recall_removed": best.get("recall_removed"),
        "best_round": res.best_round,
        "selected_on": selection_metric(cfg.posttrain),
        "weight_decay": res.weight_decay,
        "mu": res.mu,
        **extra,
        "rounds": res.rounds,
        "wall_s": round(wall_s, 2),
        "mlflow_run_id": run_id,
        "output_dir": str(prep.out_dir),
    }


def write_all(
    prep: Prepared,
    res: RoundsResult,
    labels: dict[str, Any],
    inp: RoundsInput,
    summary: dict[str, Any],
    best_weights: bool,
) -> None:
    from distnoisy.finished.features import predicting_networks
    from distnoisy.posttrain.refit import predict

    out = prep.out_dir
    suggested = predict(res.theta, inp.train)
    args = (res, labels["keys"], labels["given"], suggested, labels["corrupted"])
    outputs.write_parquet(out / "removed.parquet", outputs.removed_table(*args))
    outputs.write_parquet(out / "label_issues.parquet", outputs.label_issue_table(*args))
    outputs.write_text(out / "rounds.csv", outputs.rounds_csv(res.rounds))
    outputs.write_text(out / "rounds.md", outputs.rounds_page(res.rounds, res.best_round, summary))
    state = outputs.refined_weights(
        prep.run.weights(best=best_weights),
        predicting_networks(prep.run.config.method.name),
        res.theta,
    )
    outputs.save_weights(out / "weights.pt", state)
    outputs.plot(out / "posttrain.png", res.rounds, res.best_round)
    outputs.write_json(out / "summary.json", summary)


OUTPUT_FILES = (
    "config.yaml",
    "summary.json",
    "rounds.csv",
    "rounds.md",
    "removed.parquet",
    "label_issues.parquet",
    "posttrain.png",
)


def posttrain(cfg: PostTrainConfig) -> dict[str, Any]:
    """Run the job; returns the summary (also ``summary.json``)."""
    from distnoisy import tracking
    from distnoisy.tracking.lifecycle import tracked_run

    t0 = time.perf_counter()
    prep = check(cfg)
    prep.out_dir.mkdir(parents=True, exist_ok=True)
    save(cfg, prep.out_dir / "config.yaml")
    uri = cfg.tracking.uri or prep.run.tracking_uri or tracking.default_tracking_uri()
    with tracked_run(
        uri if cfg.tracking.enabled else None,
        prep.run.config.tracking.experiment,
        f"{prep.run.run_dir.name}-posttrain-{cfg.posttrain.score}",
        _params(cfg),
        tags={
            "distnoisy.output_dir": str(prep.out_dir),
            "distnoisy.phase": "posttrain",
            "distnoisy.source_output_dir": str(prep.run.run_dir),
        },
        parent_run_id=prep.run.mlflow_run_id,
        source="python -m distnoisy.posttrain",
    ) as run_id:
        log.info("post-training %s (MLflow run %s)", prep.run.run_dir, run_id)
        try:
            with job_ranks(prep, cfg) as ranks:
                inp, labels = build_input(prep, cfg, ranks)
                scorer, score_workers = make_scorer(prep, cfg, inp, ranks)
                res = run_rounds(inp, cfg.posttrain, scorer)
        finally:
            shutil.rmtree(prep.out_dir / ".scratch", ignore_errors=True)  # the ranks' files
        extra = {
            "weights": prep.weights,
            "weights_requested": cfg.posttrain.weights,
            "score_workers": score_workers,
            **ranking_metrics(res, labels["corrupted"]),
        }
        summary = summarize(prep, cfg, res, extra, time.perf_counter() - t0, run_id)
        write_all(prep, res, labels, inp, summary, prep.weights == "best")
        if cfg.posttrain.finetune_epochs > 0:
            run_finetune(prep, cfg, res, summary, uri)
        if run_id is not None:
            _log_mlflow(uri, run_id, prep.out_dir, summary)
        return summary


def run_finetune(
    prep: Prepared, cfg: PostTrainConfig, res: RoundsResult, summary: dict[str, Any], uri: str
) -> None:
    """Fine-tune on the kept samples (:mod:`distnoisy.posttrain.finetune`); its numbers go to
    ``summary.json`` (``finetune``, ``test_acc_finetuned``) and a line of ``rounds.md``."""
    from distnoisy.posttrain.finetune import finetune

    removed = np.flatnonzero(res.removed_round >= 1)
    parent = prep.run.mlflow_run_id if cfg.tracking.enabled else None
    key = summary["selected_on"]
    head = res.rounds[res.best_round] if res.best_round >= 0 else res.before
    ft = finetune(cfg, prep.run.config, prep.out_dir, removed, uri, parent, key, head.get(key))
    if ft["selected_epoch"] == 0:  # no fine-tune epoch beat the post-trained head: keep it
        ft.update({k: head.get(k) for k in ("test_acc", "val_acc", "val_acc_noisy")})
    summary["finetune"] = ft
    summary["test_acc_finetuned"] = ft["test_acc"]
    summary["val_acc_finetuned"] = ft["val_acc"]
    summary["val_acc_noisy_finetuned"] = ft["val_acc_noisy"]
    outputs.write_text(
        prep.out_dir / "rounds.md", outputs.rounds_page(res.rounds, res.best_round, summary)
    )
    outputs.write_json(prep.out_dir / "summary.json", summary)


def _params(cfg: PostTrainConfig) -> dict[str, Any]:
    """The config as flat MLflow params (``posttrain.score``, ...)."""
    from omegaconf import OmegaConf

    from distnoisy.config import _flatten

    return _flatten(OmegaConf.to_container(OmegaConf.structured(cfg)))


def _log_mlflow(uri: str, run_id: str, out: Path, summary: dict[str, Any]) -> None:
    from distnoisy import tracking

    logger = tracking.RunLogger(uri, run_id, 0)
    for row in summary["rounds"]:
        logger.log_metrics({k: v for k, v in row.items() if k != "round"}, step=int(row["round"]))
    final = {
        k: summary.get(k)
        for k in (
            "test_acc",
            "test_acc_before",
            "test_acc_at_best_val",
            "gain_over_early_stopping",
            "test_acc_refit_only",
            "removed",
            "precision_removed",
            "auroc",
            "precision_at_k",
            "precision_first_20pct",
            "test_acc_finetuned",
            "val_acc_noisy_finetuned",
        )
    }
    logger.log_metrics(
        {f"final_{k}": v for k, v in final.items() if isinstance(v, int | float)},
        step=max(int(summary["best_round"]), 0),
    )
    tracking.log_artifacts(uri, run_id, [out / n for n in OUTPUT_FILES])
