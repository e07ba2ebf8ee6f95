"""``python -m distnoisy.train [--config FILE.yaml] [key=value ...]``: one training run.

With no arguments it trains ELR on scikit-learn's digits with 40% symmetric label noise, on a
local Ray cluster with 2 CPU workers, tracked in ``./mlflow.db``. Outputs go to ``output_dir``
(default ``runs/<name or timestamp>``): ``config.yaml``, ``summary.json``,
``label_issues.parquet``, ``sample_stats.parquet``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shlex
import shutil
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distnoisy.config import (
    RESUMABLE_KEYS,
    Config,
    flat_params,
    keys_help,
    load_config,
    resume_conflicts,
    save_config,
    to_dict,
)
from distnoisy.errors import ConfigError, DistnoisyError

if TYPE_CHECKING:
    from distnoisy.data.prepare import DataSpec

log = logging.getLogger("distnoisy")

OUTPUT_FILES = ("summary.json", "label_issues_top.parquet", "weights.pt")
#: Written only by some runs: the best-by-validation weights need a validation set; the tables
#: are single files with a replicated store, partitioned datasets (directories) with a
#: partitioned one (README "What a run writes").
OPTIONAL_OUTPUT_FILES = (
    "weights_best.pt",
    "label_issues.parquet",
    "sample_stats.parquet",
    "label_issues",
    "sample_stats",
)


def resolve_run_dir(cfg: Config) -> Path:
    if cfg.output_dir:
        return Path(cfg.output_dir).expanduser().resolve()
    name = cfg.name or time.strftime("%Y%m%d-%H%M%S") + f"-{cfg.method.name}"
    return (Path("runs") / name).resolve()


def _check_run_dir(run_dir: Path, resume: bool) -> None:
    existing = next(p for p in (run_dir, *run_dir.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError(
            f"output_dir {run_dir} cannot be created: {existing} is a file, not a directory; "
            "choose another output_dir or name"
        )
    has_run = (run_dir / "run.json").exists()
    if resume and not has_run:
        raise ConfigError(f"resume=true but {run_dir} holds no run to resume (no run.json)")
    if resume and not (run_dir / "config.yaml").is_file():
        raise ConfigError(
            f"resume=true but {run_dir} holds no config.yaml to resume with; start a new run "
            "with another output_dir"
        )
    if not resume and run_dir.exists() and any(run_dir.iterdir()):
        raise ConfigError(
            f"output_dir {run_dir} already exists and is not empty; pass resume=true to continue "
            "that run, or choose another output_dir/name"
        )


def _in_ray_job_copy(cwd: Path) -> bool:
    """Whether ``cwd`` is a Ray job's copy of its working_dir (deleted with the job's
    session): ``.../runtime_resources/working_dir_files/<package>``."""
    return "working_dir_files" in cwd.parts and "runtime_resources" in cwd.parts


def check_output_location(cfg: Config) -> None:
    """A run submitted with ``ray job submit --working-dir`` must say where its outputs go:
    the job runs in a temporary copy of that directory, which Ray deletes."""
    cwd = Path.cwd().resolve()
    if not _in_ray_job_copy(cwd):
        return
    missing = [
        k
        for k, v in (("output_dir", cfg.output_dir), ("tracking.uri", cfg.tracking.uri))
        if not v and (k == "output_dir" or cfg.tracking.enabled)
    ]
    if missing:
        raise ConfigError(
            f"this run's working directory {cwd} is Ray's temporary copy of the job's "
            f"working_dir; give {' and '.join(f'{k}=' for k in missing)} on storage that outlives "
            "the job (e.g. output_dir=/shared/runs/NAME), or the outputs are deleted with it"
        )


def _check_resume_config(cfg: Config, run_dir: Path) -> None:
    """A resumed run keeps the config it was started with (but for :data:`RESUMABLE_KEYS`)."""
    saved_path = run_dir / "config.yaml"
    conflicts = resume_conflicts(load_config(["--config", str(saved_path)]), cfg)
    if conflicts:
        diff = "; ".join(f"{k}={new!r} (saved: {old!r})" for k, (old, new) in conflicts.items())
        raise ConfigError(
            f"resume=true: {diff} differs from {saved_path}; a resumed run keeps its config "
            f"(only {', '.join(RESUMABLE_KEYS)} may change): drop the override, or start a new "
            "run with another output_dir"
        )


def load_run_config(argv: list[str]) -> Config:
    """The config of ``python -m distnoisy.train ARGS``.

    With ``resume=true`` the run's saved ``config.yaml`` is the base and ``ARGS`` apply over it
    (``--config`` files, then ``key=value``), so a run resumes with the config it was started
    with; :func:`train` rejects any override outside :data:`RESUMABLE_KEYS` that changes it.

    Raises
    ------
    ConfigError
        For a bad argument, or ``resume=true`` without a run to resume.
    """
    cfg = load_config(argv)
    if not cfg.resume:
        return cfg
    run_dir = resolve_run_dir(cfg)
    _check_run_dir(run_dir, resume=True)
    resumed = load_config(["--config", str(run_dir / "config.yaml"), *argv])
    # The directory found above, even if the saved config names it another way (name= vs path).
    return dataclasses.replace(resumed, output_dir=str(run_dir), resume=True)


def _check_batch_fits(cfg: Config, spec: DataSpec) -> None:
    """One global batch must fit in an epoch's training samples (else no step would run)."""
    per_epoch = spec.num_train
    if cfg.data.exclude_file:
        from distnoisy.data.stream.sampling import KeptSubset, read_index_file

        excluded = read_index_file(cfg.data.exclude_file, spec.num_train)
        per_epoch = KeptSubset(spec.num_train, excluded).size
    if cfg.data.balanced_batches > 0:
        from distnoisy.data.stream import BalancedSubset
        from distnoisy.loop import training_labels

        given = training_labels(spec)[0]
        target = cfg.data.balanced_batches * cfg.train.batch_size
        per_epoch = BalancedSubset(given, target, seed=cfg.seed).size
    if cfg.train.batch_size > per_epoch:
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} is larger than the {per_epoch} training "
            f"samples of an epoch ({spec.num_train} in the training set); lower train.batch_size "
            f"to at most {per_epoch}"
        )


