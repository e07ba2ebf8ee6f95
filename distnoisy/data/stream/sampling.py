"""Orders of samples: interleaving open shards, the shuffle buffer, the shard-to-rank
assignment and class-balanced subsets.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np

from distnoisy.data.stream.seeds import _TAG_BALANCED, _TAG_SHARD_ORDER, mix_seed
from distnoisy.data.stream.tar_index import Raw


def _interleave(
    readers: Sequence[Callable[[], Iterator[Raw]]],
    expected: Sequence[int],
    width: int,
    rng: random.Random,
) -> Iterator[Raw]:
    """Samples of ``width`` shards at a time, mixed at random; a function of ``rng``'s seed.

    ``readers[i]()`` opens shard ``i`` (in this pass's order); ``expected[i]`` is how many samples
    it should yield. The next sample comes from an open shard chosen with probability
    proportional to the samples it has left, so the open shards drain together and their
    samples are spread evenly over the stream; a finished shard is replaced by the next one.
    This is what lets a stream mix a set whose shards each hold few classes: the shuffle buffer
    behind it only reorders what it is fed, and fed one shard at a time it cannot mix more than
    ``shuffle_buffer`` samples of consecutive shards. ``width <= 1`` reads the shards one
    after the other (the same samples, in the same order, as reading them as one list).
    """
    pending = iter(range(len(readers)))
    slots: list[Iterator[Raw]] = []
    left: list[int] = []

    def open_next() -> bool:
        i = next(pending, None)
        if i is None:
            return False
        slots.append(readers[i]())
        left.append(max(int(expected[i]), 1))
        return True

    while len(slots) < max(width, 1) and open_next():
        pass
    while slots:
        j = 0 if len(slots) == 1 else rng.choices(range(len(slots)), weights=left)[0]
        item = next(slots[j], None)
        if item is None:  # finished (or cut short: the reader records why)
            del slots[j], left[j]
            open_next()
            continue
        left[j] = max(left[j] - 1, 1)  # a shard longer than its count stays drawable
        yield item


def _buffer_shuffle(items: Iterable[Raw], size: int, rng: random.Random) -> Iterator[Raw]:
    """Shuffle with a buffer of ``size`` items; a deterministic function of ``rng``'s seed."""
    if size <= 1:
        yield from items
        return
    buf: list[Raw] = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        j = rng.randrange(size)
        yield buf[j]
        buf[j] = item
    rng.shuffle(buf)
    yield from buf


def assign_shards(counts: Sequence[int], world_size: int, seed: int, epoch: int) -> list[list[int]]:
    """Shard indices per rank for ``split="shard"``, in this epoch's order.

    Shards are permuted by ``(seed, epoch)``, then, largest first (ties in permuted order), each
    goes to the rank with the fewest samples so far (ties to the lowest rank). Depends only on
    the arguments, so every rank computes the same assignment without communicating.
    """
    order = list(range(len(counts)))
    random.Random(mix_seed(seed, epoch, _TAG_SHARD_ORDER)).shuffle(order)
    loads = [0] * world_size
    assigned: list[list[int]] = [[] for _ in range(world_size)]
    for i in sorted(order, key=lambda k: -counts[k]):  # sorted() is stable
        r = min(range(world_size), key=lambda q: (loads[q], q))
        assigned[r].append(i)
        loads[r] += counts[i]
    rank_of = {i: r for r, shards in enumerate(assigned) for i in shards}
    # Read each rank's shards in the permuted order, not largest-first.
    return [[i for i in order if rank_of[i] == r] for r in range(world_size)]


class BalancedSubset:
    """Class-balanced training subsets, one per epoch (the Clothing1M protocol).

    Draws ``size_target`` samples the way DivideMix and ELR+ do: walk a random permutation of
    the training set and keep a sample while its (given) class has fewer than
    ``ceil(size_target / C)`` kept and fewer than ``size_target`` are kept in all. A class with
    fewer samples than its cap contributes all of them, so :attr:`size` can be smaller than
    ``size_target``; it is the same for every epoch and seed. Deterministic from ``seed`` (and
    the epoch when ``resample``; otherwise the epoch-0 subset is reused, as in the ELR+ code).
    Picklable: travels into loader workers.

    Parameters
    ----------
    labels
        Given (noisy) label of every training sample, by global index.
    size_target
        Samples per epoch, ``num_batches * global_batch_size``.
    seed
        Run seed.
    resample
        A new subset each epoch (True) or the first one every epoch (False).
    """

    def __init__(
        self, labels: np.ndarray, size_target: int, *, seed: int, resample: bool = True
    ) -> None:
        self.labels = np.asarray(labels).astype(np.int16 if labels.max() < 2**15 else np.int64)
        self.num_classes = int(self.labels.max()) + 1 if len(self.labels) else 0
        self.size_target = int(size_target)
        self.seed = int(seed)
        self.resample = bool(resample)
        self.cap = -(-self.size_target // max(self.num_classes, 1))
        per_class = np.bincount(self.labels, minlength=self.num_classes)
        self.size = int(min(self.size_target, np.minimum(per_class, self.cap).sum()))

    def indices(self, epoch: int) -> np.ndarray:
        """Sorted global indices drawn for ``epoch`` (exactly :attr:`size` of them)."""
        rng = np.random.default_rng(
            mix_seed(self.seed, epoch if self.resample else 0, _TAG_BALANCED)
        )
        perm = rng.permutation(len(self.labels))
        lab = self.labels[perm].astype(np.int64)
        # Occurrence number of each position's class so far, in permutation order.
        order = np.argsort(lab, kind="stable")
        starts = np.searchsorted(lab[order], np.arange(self.num_classes))
        occurrence = np.empty(len(lab), dtype=np.int64)
        occurrence[order] = np.arange(len(lab)) - starts[lab[order]]
        kept = perm[occurrence < self.cap][: self.size]
        return np.sort(kept)

    def mask(self, epoch: int) -> np.ndarray:
        m = np.zeros(len(self.labels), dtype=bool)
        m[self.indices(epoch)] = True
        return m


class KeptSubset:
    """A fixed sample mask by global index (``data.exclude_file``): the excluded samples are
    never yielded, in every epoch and on every rank.

    Same interface as :class:`BalancedSubset` (``mask(epoch)``, ``size``), so the stream treats
    it the same way: every rank holds the same mask, ``steps_per_epoch`` is computed from the
    kept count, unkept members are skipped undecoded. Picklable: travels into loader workers.

    Parameters
    ----------
    num_samples
        Size of the training set.
    excluded
        Global indices never to yield (duplicates allowed; each must be in range).
    """

    def __init__(self, num_samples: int, excluded: np.ndarray) -> None:
        excluded = np.asarray(excluded, dtype=np.int64)
        if len(excluded) and (excluded.min() < 0 or excluded.max() >= num_samples):
            raise ValueError(f"excluded indices must be in [0, {num_samples})")
        self._keep = np.ones(num_samples, dtype=bool)
        self._keep[excluded] = False
        self.size = int(self._keep.sum())

    def mask(self, epoch: int) -> np.ndarray:
        """The kept samples (the same for every epoch)."""
        return self._keep


def read_index_file(path: str, num_samples: int, key: str = "data.exclude_file") -> np.ndarray:
    """Global indices from a ``.npy`` (integer array) or ``.parquet`` (``index`` column) file.

    Raises
    ------
    ConfigError
        One line: a missing or unreadable file, non-integer values, or an index outside
        ``[0, num_samples)``.
    """
    from pathlib import Path

    from distnoisy.core.errors import ConfigError

    p = Path(path).expanduser()
    if not p.is_file():
        raise ConfigError(f"{key}={path}: no such file; give a .npy or .parquet of indices")
    try:
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            idx = pq.read_table(p, columns=["index"]).column("index").to_numpy()
        else:
            idx = np.load(p, allow_pickle=False)
    except Exception as exc:  # any reader error is the same bad input
        raise ConfigError(
            f"{key}={path}: cannot read it ({type(exc).__name__}); give a .npy integer "
            "array or a .parquet with an 'index' column"
        ) from None
    idx = np.asarray(idx).ravel()
    if len(idx) and not np.issubdtype(idx.dtype, np.integer):
        raise ConfigError(f"{key}={path} holds {idx.dtype} values; give integer indices")
    bad = idx[(idx < 0) | (idx >= num_samples)]
    if len(bad):
        raise ConfigError(
            f"{key}={path} holds {len(bad)} indices outside [0, {num_samples}) (e.g. "
            f"{int(bad[0])}); it must list global indices of this run's training set"
        )
    return idx.astype(np.int64)
