"""What every command-line entry point shares: logging, signals and the interrupt message."""

from __future__ import annotations

import logging
import shlex
import signal
from pathlib import Path
from typing import Any


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
