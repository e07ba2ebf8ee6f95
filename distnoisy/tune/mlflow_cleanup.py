"""MLflow clean-up after a sweep: runs of early-stopped or interrupted trials end KILLED."""

from __future__ import annotations

from distnoisy.tune.report import TrialRow

STOPPED_TAG = "distnoisy.stopped_early"


def close_orphaned_runs(uri: str, rows: list[TrialRow], max_epochs: int) -> int:
    """Mark the MLflow runs of trials the scheduler stopped KILLED, with the epochs they ran.

    Stopping a trial kills its actor mid-``fit()``: ``train()`` either never ends the run (left
    RUNNING) or sees the teardown as an error (FAILED). Tune knows better: it stopped them.
    """
    from distnoisy import tracking

    client = tracking._client(uri)
    closed = 0
    for row in rows:
        if row.mlflow_run_id is None or row.status not in ("stopped", "failed"):
            continue
        current = tracking.run_status(uri, row.mlflow_run_id)
        if current == "FINISHED" or (row.status == "failed" and current != "RUNNING"):
            continue
        reason = (
            f"stopped early by the scheduler after {row.epochs} of {max_epochs} epochs"
            if row.status == "stopped"
            else "trial failed"
        )
        client.set_tag(row.mlflow_run_id, STOPPED_TAG, str(row.status == "stopped").lower())
        client.set_tag(row.mlflow_run_id, "distnoisy.end_reason", reason)
        tracking.RunLogger(uri, row.mlflow_run_id, 0).log_metrics(
            {"epochs_run": row.epochs}, step=max(row.epochs - 1, 0)
        )
        tracking.end_run(uri, row.mlflow_run_id, "KILLED" if row.status == "stopped" else "FAILED")
        closed += 1
    return closed


def mark_interrupted_runs(uri: str, parent_run_id: str) -> None:
    """On resume: trial runs left RUNNING by a killed sweep driver are KILLED (until resumed)."""
    from distnoisy import tracking

    client = tracking._client(uri)
    parent = client.get_run(parent_run_id)
    runs = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent_run_id}' and status = 'RUNNING'",
    )
    for run in runs:
        client.set_tag(run.info.run_id, "distnoisy.end_reason", "sweep driver interrupted")
        tracking.end_run(uri, run.info.run_id, "KILLED")
