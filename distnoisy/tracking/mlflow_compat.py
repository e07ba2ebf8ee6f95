"""Every use distnoisy makes of MLflow's internals, in one place, written against MLflow 3.17.

Today that is the system-metrics monitor. MLflow's public route to system metrics,
``mlflow.start_run(log_system_metrics=True)``, makes the run this process's active fluent run
and ends it with ``mlflow.end_run()``; distnoisy's driver owns its run's lifecycle through an
``MlflowClient`` (FINISHED, FAILED or KILLED, see :mod:`distnoisy.tracking`), so it drives
``mlflow.system_metrics.system_metrics_monitor.SystemMetricsMonitor`` itself (an importable
class with no leading underscore, but not part of MLflow's documented API). Logging the last,
partial sampling interval has no API at all: :func:`stop_system_metrics` uses the monitor's
methods and attributes listed in :data:`MONITOR_INTERNALS`.

When an upgrade removes one, ``tests/test_compat.py`` fails naming it; at run time
:func:`stop_system_metrics` logs one warning naming what is missing and logs what MLflow's own
``finish()`` logs (the samples of the last partial interval are then lost, and said to be).
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

#: The MLflow release these internals were read from.
WRITTEN_FOR = "3.17"

#: What :func:`stop_system_metrics` uses beyond ``start()``/``finish()``: the monitor's
#: attribute -> what it must be. ``monitors`` is a list of metric monitors, each with a
#: ``metrics`` mapping; ``mlflow_logger`` is a batch logger with ``flush()``.
MONITOR_INTERNALS = {
    "monitors": "a list of monitors with .metrics",
    "collect_metrics": "a method collect_metrics()",
    "aggregate_metrics": "a method aggregate_metrics() -> dict",
    "publish_metrics": "a method publish_metrics(metrics)",
    "mlflow_logger": "a batch logger with .flush()",
}


def start_system_metrics(uri: str, run_id: str) -> Any:
    """Start logging this machine's CPU/GPU/memory use to the run (MLflow system metrics);
    returns the monitor, whose ``finish()`` stops it."""
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(run_id, tracking_uri=uri, resume_logging=True)
    monitor.start()
    return monitor


def missing_internals(monitor: Any) -> list[str]:
    """The entries of :data:`MONITOR_INTERNALS` that ``monitor`` lacks or has in another shape
    (empty on MLflow 3.17)."""
    missing = []
    monitors = getattr(monitor, "monitors", None)
    if not isinstance(monitors, list) or not all(hasattr(m, "metrics") for m in monitors):
        missing.append("monitors")
    for name in ("collect_metrics", "aggregate_metrics", "publish_metrics"):
        if not callable(getattr(monitor, name, None)):
            missing.append(name)
    if not callable(getattr(getattr(monitor, "mlflow_logger", None), "flush", None)):
        missing.append("mlflow_logger")
    return missing


def stop_system_metrics(monitor: Any) -> None:
    """Stop the monitor and log the samples of its last, partial interval.

    MLflow's monitor drops those on shutdown, so a run shorter than one sampling interval
    (10 s by default) would otherwise get no system metrics at all. Never raises: the
    machine's use is a diagnostic and must not fail a finished run.
    """
    try:
        monitor.finish()
    except Exception as e:
        log.warning("could not stop the system metrics monitor: %s", e)
        return
    missing = missing_internals(monitor)
    if missing:
        import mlflow

        log.warning(
            "MLflow %s's SystemMetricsMonitor lacks %s (distnoisy is written for MLflow %s): "
            "the system metrics of its last, partial interval (up to %g s) are not logged",
            mlflow.__version__,
            ", ".join(f"{n} ({MONITOR_INTERNALS[n]})" for n in missing),
            WRITTEN_FOR,
            getattr(monitor, "sampling_interval", 10),
        )
        return
    try:
        if not any(m.metrics for m in monitor.monitors):
            monitor.collect_metrics()
        monitor.publish_metrics(monitor.aggregate_metrics())
        monitor.mlflow_logger.flush()
    except Exception as e:
        log.warning("could not log the last system metrics: %s", e)
