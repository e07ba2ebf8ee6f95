"""One training run, as the driver process runs it, in named phases: validate -> prepare the
data -> open the run directory and tracking -> launch the ranks -> publish the outputs and the
summary.

:func:`train` is what ``python -m distnoisy.train``, sweeps, comparisons and post-training's
fine-tune call.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distnoisy.config import Config, flat_params, save_config, to_dict
from distnoisy.core.machine import check_room_for_workers
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
    from distnoisy.engine.job import Tracking

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
    t_start = time.perf_counter()
    run_dir = resolve_run_dir(cfg) if run_dir is None else run_dir
    validate_run(cfg, run_dir)
    spec = prepare(cfg)
    open_run_dir(cfg, run_dir, spec)
    with (
        open_tracking(cfg, run_dir, spec, tags, parent_run_id) as tracker,
        wall_time(run_dir, t_start) as segment_done,
    ):
        final_ckpt = launch_job(cfg, spec, run_dir, tracker, train_callbacks)
        return publish_run(final_ckpt, run_dir, spec, segment_done(), tracker, cfg)


def validate_run(cfg: Config, run_dir: Path) -> None:
    """Phase 1, validate: where the run writes, that a resume keeps its saved config, and that
    the tracking server answers."""
    check_output_location(cfg)
    check_run_dir(run_dir, cfg.resume)
    if cfg.resume:
        check_resume_config(cfg, run_dir)
    if cfg.tracking.enabled and cfg.tracking.uri:
        from distnoisy.tracking.reach import check_server

        check_server(cfg.tracking.uri)  # a server that is not up: one line now, no run dir


def prepare(cfg: Config) -> DataSpec:
    """Phase 2, prepare the data: shards and label files (validated; written only into the data
    cache), then what needs them: a batch fits, the model and method build, and a Ray cluster
    can hold the workers (last: joining a cluster is the slowest check)."""
    from distnoisy.data.prepare import prepare_data

    spec = prepare_data(cfg)
    check_batch_fits(cfg, spec)
    dry_build(cfg, spec.num_classes, spec.in_channels)
    if cfg.scaling.launcher == "ray":
        from distnoisy.launch.cluster import check_ray_resources

        check_ray_resources(cfg)  # a cluster that cannot hold the workers fails in seconds
    elif cfg.scaling.num_workers > 1:  # spawned ranks on this machine
        check_room_for_workers(cfg.scaling.num_workers)
    return spec


def open_run_dir(cfg: Config, run_dir: Path, spec: DataSpec) -> None:
    """Create the run directory with the outputs known before training, tracked or not:
    ``config.yaml`` (a resumed run keeps the one it was started with) and
    ``noise_transition.json`` (the measured transition, where clean labels are known)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    if not cfg.resume:
        save_config(cfg, run_dir / "config.yaml")
    if spec.transition is not None:
        data = {"classes": spec.classes, "transition": spec.transition}
        _write_json(run_dir / "noise_transition.json", data)


@contextlib.contextmanager
def open_tracking(
    cfg: Config,
    run_dir: Path,
    spec: DataSpec,
    tags: dict[str, str] | None,
    parent_run_id: str | None,
) -> Iterator[Tracking | None]:
    """Phase 3, open tracking: the run's MLflow run (reopened on resume) for the ``with`` block,
    recorded in ``run.json``; ended FINISHED, FAILED or KILLED by
    :func:`~distnoisy.tracking.lifecycle.tracked_run`. Yields None when tracking is off."""
    from distnoisy import tracking
    from distnoisy.engine.job import Tracking
    from distnoisy.tracking.lifecycle import tracked_run
    from distnoisy.tracking.outbox import Outbox

    uri = cfg.tracking.uri or tracking.default_tracking_uri()
    info_path = run_dir / "run.json"
    reopen = None
    if cfg.tracking.enabled and cfg.resume and info_path.exists():
        reopen = json.loads(info_path.read_text()).get("mlflow_run_id")
    run_tags = {
        "distnoisy.output_dir": str(run_dir),
        "distnoisy.method": cfg.method.name,
        **dict(cfg.tracking.tags),
        **(tags or {}),
    }
    with tracked_run(
        uri if cfg.tracking.enabled else None,
        cfg.tracking.experiment,
        cfg.tracking.run_name or run_dir.name,
        flat_params(cfg),
        tags=run_tags,
        parent_run_id=parent_run_id,
        reopen=reopen,
        system_metrics=cfg.tracking.system_metrics,
        run_dir=run_dir,
    ) as run_id:
        info = json.loads(info_path.read_text()) if info_path.exists() else {}
        info.update(mlflow_run_id=run_id, tracking_uri=uri)  # keeps earlier segments' wall times
        _write_json(info_path, info)
        if run_id is not None and spec.noise_rate is not None:
            noise = {"noise_rate_realised": spec.noise_rate}
            Outbox(run_dir, uri, run_id).log_metrics(noise, step=0)
        yield Tracking(uri, run_id) if run_id is not None else None