def _dry_build(cfg: Config, num_classes: int, in_channels: int) -> None:
    """Instantiate the model and method once so that bad settings fail before the run starts."""
    from distnoisy.loop import network_builder
    from distnoisy.methods import METHODS

    method = METHODS.get(cfg.method.name)(
        cfg.method, num_samples=1, num_classes=num_classes, epochs=cfg.train.epochs
    )
    # The method builds its networks as the workers will (LIMIT checks its q-network here).
    models = method.build_networks(network_builder(cfg, num_classes, in_channels))
    if cfg.train.init_weights:
        from distnoisy.init_weights import load_init_weights

        load_init_weights(models, cfg.train.init_weights)


def _reference_trainer(
    cfg: Config, run_dir: Path, parent_run_id: str | None
) -> Callable[[str], Path]:
    """``train_reference(method) -> output dir``: the same job with another method, trained once
    into ``run_dir/reference-<method>`` (reused if it already finished, e.g. on resume)."""
    from distnoisy.config import from_dict

    def train_reference(method: str) -> Path:
        out = run_dir / f"reference-{method}"
        stats = (out / "sample_stats.parquet").exists() or (out / "sample_stats").is_dir()
        if (out / "summary.json").exists() and stats:
            return out
        data = to_dict(cfg)
        data["method"] = {"name": method}
        data.update(output_dir=str(out), name=None, resume=(out / "run.json").exists())
        data["tracking"]["run_name"] = f"{cfg.tracking.run_name or run_dir.name}-reference-{method}"
        ref_cfg = from_dict(data)
        log.info("training the reference %s run for %s into %s", method, cfg.method.name, out)
        train(ref_cfg, parent_run_id=parent_run_id)
        return out

    return train_reference


def _publish(final_ckpt: Path, run_dir: Path) -> None:
    """Copy the finished run's outputs from its final checkpoint into the run dir, atomically."""
    src = final_ckpt / "outputs"
    optional = [n for n in OPTIONAL_OUTPUT_FILES if (src / n).exists()]
    for name in (*OUTPUT_FILES, *optional):
        tmp = run_dir / f".{name}.tmp"
        if (src / name).is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src / name, tmp)
            shutil.rmtree(run_dir / name, ignore_errors=True)
        else:
            shutil.copyfile(src / name, tmp)
        os.replace(tmp, run_dir / name)


