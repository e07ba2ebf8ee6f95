"""A user error raised on a worker, handed to the driver as its one line (both launchers).

A :class:`~distnoisy.core.errors.DistnoisyError` (bad data past ``data.max_bad_fraction``, a
full disk) is not a crash: let out of a worker, Ray Train logs its traceback on every worker and
in its controller and retries the run ``scaling.max_failures`` times, and a spawned local
worker prints its traceback. The engine raises these on every rank together (its checks are
collective verdicts), so each rank leaves its line in a file with :func:`leave` and ends
normally; the launcher raises it again with :func:`left` once the workers are done, and the
command prints the one line.
"""

from __future__ import annotations

import os
from pathlib import Path

from distnoisy.core.errors import DistnoisyError

#: ``<dir>/<prefix><rank>.txt``: a rank's error (class name, a tab, the message).
PREFIX = ".user-error-rank"


def clear(where: Path) -> None:
    """Remove the lines an earlier segment of the run left (before the workers start)."""
    where.mkdir(parents=True, exist_ok=True)
    for stale in where.glob(f"{PREFIX}*"):
        stale.unlink()


def leave(where: Path, rank: int, error: DistnoisyError) -> None:
    """Write ``error`` for the driver (atomically; raises OSError where it cannot)."""
    path = where / f"{PREFIX}{rank:05d}.txt"
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(f"{type(error).__name__}\t{error}")
    os.replace(tmp, path)


def left(where: Path) -> DistnoisyError | None:
    """The error the lowest rank left, as its own class where it is one of
    :mod:`distnoisy.core.errors` (the command prints any of them as the same one line)."""
    from distnoisy.core import errors

    found = sorted(where.glob(f"{PREFIX}*.txt"))
    if not found:
        return None
    name, _, message = found[0].read_text().partition("\t")
    cls = getattr(errors, name, None)
    if not (isinstance(cls, type) and issubclass(cls, DistnoisyError)):
        cls = DistnoisyError
    return cls(message)
