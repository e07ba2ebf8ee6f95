"""MLflow tracking: the driver owns the run's lifecycle, rank 0 logs metrics into it.

The driver creates the run (params, tags), hands its id to the workers and ends it: FINISHED on
success, FAILED on any error, KILLED on Ctrl-C or SIGTERM; every command does this through
:func:`distnoisy.tracking.lifecycle.tracked_run`. A crashed or killed worker therefore never
leaves a run stuck in RUNNING. Workers log with :class:`RunLogger`, a no-op off rank 0.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

# MLflow's system-metrics internals live in mlflow_compat; the driver calls them from here.
from distnoisy.tracking.mlflow_compat import start_system_metrics as start_system_metrics
from distnoisy.tracking.mlflow_compat import stop_system_metrics as stop_system_metrics
from distnoisy.tracking.models import log_pytorch_model as log_pytorch_model
from distnoisy.tracking.outbox import (
    QUIET_S,
    bound_http_retries,
    send_metrics_once,
    short_reason,
)

if TYPE_CHECKING:
    from distnoisy.engine.job import Job

log = logging.getLogger(__name__)

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# MLflow's HTTP retries bounded to seconds (tracking.outbox queues what still fails).
bound_http_retries()

_MAX_PARAM_LEN = 6000
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"


def default_tracking_uri() -> str:
    """``sqlite:///<absolute cwd>/mlflow.db``: absolute, so Ray workers (another cwd) agree."""
    return f"sqlite:///{Path.cwd().resolve() / 'mlflow.db'}"


def _artifact_location(uri: str) -> str | None:
    """Artifacts of a local SQLite store go beside the database file (not into the cwd)."""
    if uri.startswith("sqlite:///"):
        db = Path(uri[len("sqlite:///") :])
        return (db.parent / "mlartifacts").resolve().as_uri()
    return None


def _client(uri: str):
    from mlflow.tracking import MlflowClient

    return MlflowClient(tracking_uri=uri)


