"""What this machine gives the process: the CPUs it may use, and whether its memory can hold a
number of training workers."""

from __future__ import annotations

import os

from distnoisy.core.errors import ConfigError

#: The least memory one training worker process takes (its private pages), measured on the
#: smallest job (digits, ``small_cnn``): a Ray Train worker 430-510 MB, a local launcher rank
#: 780-810 MB. A machine without this much available per worker cannot run the workers at all.
WORKER_MEMORY_FLOOR_MB = 400


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask on Linux, else every CPU)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def available_memory_bytes() -> int:
    """Memory this machine can give new processes without swapping (page cache included)."""
    import psutil

    return int(psutil.virtual_memory().available)


def check_room_for_workers(num_workers: int, available_bytes: int | None = None) -> None:
    """Fail at once, with one line, when this machine's memory cannot hold ``num_workers``
    training workers even at :data:`WORKER_MEMORY_FLOOR_MB` each.

    Without it a local run with too many workers starts them all and fails minutes later: Ray's
    memory monitor kills workers (its error then suggests restoring the cluster), or the
    kernel's OOM killer a local rank.

    Raises
    ------
    ConfigError
        ``num_workers`` workers do not fit in the available memory.
    """
    available = available_memory_bytes() if available_bytes is None else available_bytes
    floor = WORKER_MEMORY_FLOOR_MB * 2**20
    if num_workers * floor <= available:
        return
    fit = available // floor
    fix = (
        f"use scaling.num_workers={fit} or fewer here"
        if fit >= 1
        else "free memory on this machine"
    )
    raise ConfigError(
        f"scaling.num_workers={num_workers}: {num_workers} workers on this machine need at "
        f"least {num_workers * floor / 2**30:.1f} GB of memory (about {WORKER_MEMORY_FLOOR_MB} "
        f"MB each), but {available / 2**30:.1f} GB is available: {fix}, or give "
        "scaling.address of a cluster with more nodes"
    )