def train(
    cfg: Config,
    parent_run_id: str | None = None,
    train_callbacks: list[Any] | None = None,
    tags: dict[str, str] | None = None,
    run_dir: Path | None = None,
) -> dict[str, Any]:
    """Run one training job described by ``cfg``; returns the summary (also in summary.json).

    Parameters
    ----------
    cfg
        The resolved run config.
    parent_run_id
        MLflow run to nest this run under (a sweep or a comparison).
    train_callbacks
        Ray Train ``UserCallback``s passed to the Train ``RunConfig`` (``scaling.launcher=ray``
        only); :mod:`distnoisy.tune` forwards per-epoch metrics to Tune this way.
    tags
        Extra MLflow tags for the run (e.g. the Tune trial id).
    run_dir
        The run directory as :func:`resolve_run_dir` gave it to the caller (a default name
        holds the time, so resolving it again could name another one); None = resolve it here.

    Raises
    ------
    DistnoisyError
        For bad input (config, data, labels), before the run directory is created.
    """
    from distnoisy import tracking
    from distnoisy.data.prepare import prepare_data
    from distnoisy.job import Job, Tracking
    from distnoisy.launch import launch

    t_start = time.perf_counter()
    check_output_location(cfg)
    run_dir = resolve_run_dir(cfg) if run_dir is None else run_dir
    _check_run_dir(run_dir, cfg.resume)
    if cfg.resume:
        _check_resume_config(cfg, run_dir)
    spec = prepare_data(cfg)  # validates data and labels; writes only into the data cache
    _check_batch_fits(cfg, spec)
    _dry_build(cfg, spec.num_classes, spec.in_channels)
    if cfg.scaling.launcher == "ray":
        from distnoisy.launch import check_ray_resources

        check_ray_resources(cfg)  # a cluster that cannot hold the workers fails in seconds

    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:  # a resumed run keeps the config.yaml it was started with
        save_config(cfg, run_dir / "config.yaml")
    uri = cfg.tracking.uri or tracking.default_tracking_uri()
    segments = _segments(run_dir)  # wall times of the run's earlier segments (before resume)
    run_id = _mlflow_run(cfg, run_dir, uri, tags, parent_run_id)
    monitor = None
    if run_id is not None and cfg.tracking.system_metrics:
        monitor = tracking.start_system_metrics(uri, run_id)

    job = Job(cfg, spec, Tracking(uri, run_id) if run_id else None)
    status = "FAILED"
    elapsed: float | None = None  # this segment's wall time, once the outputs are in place
    try:
        if run_id is not None:
            noise = {"noise_rate_realised": spec.noise_rate} if spec.noise_rate is not None else {}
            tracking.RunLogger(uri, run_id, 0).log_metrics(noise, step=0)
            if spec.transition is not None:
                (run_dir / "noise_transition.json").write_text(
                    json.dumps({"classes": spec.classes, "transition": spec.transition})
                )
        resources = _method_resources(cfg, spec, run_dir, run_id)
        if resources:
            job = dataclasses.replace(job, resources=resources)
        final_ckpt = launch(job, cfg, run_dir, train_callbacks)
        _publish(final_ckpt, run_dir)
        elapsed = time.perf_counter() - t_start
        summary = _final_summary(run_dir, [*segments, elapsed], run_id)
        _write_report(run_dir, summary, spec)
        if run_id is not None:
            _log_final(uri, run_id, run_dir, summary)
        status = "FINISHED"
        return summary
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C, or SIGTERM (Ray's driver handler turns it into SystemExit).
        status = "KILLED"
        raise
    finally:
        # Every segment's wall time: a resumed run's wall_s is their sum.
        last = elapsed if elapsed is not None else time.perf_counter() - t_start
        _save_segments(run_dir, [*segments, last])
        if monitor is not None:
            tracking.stop_system_metrics(monitor)
        if run_id is not None:
            tracking.end_run(uri, run_id, status)


def _mlflow_run(
    cfg: Config,
    run_dir: Path,
    uri: str,
    tags: dict[str, str] | None,
    parent_run_id: str | None,
) -> str | None:
    """Start (or, on resume, reopen) the run's MLflow run; record it in ``run.json``."""
    from distnoisy import tracking

    run_info_path = run_dir / "run.json"
    run_id: str | None = None
    if cfg.tracking.enabled:
        if cfg.resume and run_info_path.exists():
            run_id = json.loads(run_info_path.read_text()).get("mlflow_run_id")
        if run_id is None:
            run_id = tracking.start_run(
                uri,
                cfg.tracking.experiment,
                cfg.tracking.run_name or run_dir.name,
                flat_params(cfg),
                tags={
                    "distnoisy.output_dir": str(run_dir),
                    "distnoisy.method": cfg.method.name,
                    **dict(cfg.tracking.tags),
                    **(tags or {}),
                },
                parent_run_id=parent_run_id,
            )
        else:
            tracking.reopen_run(uri, run_id)
    info = json.loads(run_info_path.read_text()) if run_info_path.exists() else {}
    info.update(mlflow_run_id=run_id, tracking_uri=uri)  # keeps earlier segments' wall times
    tmp_info = run_info_path.with_suffix(".tmp")
    tmp_info.write_text(json.dumps(info))
    os.replace(tmp_info, run_info_path)
    return run_id


def _method_resources(
    cfg: Config, spec: DataSpec, run_dir: Path, run_id: str | None
) -> dict[str, Any]:
    """The method's driver-side resources, also written to ``method_resources.json``."""
    from distnoisy.methods import METHODS, PrepareContext

    context = PrepareContext(
        num_classes=spec.num_classes,
        noise_transition=spec.transition,
        run_dir=run_dir,
        train_reference=_reference_trainer(cfg, run_dir, run_id),
    )
    resources = METHODS.get(cfg.method.name).prepare_resources(cfg.method, context)
    if resources:
        tmp = run_dir / ".method_resources.json.tmp"
        tmp.write_text(json.dumps(resources, indent=2))
        os.replace(tmp, run_dir / "method_resources.json")
    return resources


def _segments(run_dir: Path) -> list[float]:
    """Wall seconds of the run's earlier segments (interrupted, then resumed), from run.json."""
    info = run_dir / "run.json"
    if not info.exists():
        return []
    return [float(x) for x in json.loads(info.read_text()).get("segments_s", [])]


def _save_segments(run_dir: Path, segments: list[float]) -> None:
    info_path = run_dir / "run.json"
    if not info_path.exists():
        return
    info = json.loads(info_path.read_text())
    info["segments_s"] = [round(x, 2) for x in segments]
    tmp = info_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, info_path)


