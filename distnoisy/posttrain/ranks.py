"""EK-FAC influence scores computed by several ranks, each over its own rows.

Rank ``r`` of ``W`` reads rows ``[N r / W, N (r + 1) / W)`` of a memory-mapped feature file
(or of the rows a round kept, ``ScoreTask.rows``, read chunk by chunk from the same file),
sums its part of the two Kronecker factors, all-reduces them (a ``(C, C)`` and a ``(D, D)``
matrix: the traffic does not grow with ``N``), does the same with the EK-FAC eigenvalue
correction, then scores its rows and writes them by global index. Every rank computes the same
eigendecomposition from the same reduced sums, so the scores do not depend on the number of
ranks beyond float64 summation order. Ranks run on :func:`distnoisy.launch.ranks.run_ranks`.
"""

from __future__ import annotations

import json
import resource
import time
from dataclasses import dataclass

import numpy as np

from distnoisy.posttrain import influence as infl


@dataclass(frozen=True)
class ScoreTask:
    """Paths and head of one distributed scoring job (plain values: it is pickled)."""

    features: str  # (N_all, d) .npy
    labels: str  # (N,) .npy: the labels of the rows scored
    theta: np.ndarray  # (C, d + 1)
    mu: float
    scores: str  # (N,) float64 .npy, allocated by the driver
    report: str  # per-rank JSON, "{rank}" replaced
    corrected: bool = True
    chunk: int = 4096
    kind: str = "influence"  # or "self_influence"
    rows: str | None = None  # (N,) int64 .npy: the feature rows scored (None: all, in order)


class RowView:
    """Rows ``index`` of a (memory-mapped) array, read only when sliced: ``view[a:b]`` reads
    rows ``index[a:b]``. What the chunked influence functions need (``len`` and slices), so a
    round's kept rows are never copied whole."""

    def __init__(self, base: np.ndarray, index: np.ndarray) -> None:
        self.base, self.index = base, np.asarray(index, dtype=np.int64)

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, rows: slice) -> np.ndarray:
        return np.asarray(self.base[self.index[rows]])


def _all_reduce(arr: np.ndarray) -> np.ndarray:
    import torch
    import torch.distributed as td

    if not (td.is_available() and td.is_initialized()) or td.get_world_size() == 1:
        return arr
    t = torch.from_numpy(np.ascontiguousarray(arr))
    td.all_reduce(t)
    return t.numpy()


def _proc_status_mb(field: str) -> float:
    """``VmHWM`` (peak) or ``VmRSS`` (now) of this process in MB. Unlike ``ru_maxrss``, these
    belong to the process's own address space (``ru_maxrss`` survives ``exec`` and would
    report the parent's peak in a spawned rank)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024.0
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _peak_rss_mb() -> float:
    return _proc_status_mb("VmHWM")


def score_rank(task: ScoreTask, rank: int, world: int) -> None:
    """This rank's rows: factor sums, reduce, correction, reduce, scores (module docstring)."""
    rss0 = _proc_status_mb("VmRSS")
    t0 = time.perf_counter()
    h = np.load(task.features, mmap_mode="r")
    y = np.load(task.labels, mmap_mode="r")
    n = len(y)
    lo, hi = n * rank // world, n * (rank + 1) // world
    ys = np.asarray(y[lo:hi])
    mine = h[lo:hi] if task.rows is None else RowView(h, np.load(task.rows)[lo:hi])
    a, b = infl.kfac_factors(task.theta, mine, task.chunk)
    a, b = _all_reduce(a), _all_reduce(b)
    basis = infl.kfac_basis(a, b, n)
    if task.corrected:
        corr = _all_reduce(infl.kfac_corrections(task.theta, mine, basis.ua, basis.ub, task.chunk))
        basis = infl.kfac_basis(a, b, n, corr)
    t1 = time.perf_counter()
    got = infl.kfac_scores(task.theta, mine, ys, task.mu, basis, n, task.chunk)[task.kind]
    out = np.load(task.scores, mmap_mode="r+")
    out[lo:hi] = got
    out.flush()
    report = {
        "rank": rank,
        "rows": hi - lo,
        "factors_s": t1 - t0,
        "scores_s": time.perf_counter() - t1,
        "total_s": time.perf_counter() - t0,
        "peak_rss_mb": _peak_rss_mb(),
        "rss_at_start_mb": rss0,
    }
    with open(task.report.format(rank=rank), "w") as f:
        json.dump(report, f)
