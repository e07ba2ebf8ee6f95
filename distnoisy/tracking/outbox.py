"""Tracking that never stops a run: what the server did not take waits in the run directory.

Once a run has started, an MLflow call that fails (the server restarted, a network blip, a
server gone for good) must not end it. Every call of the driver's goes through an
:class:`Outbox`: it is tried once (MLflow's own HTTP retries are bounded to a few seconds, see
:data:`HTTP_DEFAULTS`), and what fails (metrics, params, tags, artifacts, the run's final
status) is kept in ``run_dir/`` :data:`PENDING_FILE` and tried again with the next call. After a
failure the server is left alone for :data:`QUIET_S` seconds (calls in that time are queued
untried), so a server that stalls costs the run one timeout, not one per call.

When the run ends with something still queued, :meth:`Outbox.close` logs one warning line
naming what is missing and the command that logs it afterwards::

    python -m distnoisy.tracking.sync RUN_DIR

Metrics are logged exactly once: before a metric's queued steps are sent, the steps the
server already holds are read back (a call that timed out may have been stored), and only
the others are sent.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("distnoisy")

#: Where the calls the server did not take wait, in the run directory.
PENDING_FILE = "tracking_pending.json"
#: Seconds a server that failed a call is left alone (calls in that time are queued).
QUIET_S = 15.0
#: MLflow's HTTP client settings while distnoisy runs (unless the environment sets them): a
#: refused connection is retried twice within ~2 s and a request that gets no answer gives
#: up after 10 s, instead of MLflow's 7 retries with a 2 s backoff factor (~4 minutes) and
#: 120 s timeouts: a failed call is queued here and tried again later anyway.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
}


def bound_http_retries() -> None:
    """Apply :data:`HTTP_DEFAULTS` to this process (settings already in the environment win)
    and keep urllib3's per-retry warnings off the terminal: a failure is reported once, by
    the caller."""
    for k, v in HTTP_DEFAULTS.items():
        os.environ.setdefault(k, v)
    logging.getLogger("urllib3.connectionpool").setLevel(logging.ERROR)


def sync_command(run_dir: Path) -> str:
    """The command that logs what a run's outbox still holds."""
    import shlex

    return f"python -m distnoisy.tracking.sync {shlex.quote(str(run_dir))}"


