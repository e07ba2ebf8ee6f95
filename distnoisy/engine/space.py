"""A full disk is one line, not a half-written checkpoint or output.

Before a checkpoint or the run's outputs are copied to where they stay, every rank adds up
what it is about to write and the ranks agree (a collective) whether the destination has room
for all of it: if not, every rank raises :class:`DiskFullError` together (no rank is left
waiting in a collective), before anything is written. A write that still fails for lack of
space (the disk filled in between) is turned into the same error by :func:`no_space_error`
after the caller removed its partial file. Either way the previous checkpoint is untouched,
so the run resumes from it once space is freed.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shlex
import shutil
from pathlib import Path

from distnoisy.core.errors import DistnoisyError
from distnoisy.engine import collectives

#: Headroom asked for beyond the bytes of the files themselves (file system blocks, metadata).
MARGIN_BYTES = 1 << 20
#: The errors of a write that found no space (a full device, a user's quota).
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


class DiskFullError(DistnoisyError):
    """A checkpoint or output did not fit on its device."""


def tree_bytes(path: Path | None) -> int:
    """Bytes of the file or every file under the directory ``path`` (0 for None)."""
    if path is None or not path.exists():
        return 0
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def free_bytes(path: Path) -> int:
    """Free bytes (for this user) on the device that holds ``path`` or its nearest ancestor."""
    p = path.resolve()
    while not p.exists() and p != p.parent:
        p = p.parent
    return shutil.disk_usage(p).free


def is_no_space(exc: BaseException) -> bool:
    return isinstance(exc, OSError) and exc.errno in NO_SPACE


def _mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def _message(what: str, dest: Path, need: int, free: int, run_dir: Path) -> str:
    resume = shlex.quote(f"output_dir={run_dir}")
    return (
        f"no space left on the device of {dest} for {what}: it needs {_mib(need)}, "
        f"{_mib(free)} free; the last complete checkpoint is kept: free space (or move the run "
        f"to a larger disk), then continue with: python -m distnoisy.train {resume} resume=true"
    )


def check_room(what: str, dest: Path, own: Path | None, run_dir: Path) -> None:
    """Raise :class:`DiskFullError` on every rank when the bytes all ranks are about to write
    under ``dest`` (this rank's: ``own``) do not fit on its device (a collective: call on all
    ranks).

    Parameters
    ----------
    what
        What is written, in words (``"the checkpoint of epoch 3"``).
    dest
        Where it goes (need not exist yet).
    own
        This rank's file or directory to be copied there (None: nothing).
    run_dir
        The run's directory, for the command that resumes it.
    """
    need, free = tree_bytes(own), free_bytes(dest)
    gathered = collectives.all_gather_object((need, free))
    total = sum(n for n, _ in gathered)
    least = min(f for _, f in gathered)  # the same verdict on every rank
    if total + MARGIN_BYTES > least:
        raise DiskFullError(_message(what, dest, total + MARGIN_BYTES, least, run_dir))


def no_space_error(what: str, dest: Path, need: int, run_dir: Path) -> DiskFullError:
    """The error of a write of ``need`` bytes under ``dest`` that ran out of space (the
    caller has removed what it wrote)."""
    return DiskFullError(_message(what, dest, need, free_bytes(dest), run_dir))


def remove(path: Path) -> None:
    """Remove a partial file or directory, if it is there."""
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
