"""What the benchmarks share: the ``docs/benchmarks.md`` header, machine facts, ``--note``."""

from __future__ import annotations

import os
import platform

import torch

from distnoisy.core import result_docs as reporting

DOC_HEADER = reporting.BENCHMARKS_HEADER


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return float("nan")


def machine_info() -> dict[str, str]:
    """Where the figures came from."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "platform": platform.platform(),
        "cpu": cpu or "unknown",
        "cpu_count": str(os.cpu_count()),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": str(torch.get_num_threads()),
    }


def _without_note(argv: list[str]) -> list[str]:
    """``argv`` less ``--note TEXT`` / ``--note=TEXT`` (the note is printed on its own)."""
    out, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--note":
            skip = True
        elif not arg.startswith("--note="):
            out.append(arg)
    return out