def _final_summary(run_dir: Path, segments: list[float], run_id: str | None) -> dict[str, Any]:
    """The published ``summary.json`` with wall time (every segment of a resumed run), MLflow
    run id and output dir added."""
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.update(
        wall_s=round(sum(segments), 2),
        wall_s_segments=[round(x, 2) for x in segments],
        mlflow_run_id=run_id,
        output_dir=str(run_dir),
    )
    tmp = run_dir / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, run_dir / "summary.json")
    return summary


def _write_report(run_dir: Path, summary: dict[str, Any], spec: DataSpec) -> None:
    """Training curves and the top label issues with thumbnails (:mod:`distnoisy.run_report`)."""
    from distnoisy.run_report import write_report

    write_report(run_dir, summary.get("history") or [], str(spec.train_dir), spec.classes)


#: Summary figures logged to MLflow as ``final_<name>`` (the per-epoch ones have no prefix).
FINAL_METRICS = (
    "test_acc",
    "best_test_acc",
    "val_acc",
    "best_val_acc",
    "test_acc_at_best_val",
    "memorized",
    "clean_train_acc",
    "train_acc_given",
    "label_issue_auroc",
    "label_issue_precision_at_k",
    "noise_rate_realised",
    "num_train_seen",
    "bad_samples",
    "wall_s",
)
#: Run-directory files logged as MLflow artifacts (those that exist).
ARTIFACT_FILES = (
    "config.yaml",
    "summary.json",
    "label_issues.parquet",
    "noise_transition.json",
    "method_resources.json",
    "weights.pt",
    "weights_best.pt",
)


