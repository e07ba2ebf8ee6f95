"""Commands run as a user types them, with the memory of every process they start.

:func:`run_command` starts one command line, records the time of every line it prints, and
samples the command's whole process tree (the command and every descendant: a local Ray
cluster's GCS, raylet and workers, loader and converter processes) every ``interval`` seconds
in a thread: each process's resident set (``VmRSS``), its high-water mark (``VmHWM``, the
kernel's own record of its peak, exact between samples) and the CPU time it has used (user +
system). :meth:`CommandRecord.peak` gives the largest process of the command, or of a time
window inside it; :meth:`CommandRecord.cpu_seconds` the CPU time of the whole tree (on a shared
machine the work done, whatever the wait: a process that ends between two samples loses at
most its last ``interval``).
"""

from __future__ import annotations

import os
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

#: Seconds between samples of the process tree.
INTERVAL = 0.25


@dataclass
class ProcessTrace:
    """One process's samples: ``(time, rss_mb, hwm_mb, cpu_s)``."""

    pid: int
    name: str
    samples: list[tuple[float, float, float, float]] = field(default_factory=list)

    def cpu(self, t0: float, t1: float) -> float:
        """CPU seconds it used in ``[t0, t1]`` (as sampled)."""
        before = [s[3] for s in self.samples if s[0] < t0]
        inside = [s[3] for s in self.samples if t0 <= s[0] <= t1]
        if not inside:
            return 0.0
        return max(inside) - (max(before) if before else 0.0)

    def peak(self, t0: float, t1: float) -> float:
        """Its largest resident set in ``[t0, t1]`` (MB; 0 when it did not run then).

        When its high-water mark rose inside the window, the new mark is the window's peak
        (exact); otherwise the largest sampled resident set inside the window."""
        inside = [s for s in self.samples if t0 <= s[0] <= t1]
        if not inside:
            return 0.0
        before = [s[2] for s in self.samples if s[0] < t0]
        mark_before = max(before) if before else 0.0
        mark_end = max(s[2] for s in inside)
        if mark_end > mark_before:
            return mark_end
        return max(s[1] for s in inside)


@dataclass
class CommandRecord:
    """What one command did: its wall time, exit code, output lines with their times, and
    the processes of its tree."""

    argv: list[str]
    start: float
    end: float = 0.0
    returncode: int | None = None
    lines: list[tuple[float, str]] = field(default_factory=list)
    processes: dict[int, ProcessTrace] = field(default_factory=dict)

    @property
    def wall_s(self) -> float:
        return self.end - self.start

    def peak(self, t0: float | None = None, t1: float | None = None) -> tuple[float, str]:
        """``(MB, process name)`` of the largest process in ``[t0, t1]`` (default: all)."""
        t0 = self.start if t0 is None else t0
        t1 = self.end if t1 is None else t1
        best = (0.0, "")
        for trace in self.processes.values():
            mb = trace.peak(t0, t1)
            if mb > best[0]:
                best = (mb, trace.name)
        return best

    def cpu_seconds(self, t0: float | None = None, t1: float | None = None) -> float:
        """CPU seconds (user + system) of the whole tree in ``[t0, t1]`` (default: all)."""
        t0 = self.start if t0 is None else t0
        t1 = self.end if t1 is None else t1
        return sum(trace.cpu(t0, t1) for trace in self.processes.values())

    def first_line(self, needle: str, after: float = 0.0) -> float | None:
        """Time of the first output line containing ``needle`` printed after ``after``."""
        return next((t for t, line in self.lines if needle in line and t > after), None)

    def last_line(self, needle: str) -> float | None:
        """Time of the last output line containing ``needle``."""
        return next((t for t, line in reversed(self.lines) if needle in line), None)


_TICK = os.sysconf("SC_CLK_TCK")


def _status_mb(pid: int) -> tuple[float, float, float] | None:
    """``(VmRSS MB, VmHWM MB, CPU seconds)`` of a process, or None when it is gone (or a
    zombie)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if line.startswith(("VmRSS", "VmHWM")))
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read().rsplit(")", 1)[1].split()
    except (OSError, ValueError, IndexError):
        return None
    if "VmRSS" not in fields:
        return None
    cpu = (int(stat[11]) + int(stat[12])) / _TICK  # utime, stime (fields 14, 15)
    rss, hwm = (int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))
    return rss, hwm, cpu


def _name(proc: psutil.Process) -> str:
    try:
        cmd = proc.cmdline()
    except (psutil.Error, OSError):
        return "?"
    if not cmd:
        return proc.name() if proc.is_running() else "?"
    if cmd[0].startswith("ray::"):
        return cmd[0]
    text = " ".join(os.path.basename(c) if i == 0 else c for i, c in enumerate(cmd))
    return text[:120]


def _provisional(name: str) -> bool:
    return not name.startswith("ray::") or name.startswith("ray::IDLE")


def _sample(root: psutil.Process, record: CommandRecord, stop: threading.Event) -> None:
    while True:
        now = time.perf_counter()
        try:
            procs = [root, *root.children(recursive=True)]
        except psutil.Error:
            procs = []
        for proc in procs:
            mb = _status_mb(proc.pid)
            if mb is None:
                continue
            trace = record.processes.get(proc.pid)
            if trace is None:
                trace = record.processes[proc.pid] = ProcessTrace(proc.pid, _name(proc))
            elif _provisional(trace.name) and len(trace.samples) % 8 == 0:
                # A Ray worker starts as ``python setup_worker.py ...``, is ``ray::IDLE``
                # while it waits, and takes its ``ray::<actor or task>`` title once it runs one.
                trace.name = _name(proc)
            trace.samples.append((now, *mb))
        if stop.wait(INTERVAL):
            return


def run_command(
    argv: list[str], cwd: Path, log_path: Path, env: dict | None = None
) -> CommandRecord:
    """Run ``argv`` in ``cwd`` to the end; its output (stdout and stderr) goes to ``log_path``
    and, with the time of each line, into the returned record."""
    record = CommandRecord(list(argv), time.perf_counter())
    with open(log_path, "a") as log:
        log.write(f"$ {' '.join(argv)}\n")
        log.flush()
        proc = subprocess.Popen(
            argv,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        stop = threading.Event()
        sampler = threading.Thread(
            target=_sample, args=(psutil.Process(proc.pid), record, stop), daemon=True
        )
        sampler.start()
        assert proc.stdout is not None
        for line in proc.stdout:
            record.lines.append((time.perf_counter(), line.rstrip("\n")))
            log.write(line)
            log.flush()
        record.returncode = proc.wait()
        record.end = time.perf_counter()
        stop.set()
        sampler.join()
    return record