def start_run(
    uri: str,
    experiment: str,
    run_name: str,
    params: dict[str, Any],
    tags: dict[str, str] | None = None,
    parent_run_id: str | None = None,
    source: str = "python -m distnoisy.train",
) -> str:
    """Create an MLflow run and log its params; returns the run id.

    Commands open their runs through :func:`distnoisy.tracking.lifecycle.tracked_run`, which
    also ends them; ``source`` is the command recorded as the run's source.
    """
    client = _client(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = (
        exp.experiment_id
        if exp is not None
        else client.create_experiment(experiment, artifact_location=_artifact_location(uri))
    )
    if exp is None or EXPERIMENT_KIND_TAG not in exp.tags:
        # MLflow 3's UI shows such an experiment as model training (runs, metrics, artifacts),
        # not as a GenAI app; it guesses when the tag is missing.
        client.set_experiment_tag(exp_id, EXPERIMENT_KIND_TAG, "custom_model_development")
    all_tags = {**source_tags(source), **(tags or {})}
    if parent_run_id:
        all_tags["mlflow.parentRunId"] = parent_run_id  # what the UI uses to nest runs
    run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
    log_params(uri, run.info.run_id, params)
    return run.info.run_id


def source_tags(source: str = "python -m distnoisy.train") -> dict[str, str]:
    """The MLflow system tags that say where a run came from: the command, the user and, when
    distnoisy runs from a git checkout, its commit (the UI's Source and Git Commit fields)."""
    import getpass
    import subprocess

    tags = {"mlflow.source.name": source, "mlflow.source.type": "LOCAL"}
    with contextlib.suppress(Exception):  # no user name in some containers
        tags["mlflow.user"] = getpass.getuser()
    checkout = Path(__file__).resolve().parents[2]
    if (checkout / ".git").exists():
        try:
            done = subprocess.run(
                ["git", "-C", str(checkout), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=10,
            )
        except (OSError, subprocess.SubprocessError):
            return tags
        if done.returncode == 0 and done.stdout.strip():
            tags["mlflow.source.git.commit"] = done.stdout.strip()
    return tags


def log_params(uri: str, run_id: str, params: dict[str, Any]) -> None:
    from mlflow.entities import Param

    items = [Param(k, str(v)[:_MAX_PARAM_LEN]) for k, v in sorted(params.items())]
    client = _client(uri)
    for i in range(0, len(items), 100):  # log_batch accepts at most 100 params per call
        client.log_batch(run_id, params=items[i : i + 100])


def set_terminated_or_raise(uri: str, run_id: str, status: str) -> None:
    """Terminate the run with ``status`` (raises what MLflow raises)."""
    _client(uri).set_terminated(run_id, status=status)


def end_run(uri: str, run_id: str, status: str) -> None:
    """Terminate the run with ``FINISHED``, ``FAILED`` or ``KILLED``; never raises."""
    try:
        set_terminated_or_raise(uri, run_id, status)
    except Exception as e:  # the run's status must not mask the original error
        log.warning("could not mark MLflow run %s as %s: %s", run_id, status, e)


def reopen_run(uri: str, run_id: str) -> None:
    """Mark a resumed run RUNNING again (it ended KILLED or FAILED)."""
    _client(uri).update_run(run_id, status="RUNNING")


def log_artifacts(uri: str, run_id: str, paths: list[Path]) -> None:
    """Log the files and directories among ``paths`` that exist (a directory under its name,
    e.g. a partitioned store's ``label_issues/``)."""
    client = _client(uri)
    for p in paths:
        if p.is_dir():
            client.log_artifacts(run_id, str(p), artifact_path=p.name)
        elif p.exists():
            client.log_artifact(run_id, str(p))


def run_tags(uri: str, run_id: str) -> dict[str, str] | None:
    """The tags of run ``run_id``, or None when the store has no such run."""
    from mlflow.exceptions import MlflowException

    try:
        return dict(_client(uri).get_run(run_id).data.tags)
    except MlflowException:
        return None


def run_status(uri: str, run_id: str) -> str:
    return _client(uri).get_run(run_id).info.status


class RunLogger:
    """Per-epoch metric logging from rank 0 (a no-op elsewhere or when tracking is off).

    A step already logged for a metric is not logged again: a resumed run repeats the epochs
    after its last checkpoint, which may have been logged before it stopped. A server that does
    not answer never stops training: the metrics are queued in memory and sent with the next
    epoch's once it answers again (after a failure it is left alone for
    :data:`~distnoisy.tracking.outbox.QUIET_S` seconds). What is still queued when the run ends
    is logged by the driver from the run's history (:func:`distnoisy.driver.publish.log_final`).
    """

    def __init__(self, uri: str | None, run_id: str | None, rank: int) -> None:
        self.enabled = bool(uri and run_id and rank == 0)
        self.uri, self.run_id = uri, run_id
        self._client = _client(uri) if self.enabled else None
        self._logged: dict[str, set[int]] = {}  # steps the server holds, by metric
        self.queued: list[list[Any]] = []  # [key, value, step, timestamp_ms] not yet taken
        self._quiet_until = 0.0
        self._away = False

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        if not self.enabled:
            return
        import time

        now = int(time.time() * 1000)
        self.queued += [[k, float(v), step, now] for k, v in metrics.items() if v is not None]
        if time.monotonic() < self._quiet_until:
            return
        try:
            send_metrics_once(self._client, self.run_id, self.queued, self._logged)
        except Exception as e:  # the server or the network: keep them, train on
            self._logged.clear()  # a call that failed may have been stored: read back later
            self._quiet_until = time.monotonic() + QUIET_S
            if not self._away:
                log.info(
                    "MLflow server %s did not answer (%s); training goes on, metrics are "
                    "queued and logged when it is back",
                    self.uri,
                    short_reason(e),
                )
            self._away = True
            return
        self.queued = []
        if self._away:
            log.info("MLflow server %s is back: the queued metrics are logged", self.uri)
            self._away = False


def rank_logger(job: Job, rank: int) -> Callable[[dict[str, float], int], None]:
    """``log_metrics(metrics, step)`` of one rank of ``job``: into its MLflow run from rank 0,
    a no-op elsewhere or without tracking (what the launchers put in the worker context)."""
    t = job.tracking
    return RunLogger(t.uri if t else None, t.run_id if t else None, rank).log_metrics