def _log_final(uri: str, run_id: str, run_dir: Path, summary: dict[str, Any]) -> None:
    """Log the summary figures, the report and the run's output files to its MLflow run."""
    from distnoisy import run_report, tracking

    final = {k: summary[k] for k in FINAL_METRICS if summary.get(k) is not None}
    tracking.RunLogger(uri, run_id, 0).log_metrics(
        {f"final_{k}": v for k, v in final.items()}, step=summary["epochs"]
    )
    report = (run_report.CURVES_FILE, run_report.ISSUES_HTML_FILE, run_report.ISSUES_MD_FILE)
    tracking.log_artifacts(uri, run_id, [run_dir / n for n in (*ARTIFACT_FILES, *report)])


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _count(n: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``: a count with its noun in the right number."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def _test_headline(summary: dict[str, Any]) -> str:
    """The test-accuracy line: the validation-selected number where a validation set exists.

    The best test accuracy over epochs selects the epoch on the test set itself (an optimistic
    oracle), so it is never the headline; it is shown, labelled, after the final one.
    """
    final = _pct(summary.get("test_acc"))
    best = _pct(summary.get("best_test_acc"))
    oracle = f"{best} test-selected (epoch {summary.get('best_epoch')})"
    if summary.get("best_val_epoch") is not None:
        return (
            f"  clean test accuracy   {_pct(summary.get('test_acc_at_best_val'))} at the best "
            f"val epoch {summary['best_val_epoch']}; {final} final, {oracle}"
        )
    return f"  clean test accuracy   {final} final; {oracle}"


def format_summary(summary: dict[str, Any]) -> str:
    pct = _pct

    lines = [
        f"distnoisy: {summary['method']} on {summary['dataset']} "
        f"({summary['num_train']} train samples, noise {summary['noise_kind']}, "
        f"realised rate {pct(summary.get('noise_rate_realised'))}, "
        f"{_count(summary['num_workers'], 'worker')})",
        _test_headline(summary),
        # Not the epoch lines' "memorized (training preds)": those are the augmented training
        # passes' predictions; this is the final weights on the un-augmented training set.
        f"  memorized noisy labels {pct(summary.get('memorized'))} of corrupted training samples "
        "(final weights)",
        f"  label-issue AUROC     {_fmt(summary.get('label_issue_auroc'))}"
        + (
            f"  (precision@k {pct(summary.get('label_issue_precision_at_k'))})"
            if summary.get("label_issue_precision_at_k") is not None
            else ""
        ),
        f"  {_count(summary['epochs'], 'epoch')} in {summary.get('wall_s')} s; outputs in "
        f"{summary.get('output_dir')}; MLflow run {summary.get('mlflow_run_id')}",
    ]
    known, n = summary.get("num_clean_known"), summary["num_train"]
    if known is not None and known < n:
        lines.insert(
            1,
            f"  noise rate, memorized and AUROC measured on the {known} of {n} training samples "
            "with a known clean label",
        )
    if summary.get("best_val_epoch") is not None:
        lines.insert(
            -1,
            f"  clean val accuracy    {pct(summary.get('best_val_acc'))} best (epoch "
            f"{summary['best_val_epoch']}, weights in weights_best.pt)",
        )
    if summary.get("bad_samples"):
        named = summary.get("bad_sample_list") or []
        first = ", ".join(f"{b['set']}:{b['key']}" for b in named[:3])
        lines.insert(
            -1,
            f"  skipped {summary['bad_samples']} corrupt or unreadable samples"
            + (f" ({first}{', ...' if len(named) > 3 else ''}; see summary.json)" if first else ""),
        )
    return "\n".join(lines)


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
    # SIGTERM (ray job stop, Kubernetes, a scheduler's time limit) becomes KeyboardInterrupt, so
    # the run is marked KILLED in MLflow instead of being left RUNNING.
    raise KeyboardInterrupt(f"signal {signum}")


def setup_cli() -> None:
    """Logging and signal handling of the command-line drivers (train, tune, compare)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    for noisy in ("mlflow", "alembic", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def interrupted_message(run_dir: Path | None) -> str:
    """The line printed on Ctrl-C or SIGTERM: the command that resumes this run, if any."""
    if run_dir is None or not (run_dir / "run.json").exists():
        return "distnoisy: interrupted before the run started; there is nothing to resume"
    arg = shlex.quote(f"output_dir={run_dir}")
    return f"distnoisy: interrupted; resume with: python -m distnoisy.train {arg} resume=true"


def usage() -> str:
    """The ``--help`` text of ``python -m distnoisy.train``."""
    return (
        "usage: python -m distnoisy.train [--config FILE.yaml ...] [key=value ...]\n\n"
        "Train one model on labels with noise and write its run directory (config.yaml,\n"
        "summary.json, label_issues.parquet, sample_stats.parquet, weights.pt, checkpoints).\n"
        "With no arguments: ELR on scikit-learn's digits with 40% symmetric label noise, 2 Ray\n"
        "Train workers on a local Ray cluster, tracked in ./mlflow.db.\n\n"
        f"{keys_help()}\n\n"
        "Continue a stopped run with: python -m distnoisy.train output_dir=RUN resume=true\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m distnoisy.train ARGS``; returns the exit code.

    0 when the run finished (or for ``--help``), 2 for bad input (one ``distnoisy: error:``
    line), 130 when interrupted (Ctrl-C, SIGTERM).
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if "-h" in args or "--help" in args:
        print(usage(), end="")
        return 0
    setup_cli()
    run_dir: Path | None = None
    try:
        cfg = load_run_config(args)
        run_dir = resolve_run_dir(cfg)
        summary = train(cfg, run_dir=run_dir)
    except DistnoisyError as e:
        print(f"distnoisy: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):
        # Ray's handlers turn a signal into SystemExit (SIGTERM: sys.exit(15)) once it runs.
        print(interrupted_message(run_dir), file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
