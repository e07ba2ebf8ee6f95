"""The one lifecycle of every MLflow run distnoisy opens (train, posttrain, analyze, tune).

:func:`tracked_run` creates the run (or reopens it when a run is resumed) and always ends it:
``FINISHED`` when its block completes, ``KILLED`` on Ctrl-C or SIGTERM (``KeyboardInterrupt``,
or the ``SystemExit`` Ray's signal handlers raise), ``FAILED`` on any other error. No command
leaves a run ``RUNNING``, whatever stops it, short of SIGKILL.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

from distnoisy import tracking

#: The terminal statuses :func:`tracked_run` ends a run with.
FINISHED, FAILED, KILLED = "FINISHED", "FAILED", "KILLED"


def end_status(error: BaseException | None) -> str:
    """The status a run ends with when its block raised ``error`` (None: it completed)."""
    if error is None:
        return FINISHED
    if isinstance(error, KeyboardInterrupt | SystemExit):
        return KILLED
    return FAILED


@contextlib.contextmanager
def tracked_run(
    uri: str | None,
    experiment: str,
    run_name: str,
    params: Mapping[str, Any] | None = None,
    *,
    tags: Mapping[str, str] | None = None,
    parent_run_id: str | None = None,
    reopen: str | None = None,
    source: str = "python -m distnoisy.train",
    system_metrics: bool = False,
) -> Iterator[str | None]:
    """An MLflow run for the ``with`` block; yields its id, or None when ``uri`` is None.

    Parameters
    ----------
    uri
        Tracking URI; None = tracking off (nothing is created, the block gets None).
    experiment, run_name
        Where a new run goes and its name (ignored with ``reopen``).
    params
        Logged as the run's params (a new run only; a reopened run keeps its own).
    tags
        Tags of a new run, besides the source tags (:func:`distnoisy.tracking.source_tags`).
    parent_run_id
        Nest a new run under this one (a sweep, a comparison, a post-training's source run).
    reopen
        The id of an existing run to mark ``RUNNING`` again and reuse (a resumed run).
    source
        The command recorded as the run's source (``mlflow.source.name``).
    system_metrics
        Log this machine's CPU/GPU/memory use into the run while the block runs.

    Yields
    ------
    str or None
        The run's id (None when tracking is off).
    """
    if uri is None:
        yield None
        return
    if reopen is not None:
        tracking.reopen_run(uri, reopen)
        run_id = reopen
    else:
        run_id = tracking.start_run(
            uri,
            experiment,
            run_name,
            {},
            tags=dict(tags or {}),
            parent_run_id=parent_run_id,
            source=source,
        )
    error: BaseException | None = None
    monitor = None
    try:
        if reopen is None and params:
            tracking.log_params(uri, run_id, dict(params))
        if system_metrics:
            monitor = tracking.start_system_metrics(uri, run_id)
        yield run_id
    except BaseException as e:
        error = e
        raise
    finally:
        if monitor is not None:
            tracking.stop_system_metrics(monitor)
        tracking.end_run(uri, run_id, end_status(error))