@contextlib.contextmanager
def wall_time(run_dir: Path, t_start: float) -> Iterator[Callable[[], list[float]]]:
    """The wall times of the run's segments (one per start or resume), saved in ``run.json``
    however the block ends. Yields ``segment_done()``: call it once the outputs are in place;
    it returns every segment's wall time (a resumed run's ``wall_s`` is their sum)."""
    earlier = segments_of(run_dir)
    done: list[float] = []

    def segment_done() -> list[float]:
        done.append(time.perf_counter() - t_start)
        return [*earlier, done[0]]

    try:
        yield segment_done
    finally:
        save_segments(run_dir, [*earlier, done[0] if done else time.perf_counter() - t_start])


def launch_job(
    cfg: Config,
    spec: DataSpec,
    run_dir: Path,
    tracker: Tracking | None,
    train_callbacks: list[Any] | None,
) -> Path:
    """Phase 4, launch: the method's driver-side resources, then every rank trains; returns the
    final checkpoint's directory."""
    from distnoisy.engine.job import Job
    from distnoisy.launch import launch

    run_id = tracker.run_id if tracker is not None else None
    job = Job(cfg, spec, tracker, _method_resources(cfg, spec, run_dir, run_id))
    return launch(job, cfg, run_dir, train_callbacks)


def publish_run(
    final_ckpt: Path,
    run_dir: Path,
    spec: DataSpec,
    segments: list[float],
    tracker: Tracking | None,
    cfg: Config | None = None,
) -> dict[str, Any]:
    """Phase 5, publish and summarise: the outputs copied out of the final checkpoint, the
    summary completed, the review files written, everything logged to the MLflow run (with
    ``cfg.tracking.log_model``, the networks as MLflow models too)."""
    publish(final_ckpt, run_dir)
    run_id = tracker.run_id if tracker is not None else None
    summary = final_summary(run_dir, segments, run_id)
    write_review(run_dir, summary, spec)
    if tracker is not None:
        log_final(tracker.uri, tracker.run_id, run_dir, summary)
        if cfg is not None and cfg.tracking.log_model:
            _log_models(cfg, spec, run_dir, tracker)
    return summary


def _log_models(cfg: Config, spec: DataSpec, run_dir: Path, tracker: Tracking) -> None:
    """The networks as MLflow models; a server that does not take them (gone, full) costs a
    warning, not the run: its outputs, ``weights.pt`` included, are complete already."""
    from distnoisy import tracking
    from distnoisy.driver.export import log_models
    from distnoisy.tracking.outbox import PENDING_FILE

    if (run_dir / PENDING_FILE).exists():
        # The server is away (the outbox's one warning line says so and names the sync
        # command); the networks stay in weights.pt, no second warning.
        log.info("MLflow models not logged: the tracking server is away; see %s", PENDING_FILE)
        return
    try:
        log_models(cfg, spec, run_dir, tracker.uri, tracker.run_id)
    except Exception as e:  # an extra export must not fail a finished run
        log.warning(
            "distnoisy: warning: the MLflow models of this run were not logged (%s); its "
            "outputs are complete: %s holds the networks",
            tracking.short_reason(e),
            run_dir / "weights.pt",
        )


def _write_json(path: Path, data: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)


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