class Outbox:
    """The MLflow calls of one run, tried now or kept in ``run_dir/`` :data:`PENDING_FILE`.

    Parameters
    ----------
    run_dir
        The run's directory (the queue lives there, so it outlives the process).
    uri, run_id
        The run's tracking URI and MLflow run id.
    """

    def __init__(self, run_dir: Path, uri: str, run_id: str) -> None:
        self.path = Path(run_dir) / PENDING_FILE
        self.run_dir = Path(run_dir)
        self.uri, self.run_id = uri, run_id
        self._quiet_until = 0.0
        self.last_error: str | None = None

    # -- the queue on disk ---------------------------------------------------------------------
    def _load(self) -> dict[str, Any]:
        if not self.path.exists():
            return {"metrics": [], "params": {}, "tags": {}, "artifacts": [], "status": None}
        return json.loads(self.path.read_text())

    def _save(self, pending: dict[str, Any]) -> None:
        if not (pending["metrics"] or pending["params"] or pending["tags"]) and not (
            pending["artifacts"] or pending["status"]
        ):
            self.path.unlink(missing_ok=True)
            return
        pending.update(uri=self.uri, run_id=self.run_id)
        tmp = self.path.with_name(f".{self.path.name}.tmp")
        tmp.write_text(json.dumps(pending, indent=1))
        os.replace(tmp, self.path)

    def pending(self) -> dict[str, Any]:
        """What is queued: ``metrics`` ([key, value, step, timestamp_ms]), ``params``, ``tags``,
        ``artifacts`` (paths relative to the run directory) and ``status`` (or None)."""
        return self._load()

    # -- what callers log ----------------------------------------------------------------------
    def log_metrics(self, metrics: dict[str, float], step: int) -> bool:
        """Log ``metrics`` at ``step`` (but those the run holds at that step already)."""
        return self.log_steps([(metrics, step)])

    def log_steps(self, steps: list[tuple[dict[str, float], int]]) -> bool:
        """:meth:`log_metrics` of several steps in one call to the server."""
        now = int(time.time() * 1000)
        rows = [
            [k, float(v), int(step), now]
            for metrics, step in steps
            for k, v in metrics.items()
            if v is not None
        ]
        return self._queue("metrics", rows)

    def log_params(self, params: dict[str, Any]) -> bool:
        return self._queue("params", {k: str(v) for k, v in params.items()})

    def set_tags(self, tags: dict[str, str]) -> bool:
        return self._queue("tags", {k: str(v) for k, v in tags.items()})

    def log_artifacts(self, paths: list[Path]) -> bool:
        """Queue the files and directories among ``paths`` that exist (inside the run dir)."""
        rel = [str(Path(p).resolve().relative_to(self.run_dir.resolve())) for p in paths]
        return self._queue("artifacts", [r for r in rel if (self.run_dir / r).exists()])

    def end(self, status: str) -> bool:
        """Mark the run ``status`` (after everything queued before it is logged)."""
        return self._queue("status", status)

    def _queue(self, kind: str, items: Any) -> bool:
        pending = self._load()
        if kind == "status":
            pending["status"] = items
        elif isinstance(items, dict):
            pending[kind].update(items)
        elif kind == "artifacts":
            pending[kind].extend(i for i in items if i not in pending[kind])
        else:
            pending[kind].extend(items)
        return self._flush(pending, force=False)

    # -- sending -------------------------------------------------------------------------------
    def flush(self, force: bool = False) -> bool:
        """Send what is queued (unless the server failed less than :data:`QUIET_S` ago and
        not ``force``); True when nothing is left."""
        if not self.path.exists():
            return True
        return self._flush(self._load(), force)

    def _flush(self, pending: dict[str, Any], force: bool) -> bool:
        """Send ``pending``; what did not arrive is saved to the queue file (which is written
        only then: a run whose server answers never writes it, even on a full disk)."""
        sent = False
        if force or time.monotonic() >= self._quiet_until:
            try:
                self._send(pending)
                sent = True
            except Exception as e:  # any failure of the server or the network: keep it queued
                self.last_error = short_reason(e)
                self._quiet_until = time.monotonic() + QUIET_S
        if sent:
            self.path.unlink(missing_ok=True)
            return True
        try:
            self._save(pending)
        except OSError as e:  # a full disk too: say what is lost rather than mask the run's end
            log.warning(
                "distnoisy: warning: the MLflow server %s did not take part of run %s (%s) and "
                "%s cannot keep it (%s): it is not logged",
                self.uri,
                self.run_id,
                self.last_error,
                self.path,
                e.strerror or e,
            )
        return False

    def _send(self, pending: dict[str, Any]) -> None:
        """Log ``pending`` in order, removing each part from it once it arrived."""
        from distnoisy.tracking import _client, log_params, set_terminated_or_raise

        client = _client(self.uri)
        if pending["params"]:
            log_params(self.uri, self.run_id, pending["params"])
            pending["params"] = {}
        if pending["tags"]:
            for k, v in pending["tags"].items():
                client.set_tag(self.run_id, k, v)
            pending["tags"] = {}
        if pending["metrics"]:
            send_metrics_once(client, self.run_id, pending["metrics"])
            pending["metrics"] = []
        while pending["artifacts"]:
            p = self.run_dir / pending["artifacts"][0]
            if p.is_dir():
                client.log_artifacts(self.run_id, str(p), artifact_path=p.name)
            elif p.exists():
                client.log_artifact(self.run_id, str(p))
            pending["artifacts"].pop(0)
        if pending["status"]:
            set_terminated_or_raise(self.uri, self.run_id, pending["status"])
            pending["status"] = None

    def describe(self) -> str:
        """What is still queued, in words (empty when nothing is)."""
        p = self._load() if self.path.exists() else None
        if p is None:
            return ""
        parts = []
        if p["metrics"]:
            steps = sorted({m[2] for m in p["metrics"]})
            parts.append(f"{len(p['metrics'])} metric values (steps {steps[0]}..{steps[-1]})")
        if p["params"]:
            parts.append(f"{len(p['params'])} params")
        if p["tags"]:
            parts.append(f"{len(p['tags'])} tags")
        if p["artifacts"]:
            parts.append(f"{len(p['artifacts'])} output files")
        if p["status"]:
            parts.append(f"the status {p['status']}")
        return ", ".join(parts)

    def close(self) -> bool:
        """A last try at what is queued; if some is left, one warning line naming it and the
        command that logs it later. True when everything was logged."""
        if self.flush(force=True):
            return True
        log.warning(
            "distnoisy: warning: the MLflow server %s did not take %s of run %s (%s); the run's "
            "outputs are complete; log them when it is back with: %s",
            self.uri,
            self.describe(),
            self.run_id,
            self.last_error,
            sync_command(self.run_dir),
        )
        return False


def short_reason(exc: BaseException) -> str:
    """Why a call to the server failed, in a few words (MLflow's messages quote whole URLs)."""
    text = str(exc)
    for needle, words in (
        ("Connection refused", "connection refused"),
        ("Read timed out", "no answer in time"),
        ("timed out", "no answer in time"),
        ("Connection reset", "connection reset"),
        ("RemoteDisconnected", "connection closed"),
        ("Name or service not known", "unknown host"),
    ):
        if needle in text:
            return words
    first = text.splitlines()[0] if text else ""
    return f"{type(exc).__name__}: {first[:160]}"


def send_metrics_once(
    client: Any, run_id: str, rows: list[list[Any]], have: dict[str, set[int]] | None = None
) -> int:
    """Log ``rows`` ([key, value, step, timestamp_ms]) but for the (key, step) pairs the run
    already holds; returns how many were sent.

    ``have``: the steps known to be logged, by metric (read from the server for the metrics it
    lacks, and updated); the caller clears it after a failure.
    """
    from mlflow.entities import Metric

    have = {} if have is None else have
    todo = []
    for key, value, step, ts in rows:
        if key not in have:
            have[key] = {m.step for m in client.get_metric_history(run_id, key)}
        if step not in have[key]:
            have[key].add(step)
            todo.append(Metric(key, float(value), int(ts), int(step)))
    for i in range(0, len(todo), 1000):  # log_batch takes at most 1000 metrics per call
        client.log_batch(run_id, metrics=todo[i : i + 1000])
    return len(todo)
