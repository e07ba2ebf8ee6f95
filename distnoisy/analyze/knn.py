"""The frequency (rarity) score: k-nearest-neighbour density in a feature space.

A sample is *frequent* when many training samples look like it. The score of a query ``x`` is
its mean similarity to its ``k`` nearest training samples (docs/analysis.md#frequency):

- ``cosine``: ``mean_j cos(x, t_j)`` over the ``k`` most similar training rows ``t_j``;
- ``l2``: ``-mean_j ||x/|x| - t_j/|t_j| ||`` over the ``k`` closest (features normalised to
  unit length first, so the two metrics rank neighbours identically; only the averaged value
  differs).

Higher = denser neighbourhood = more frequent. A training sample is never its own neighbour
(its own row is excluded; exact duplicates at other rows still count, as they should).

Two searches (``search``):

- ``exact``: chunked, a block of query rows against all training rows at a time, so memory is
  ``block_rows x N_train`` floats whatever the set size; the work is ``N^2 d`` (26.5 s at
  ``N = 100k``, ``d = 120`` on one CPU process: 44 minutes at 1M). Blocks are independent, so
  large sets are split over Ray tasks (``num_workers > 1``).
- ``ivf``: the approximate inverted-file search of :mod:`distnoisy.analyze.ivf`, ``N^1.5 d``
  work; its agreement with the exact score is measured in docs/analysis.md#frequency.

``auto`` (the default) is exact up to :data:`EXACT_MAX_ROWS` training rows and ``ivf`` above.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from distnoisy.analyze.ivf import DEFAULT_PROBES, to_score
from distnoisy.core.errors import ConfigError

#: ``analysis.metric`` choices.
METRICS = ("cosine", "l2")
#: ``analysis.search`` choices.
SEARCHES = ("auto", "exact", "ivf")
#: ``search="auto"`` is exact up to this many training rows (about 7 s on one process at
#: d = 120), approximate above.
EXACT_MAX_ROWS = 50_000
#: Query rows per chunk: 1024 x N_train float32 similarities (40 MB at N_train = 10,000).
BLOCK_ROWS = 1024
#: Below this many query rows the score is computed in the calling process.
PARALLEL_MIN_ROWS = 20000


def normalise(features: np.ndarray) -> torch.Tensor:
    """Rows scaled to unit L2 norm (all-zero rows stay zero), as float32."""
    x = torch.from_numpy(np.array(features, dtype=np.float32))  # a copy: inputs may be read-only
    return torch.nn.functional.normalize(x, dim=1)


def block_scores(
    queries: torch.Tensor,
    reference: torch.Tensor,
    k: int,
    metric: str,
    self_offset: int | None,
) -> np.ndarray:
    """Scores of a block of normalised ``queries`` against normalised ``reference``.

    ``self_offset``: the reference row of the block's first query when the queries are the
    reference rows themselves (their own rows are excluded), else None.
    """
    sim = queries @ reference.T
    if self_offset is not None:
        rows = torch.arange(len(queries))
        sim[rows, rows + self_offset] = -math.inf
    return to_score(sim.topk(k, dim=1).values, metric)


def check_k(n_ref: int, k: int, metric: str, is_self: bool) -> None:
    """Raise :class:`ConfigError` unless ``k`` neighbours exist among ``n_ref`` rows."""
    if metric not in METRICS:
        raise ConfigError(
            f"invalid analysis.metric={metric!r}; valid choices: {', '.join(METRICS)}"
        )
    available = n_ref - 1 if is_self else n_ref
    if not 1 <= k <= available:
        raise ConfigError(
            f"analysis.k={k} neighbours, but the training set has {available} other samples; "
            f"set analysis.k between 1 and {available}"
        )


def _parallel_blocks(
    q: torch.Tensor,
    ref: torch.Tensor,
    k: int,
    metric: str,
    is_self: bool,
    num_workers: int,
    block_rows: int,
) -> np.ndarray:
    """The query rows split over ``num_workers`` Ray tasks
    (:func:`distnoisy.launch.cluster.map_tasks`), each scoring its share in chunks of
    ``block_rows``; the reference is shared once."""
    from distnoisy.launch.cluster import map_tasks

    step = max(block_rows, math.ceil(len(q) / num_workers))
    calls = [
        (q[s : s + step].numpy(), s if is_self else None, k, metric, block_rows)
        for s in range(0, len(q), step)
    ]
    return np.concatenate(map_tasks(_score_task, calls, shared=ref.numpy()))


def _score_task(
    reference: np.ndarray,
    block: np.ndarray,
    offset: int | None,
    k: int,
    metric: str,
    block_rows: int,
) -> np.ndarray:
    """One Ray task of :func:`_parallel_blocks` (the reference arrives read-only: copied)."""
    torch.set_num_threads(1)
    ref = torch.from_numpy(reference.copy())
    return _score_blocks(torch.from_numpy(block), ref, k, metric, offset, block_rows)


def _score_blocks(
    q: torch.Tensor,
    ref: torch.Tensor,
    k: int,
    metric: str,
    offset: int | None,
    block_rows: int,
) -> np.ndarray:
    """:func:`block_scores` over ``q`` in chunks of ``block_rows`` rows; ``offset`` is the
    reference row of ``q``'s first row when the queries are reference rows, else None."""
    out = [
        block_scores(q[s : s + block_rows], ref, k, metric, None if offset is None else offset + s)
        for s in range(0, len(q), block_rows)
    ]
    return np.concatenate(out) if out else np.zeros(0)


