"""One training run, as the driver process runs it: validate -> prepare the data -> open
tracking -> launch the ranks -> publish the outputs.

:func:`train` is what ``python -m distnoisy.train``, sweeps, comparisons and post-training's
fine-tune call.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distnoisy.config import Config, flat_params, save_config, to_dict
from distnoisy.driver.publish import (
    final_summary,
    log_final,
    publish,
    save_segments,
    segments_of,
    write_review,
)
from distnoisy.driver.validate import (
    check_batch_fits,
    check_output_location,
    check_resume_config,
    check_run_dir,
    dry_build,
    resolve_run_dir,
)

if TYPE_CHECKING:
    from distnoisy.data.prepare import DataSpec

log = logging.getLogger("distnoisy")


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
    from distnoisy.engine.job import Job, Tracking
    from distnoisy.launch import launch

    t_start = time.perf_counter()
    check_output_location(cfg)
    run_dir = resolve_run_dir(cfg) if run_dir is None else run_dir
    check_run_dir(run_dir, cfg.resume)
    if cfg.resume:
        check_resume_config(cfg, run_dir)
    spec = prepare_data(cfg)  # validates data and labels; writes only into the data cache
    check_batch_fits(cfg, spec)
    dry_build(cfg, spec.num_classes, spec.in_channels)
    if cfg.scaling.launcher == "ray":
        from distnoisy.launch.cluster import check_ray_resources

        check_ray_resources(cfg)  # a cluster that cannot hold the workers fails in seconds

    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:  # a resumed run keeps the config.yaml it was started with
        save_config(cfg, run_dir / "config.yaml")
    uri = cfg.tracking.uri or tracking.default_tracking_uri()
    segments = segments_of(run_dir)  # wall times of the run's earlier segments (before resume)
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
        publish(final_ckpt, run_dir)
        elapsed = time.perf_counter() - t_start
        summary = final_summary(run_dir, [*segments, elapsed], run_id)
        write_review(run_dir, summary, spec)
        if run_id is not None:
            log_final(uri, run_id, run_dir, summary)
        status = "FINISHED"
        return summary
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C, or SIGTERM (Ray's driver handler turns it into SystemExit).
        status = "KILLED"
        raise
    finally:
        # Every segment's wall time: a resumed run's wall_s is their sum.
        last = elapsed if elapsed is not None else time.perf_counter() - t_start
        save_segments(run_dir, [*segments, last])
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
