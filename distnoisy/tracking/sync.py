"""``python -m distnoisy.tracking.sync RUN_DIR``: log what a run could not log to MLflow.

A run whose tracking server went away keeps training and keeps what the server did not take
in ``RUN_DIR/tracking_pending.json`` (:class:`~distnoisy.tracking.outbox.Outbox`): metrics,
params, tags, output files and the run's final status. Once the server is back, this command
logs them into the same MLflow run (metrics the run already holds are not logged twice) and
removes the file. Exit 0 when everything arrived (or nothing was pending), 2 with one
``distnoisy: error:`` line otherwise (the file is kept: run it again later).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from distnoisy.core.errors import DistnoisyError
from distnoisy.tracking.outbox import PENDING_FILE, Outbox

USAGE = __doc__ or ""


def sync(run_dir: Path) -> str:
    """Log ``run_dir``'s pending tracking calls; returns what was logged, in words.

    Raises
    ------
    DistnoisyError
        ``run_dir`` is not a run directory, or the server did not take everything.
    """
    path = run_dir / PENDING_FILE
    if not (run_dir / "run.json").exists() and not path.exists():
        raise DistnoisyError(f"{run_dir} is not a distnoisy run directory (it has no run.json)")
    if not path.exists():
        return f"{run_dir}: nothing to log (no {PENDING_FILE})"
    pending = json.loads(path.read_text())
    outbox = Outbox(run_dir, pending["uri"], pending["run_id"])
    what = outbox.describe()
    if not outbox.flush(force=True):
        raise DistnoisyError(
            f"the MLflow server {pending['uri']} did not take {outbox.describe()} of run "
            f"{pending['run_id']} ({outbox.last_error}); start it, then run this command again"
        )
    return f"{run_dir}: logged {what} to MLflow run {pending['run_id']} at {pending['uri']}"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or "-h" in args or "--help" in args:
        print(USAGE.strip())
        return 0 if args else 2
    try:
        if len(args) != 1:
            raise DistnoisyError("give one run directory; see --help")
        print(sync(Path(args[0])))
    except DistnoisyError as e:
        print(f"distnoisy: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