def knn_density(
    queries: np.ndarray,
    reference: np.ndarray | None = None,
    *,
    k: int = 10,
    metric: str = "cosine",
    num_workers: int = 1,
    block_rows: int = BLOCK_ROWS,
    parallel_min_rows: int = PARALLEL_MIN_ROWS,
    search: str = "auto",
    probes: int = DEFAULT_PROBES,
) -> np.ndarray:
    """The frequency score of every query row against the reference (training) rows.

    Parameters
    ----------
    queries
        ``(n, d)`` features of the samples to score.
    reference
        ``(N, d)`` features of the training samples; None = ``queries`` are the training
        samples themselves (each one's own row is excluded).
    k
        Neighbours averaged over.
    metric
        ``"cosine"`` or ``"l2"`` (module docstring).
    num_workers
        Ray tasks to split the query rows over when there are at least
        :data:`PARALLEL_MIN_ROWS` of them (Ray is started, or joined, as training does);
        1 = in this process.
    block_rows
        Query rows per chunk in this process.
    parallel_min_rows
        Fewer query rows than this are scored in this process whatever ``num_workers``
        (exact search).
    search
        ``"exact"``, ``"ivf"`` (approximate) or ``"auto"``: exact up to
        :data:`EXACT_MAX_ROWS` reference rows.
    probes
        ``ivf``: lists searched per query list (more = closer to exact, slower).

    Returns
    -------
    numpy.ndarray
        ``(n,)`` float64 scores, higher = more frequent.
    """
    is_self = reference is None
    n_ref = len(queries) if reference is None else len(reference)
    check_k(n_ref, k, metric, is_self)
    if search not in SEARCHES:
        raise ConfigError(f"invalid analysis.search={search!r}; valid: {', '.join(SEARCHES)}")
    if uses_ivf(search, n_ref):
        from distnoisy.analyze.ivf import ivf_density

        return ivf_density(
            queries, reference, k=k, metric=metric, probes=probes, num_workers=num_workers
        )
    q = normalise(queries)
    ref = q if is_self else normalise(reference)
    if num_workers > 1 and len(q) >= parallel_min_rows:
        return _parallel_blocks(q, ref, k, metric, is_self, num_workers, block_rows)
    return _score_blocks(q, ref, k, metric, 0 if is_self else None, block_rows)


def uses_ivf(search: str, n_ref: int) -> bool:
    """Whether ``search`` over ``n_ref`` training rows is the approximate one."""
    return search == "ivf" or (search == "auto" and n_ref > EXACT_MAX_ROWS)


def train_test_density(
    train: np.ndarray,
    test: np.ndarray,
    *,
    k: int = 10,
    metric: str = "cosine",
    num_workers: int = 1,
    search: str = "auto",
    probes: int = DEFAULT_PROBES,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`knn_density` of the training rows (each against the others) and of the test rows
    (against the training rows). The approximate search builds the training rows' index
    (k-means and the assignment of every row) once for both."""
    common = dict(k=k, metric=metric, num_workers=num_workers, probes=probes)
    if search not in SEARCHES or not uses_ivf(search, len(train)):
        return (
            knn_density(train, None, search=search, **common),  # type: ignore[arg-type]
            knn_density(test, train, search=search, **common),  # type: ignore[arg-type]
        )
    from distnoisy.analyze.ivf import build_index, ivf_density, num_lists

    check_k(len(train), k, metric, True)
    built = build_index(train, num_lists(len(train)), seed=0)
    return (
        ivf_density(train, None, built=built, **common),  # type: ignore[arg-type]
        ivf_density(test, train, built=built, **common),  # type: ignore[arg-type]
    )
