"""The approximate frequency score for large sets: an inverted-file (IVF) k-NN search.

The exact score compares every query with every training row: ``N^2 d`` work, 44 minutes at
``N = 1M``, ``d = 120`` on one CPU process and days at ``N = 10M`` (docs/analysis.md#frequency).
Here the unit-length training rows are clustered into ``L`` lists around centroids found by
spherical k-means on a sample of them; a query is compared only with the rows of the
``probes`` lists whose centroids are nearest to its own list's centroid (its own list first).
The score is the same mean similarity to the ``k`` most similar rows found, so a query whose
true neighbours all lie in the probed lists gets exactly the exact score; a missed neighbour can
only lower it. With ``probes = L`` every row is compared and the score is exact (tested).

Queries are processed list by list: all queries of list ``c`` against the rows of ``c``'s probed
lists in one matrix product (chunked to :data:`CHUNK_FLOATS` similarities), so the work is
``N * probes * N / L * d`` and the memory per step is bounded whatever ``N``. The rows are read
by index from the feature matrix (memory-mapped from the run's feature cache, so no process
copies the whole set); lists are split over Ray tasks with ``num_workers > 1``, each task opening
the feature file itself.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np
import torch

#: Similarities computed at once (query rows x candidate rows), 32 MB of float32.
CHUNK_FLOATS = 1 << 23
#: Lists probed per query list (its own included).
DEFAULT_PROBES = 16
#: Spherical k-means iterations and training rows per list.
KMEANS_ITERS = 10
KMEANS_ROWS_PER_LIST = 40
#: Rows normalised at once while assigning every row to its list.
ASSIGN_ROWS = 65536


def to_score(top: torch.Tensor, metric: str) -> np.ndarray:
    """Scores from each query's ``k`` largest cosine similarities (one row per query):
    their mean (``cosine``), or minus the mean distance ``sqrt(2 - 2 cos)`` of unit vectors
    (``l2``); shared with the exact search."""
    if metric == "cosine":
        return top.mean(1).numpy().astype(np.float64)
    # ||a - b|| = sqrt(2 - 2 cos) for unit vectors; clamp rounding below zero.
    dist = torch.sqrt(torch.clamp(2.0 - 2.0 * top.double(), min=0.0))
    return (-dist.mean(1)).numpy()


def num_lists(n: int) -> int:
    """Lists for ``n`` training rows: ``2 sqrt(n)`` (about ``sqrt(n) / 2`` rows each), so the
    work per query grows as ``sqrt(n)``."""
    return int(min(max(round(2 * math.sqrt(n)), 8), 16384))


@dataclass(frozen=True)
class Rows:
    """A feature matrix the search reads rows of: in memory, or a ``.npy`` file's memory map
    (``path``, ``offset``, ``shape``), which a Ray task opens itself instead of receiving a
    copy."""

    array: np.ndarray | None
    path: str | None = None
    offset: int = 0
    shape: tuple[int, int] = (0, 0)

    @staticmethod
    def of(x: np.ndarray) -> Rows:
        mapped = isinstance(x, np.memmap) and x.filename and x.flags.c_contiguous
        if mapped and x.dtype == np.float32 and x.ndim == 2:
            shape = (int(x.shape[0]), int(x.shape[1]))
            return Rows(None, str(x.filename), int(x.offset), shape)
        return Rows(np.asarray(x))

    def open(self) -> np.ndarray:
        if self.array is not None:
            return self.array
        assert self.path is not None
        return np.memmap(self.path, np.float32, "r", offset=self.offset, shape=self.shape)

    def __len__(self) -> int:
        return len(self.array) if self.array is not None else self.shape[0]


def unit(rows: np.ndarray) -> torch.Tensor:
    """Rows as float32 scaled to unit length (zero rows stay zero)."""
    return torch.nn.functional.normalize(torch.from_numpy(np.array(rows, dtype=np.float32)), dim=1)


def _kmeans(x: np.ndarray, lists: int, seed: int) -> torch.Tensor:
    """``lists`` unit centroids by spherical k-means on a seeded sample of the rows of ``x``."""
    gen = np.random.default_rng(seed)
    n = len(x)
    take = np.sort(gen.choice(n, size=min(n, lists * KMEANS_ROWS_PER_LIST), replace=False))
    sample = unit(x[take])
    cent = sample[torch.from_numpy(gen.choice(len(sample), size=lists, replace=False))].clone()
    for _ in range(KMEANS_ITERS):
        assign = nearest(sample, cent)
        sums = torch.zeros_like(cent).index_add_(0, assign, sample)
        counts = torch.bincount(assign, minlength=lists)
        empty = counts == 0
        if empty.any():  # re-seed empty lists with random sample rows
            pick = torch.from_numpy(gen.choice(len(sample), size=int(empty.sum()), replace=False))
            sums[empty] = sample[pick]
        cent = torch.nn.functional.normalize(sums, dim=1)
    return cent


def assign(x: np.ndarray, cent: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """The list (nearest centroid) and the inverse length (0 for a zero row) of every row of
    ``x``, chunk by chunk."""
    out = np.empty(len(x), dtype=np.int64)
    inv = np.empty(len(x), dtype=np.float32)
    for s in range(0, len(x), ASSIGN_ROWS):
        rows = torch.from_numpy(np.array(x[s : s + ASSIGN_ROWS], dtype=np.float32))
        norm = rows.norm(dim=1)
        scale = torch.where(norm > 0, 1.0 / norm.clamp_min(1e-30), torch.zeros_like(norm))
        inv[s : s + ASSIGN_ROWS] = scale.numpy()
        out[s : s + ASSIGN_ROWS] = nearest(rows * scale[:, None], cent).numpy()
    return out, inv


def nearest(rows: torch.Tensor, cent: torch.Tensor) -> torch.Tensor:
    """The most similar centroid of every unit row, :data:`CHUNK_FLOATS` similarities at a time
    (whole, ``rows x lists`` grows as ``N^1.5``: 640 MB per k-means step at a million rows),
    written into one preallocated result: a list of per-chunk results, alive between the
    chunks' large transient products, fragmented the C heap (+0.6 GB resident at 1M)."""
    step = max(1, CHUNK_FLOATS // max(1, len(cent)))
    out = torch.empty(len(rows), dtype=torch.long)
    for s in range(0, len(rows), step):
        out[s : s + step] = (rows[s : s + step] @ cent.T).argmax(1)
    return out


def _unit_rows(x: np.ndarray, inv: np.ndarray, idx: np.ndarray) -> torch.Tensor:
    """Rows ``idx`` of ``x`` scaled to unit length with their known inverse lengths."""
    return torch.from_numpy(np.asarray(x[idx], dtype=np.float32) * inv[idx, None])


@dataclass(frozen=True)
class Index:
    """The inverted file: reference row ids grouped by list (``order[starts[c]:starts[c+1]]``
    are list ``c``'s rows, ascending) and each list's probe order."""

    order: np.ndarray
    starts: np.ndarray
    probe_order: np.ndarray  # (L, L): lists by centroid similarity, the list itself first
    inv_norm: np.ndarray  # 1 / length of every reference row (0 for a zero row)

    def members(self, c: int) -> np.ndarray:
        return self.order[self.starts[c] : self.starts[c + 1]]

    def candidates(self, c: int, probes: int, need: int) -> tuple[np.ndarray, int]:
        """Rows of list ``c``'s first ``probes`` lists (more while fewer than ``need`` rows),
        list ``c``'s own first; and how many lists that took."""
        sizes = np.diff(self.starts)[self.probe_order[c]]
        enough = int(np.searchsorted(np.cumsum(sizes), need)) + 1
        used = min(len(sizes), max(probes, enough))
        return np.concatenate([self.members(int(j)) for j in self.probe_order[c, :used]]), used


def build_index(ref: np.ndarray, lists: int, seed: int) -> tuple[Index, torch.Tensor, np.ndarray]:
    """``(index, centroids, list of every reference row)``."""
    cent = _kmeans(ref, lists, seed)
    ref_list, inv = assign(ref, cent)
    order = np.argsort(ref_list, kind="stable")
    starts = np.searchsorted(ref_list[order], np.arange(lists + 1))
    sim = cent @ cent.T
    sim.fill_diagonal_(math.inf)  # the list itself first
    probe_order = sim.argsort(dim=1, descending=True).numpy()
    return Index(order, starts, probe_order, inv), cent, ref_list


def score_lists(
    ref: Rows,
    queries: Rows | None,
    index: Index,
    query_order: np.ndarray,
    query_starts: np.ndarray,
    query_inv: np.ndarray | None,
    lists: list[int],
    k: int,
    probes: int,
    metric: str,
) -> tuple[np.ndarray, np.ndarray]:
    """``(query ids, scores)`` of the queries of ``lists`` (``queries`` None: the reference
    rows themselves, each one's own row excluded)."""
    r, q = ref.open(), (queries.open() if queries is not None else None)
    ids, scores = [], []
    for c in lists:
        qi = query_order[query_starts[c] : query_starts[c + 1]]
        if not len(qi):
            continue
        cand, _ = index.candidates(c, probes, k + 1)
        cvec = _unit_rows(r, index.inv_norm, cand)
        # own list first: in self mode the queries are the candidates' first rows
        qvec = cvec[: len(qi)] if q is None or query_inv is None else _unit_rows(q, query_inv, qi)
        step = max(1, CHUNK_FLOATS // len(cand))
        for s in range(0, len(qi), step):
            sim = qvec[s : s + step] @ cvec.T
            if q is None:  # a query's own row is at its position in its own list
                rows = torch.arange(len(sim))
                sim[rows, rows + s] = -math.inf
            scores.append(to_score(sim.topk(k, dim=1).values, metric))
        ids.append(qi)
    if not ids:
        return np.zeros(0, dtype=np.int64), np.zeros(0)
    return np.concatenate(ids), np.concatenate(scores)


def ivf_density(
    queries: np.ndarray,
    reference: np.ndarray | None,
    *,
    k: int,
    metric: str,
    probes: int = DEFAULT_PROBES,
    lists: int | None = None,
    num_workers: int = 1,
    seed: int = 0,
    built: tuple[Index, torch.Tensor, np.ndarray] | None = None,
) -> np.ndarray:
    """The approximate frequency score of every query row (module docstring); arguments as
    :func:`distnoisy.analyze.knn.knn_density`'s. ``built``: the reference's
    :func:`build_index` when the caller already has it (training and test queries share one)."""
    is_self = reference is None
    ref_arr = queries if is_self else reference
    assert ref_arr is not None
    if built is None:
        built = build_index(ref_arr, lists or num_lists(len(ref_arr)), seed)
    index, cent, ref_list = built
    lists = len(cent)
    q_list, q_inv = (ref_list, None) if is_self else assign(queries, cent)
    query_order = np.argsort(q_list, kind="stable")
    query_starts = np.searchsorted(q_list[query_order], np.arange(lists + 1))
    args = (index, query_order, query_starts, q_inv)
    ref_rows, q_rows = Rows.of(ref_arr), (None if is_self else Rows.of(queries))
    groups = _split(np.diff(query_starts), max(1, num_workers))
    if len(groups) > 1:
        from distnoisy.launch.cluster import map_tasks

        calls = [(q_rows, *args, g, k, probes, metric) for g in groups]
        parts = map_tasks(_task, calls, shared=ref_rows)
    else:
        parts = [score_lists(ref_rows, q_rows, *args, groups[0], k, probes, metric)]
    out = np.full(len(queries), np.nan)
    for ids, sc in parts:
        out[ids] = sc
    return out


def _task(ref: Rows, *args: object) -> tuple[np.ndarray, np.ndarray]:
    """One Ray task of :func:`ivf_density`: one thread, its share of the lists."""
    torch.set_num_threads(1)
    return score_lists(ref, *args)  # type: ignore[arg-type]


def _split(sizes: np.ndarray, parts: int) -> list[list[int]]:
    """Lists ``0..L-1`` in ``parts`` contiguous groups of about equal query counts."""
    if parts == 1:
        return [list(range(len(sizes)))]
    cum = np.cumsum(sizes)
    cuts = np.searchsorted(cum, cum[-1] * np.arange(1, parts) / parts)
    bounds = [0, *cuts.tolist(), len(sizes)]
    groups = [list(range(a, b)) for a, b in itertools.pairwise(bounds)]
    return [g for g in groups if g]
