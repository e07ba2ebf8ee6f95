"""Stop a local Ray cluster's processes when the driver that started it is killed outright.

``ray.init()`` makes its head processes (GCS, raylet, dashboard, monitors) die with the driver,
but processes the raylet starts (the dashboard and runtime-env agents, idle workers) outlive a
driver killed with SIGKILL: they are left orphaned, holding memory and ports. ``python -m
distnoisy.launch.reaper PID`` watches the driver ``PID`` from a process of its own: it notes the
driver's descendants every half second and, once the driver is gone, kills the ones noted that
are still the same processes (same start time: a reused PID is never touched). Linux only
(``/proc``); elsewhere :func:`start` does nothing.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

POLL_S = 0.5


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent PID, start time in clock ticks) of a live process, None if it is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (2nd field) may hold spaces or parentheses: split after its last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    if fields[0] == "Z":  # a zombie has exited already
        return None
    return int(fields[1]), int(fields[19])


def descendants(root: int) -> dict[int, int]:
    """``{pid: start time}`` of every live descendant of ``root`` (not ``root`` itself)."""
    children: dict[int, list[int]] = {}
    starts: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            st = _stat(int(entry))
            if st is not None:
                children.setdefault(st[0], []).append(int(entry))
                starts[int(entry)] = st[1]
    found: dict[int, int] = {}
    todo = list(children.get(root, []))
    while todo:
        pid = todo.pop()
        if pid not in found:
            found[pid] = starts[pid]
            todo.extend(children.get(pid, []))
    return found


def watch(driver: int, poll_s: float = POLL_S) -> int:
    """Note ``driver``'s descendants until it is gone, then kill those still running."""
    seen: dict[int, int] = {}
    me = os.getpid()
    while _stat(driver) is not None:
        seen.update({p: t for p, t in descendants(driver).items() if p != me})
        time.sleep(poll_s)
    killed = 0
    for pid, started in seen.items():
        st = _stat(pid)
        if st is not None and st[1] == started:
            try:
                os.kill(pid, signal.SIGKILL)
                killed += 1
            except OSError:
                pass
    return killed


def start() -> subprocess.Popen | None:
    """Start the watcher of this process (in its own session, so a Ctrl-C to the driver's
    terminal does not stop it first); None where ``/proc`` does not exist."""
    if not Path("/proc/self/stat").exists():
        return None
    return subprocess.Popen(
        [sys.executable, "-m", "distnoisy.launch.reaper", str(os.getpid())],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
        close_fds=True,
    )


if __name__ == "__main__":
    watch(int(sys.argv[1]))
