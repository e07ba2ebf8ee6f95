"""One rank's training stream: :class:`TrainStream` and its picklable source."""

from __future__ import annotations

import functools
import itertools
import logging
import random
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from distnoisy.core.choices import SPLITS
from distnoisy.core.errors import ConfigError, DataError
from distnoisy.data.shards import Manifest
from distnoisy.data.stream.batching import _BadRegistry, _check_rank, _Decoder, _identity
from distnoisy.data.stream.readers import _read_raw
from distnoisy.data.stream.sampling import (
    BalancedSubset,
    KeptSubset,
    _buffer_shuffle,
    _interleave,
    assign_shards,
)
from distnoisy.data.stream.seeds import _TAG_BUFFER, _TAG_INTERLEAVE, _TAG_SHARD_ORDER, mix_seed
from distnoisy.data.stream.tar_index import Raw
from distnoisy.data.stream.transforms import Transform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StreamStats:
    """Numbers the trainer logs about a training stream.

    Attributes
    ----------
    mode
        The split in effect (``"shard"`` falls back to ``"sample"`` with fewer shards than ranks).
    steps_per_epoch, local_batch_size, global_batch_size
        Batches per epoch (equal on every rank) and batch sizes.
    samples_per_epoch
        ``steps_per_epoch * global_batch_size``.
    dropped_per_epoch
        Samples of the manifest not used in an epoch: the floor's remainder, and in ``"shard"``
        mode the excess of ranks whose shards hold more than they need.
    repeated_per_epoch
        ``"shard"`` mode: samples read a second time by ranks whose shards hold too few.
    num_bad_samples
        Distinct unusable samples (or unreadable shard regions) met so far.
    """

    mode: str
    steps_per_epoch: int
    local_batch_size: int
    global_batch_size: int
    samples_per_epoch: int
    dropped_per_epoch: int
    repeated_per_epoch: int
    num_bad_samples: int


@dataclass(frozen=True)
class _Layout:
    """One rank's plan of an epoch (see :meth:`_TrainSource._layout`)."""

    mode: str  # the split in effect this epoch
    shards: list[int]  # shard indices this rank reads
    reserve: int  # T: stream positions before the first batch
    stride: int  # positions per global batch
    start: int  # this rank's offset inside a global batch
    reserve_mod: int  # a reserve position p is this rank's when p % mod == rem
    reserve_rem: int
    keep: np.ndarray | None  # samples drawn this epoch (class-balanced), None = all


class _TrainSource(IterableDataset):
    """The picklable part of a :class:`TrainStream`: yields one rank's batches of one epoch."""

    def __init__(
        self,
        *,
        urls: list[str],
        counts: list[int],
        image_ext: str,
        num_samples: int,
        rank: int,
        world_size: int,
        local_batch_size: int,
        steps: int,
        seed: int,
        mode: str,
        transform: Transform,
        channels: int | None,
        shuffle_buffer: int,
        open_shards: int = 1,
        subset: BalancedSubset | KeptSubset | None = None,
    ) -> None:
        self.urls = urls
        self.open_shards = open_shards
        self.subset = subset
        self.counts = counts
        self.image_ext = image_ext
        self.num_samples = num_samples
        self.rank = rank
        self.world_size = world_size
        self.b = local_batch_size
        self.steps = steps
        self.seed = seed
        self.mode = mode
        self.decoder = _Decoder(transform, channels)
        self.shuffle_buffer = shuffle_buffer
        self.epoch = 0
        self.first = 0  # the batch this epoch starts at (> 0 when resumed mid-epoch)
        # (epoch, first) as a multiprocessing RawArray once loader workers exist
        self.shared_epoch: Any = None

    # -- the plan of an epoch: which stream this rank reads and which positions it keeps
    def _layout(self, epoch: int) -> _Layout:
        """This rank's plan of ``epoch``: shards, reserve, positions it keeps, selection mask."""
        keep = None
        counts = self.counts
        total = self.num_samples
        mode = self.mode
        if self.subset is not None:
            keep = self.subset.mask(epoch)
            starts = np.cumsum([0, *self.counts[:-1]])
            counts = np.add.reduceat(keep.astype(np.int64), starts).tolist()
            total = self.subset.size
            if mode == "shard" and sum(c > 0 for c in counts) < self.world_size:
                mode = "sample"  # too few shards hold drawn samples to give every rank one
        if mode == "sample":
            big_b = self.world_size * self.b
            return _Layout(
                mode,
                list(range(len(self.urls))),
                total - self.steps * big_b,
                big_b,
                self.rank * self.b,
                self.world_size,
                self.rank,
                keep,
            )
        live = [i for i, c in enumerate(counts) if c > 0]
        assigned = assign_shards([counts[i] for i in live], self.world_size, self.seed, epoch)
        mine = [live[j] for j in assigned[self.rank]]
        load = sum(counts[i] for i in mine)
        return _Layout(mode, mine, max(0, load - self.steps * self.b), self.b, 0, 1, 0, keep)

    def _stream(self, epoch: int, plan: _Layout, sink: list[tuple[str, str]]) -> Iterator[Raw]:
        """Endless shuffled stream of this rank's shards: pass 0, 1, ... each in a new order."""
        # "sample" mode: identical on all ranks (no rank in the seeds); "shard": per rank.
        who = -1 if plan.mode == "sample" else self.rank
        for pass_no in itertools.count():
            order = list(plan.shards)
            if pass_no > 0 or plan.mode == "sample":
                random.Random(mix_seed(self.seed, epoch, pass_no, who, _TAG_SHARD_ORDER)).shuffle(
                    order
                )
            rng = random.Random(mix_seed(self.seed, epoch, pass_no, who, _TAG_BUFFER))
            raws = self._read_pass(order, plan.keep, sink, epoch, pass_no, who)
            n = 0
            for raw in _buffer_shuffle(raws, self.shuffle_buffer, rng):
                n += 1
                yield raw
            if n == 0:
                raise DataError(
                    f"no readable sample in {len(order)} shard(s) (first: {self.urls[order[0]]}); "
                    f"problems: {sink[-3:]}"
                )
            log.debug("rank %d epoch %d: pass %d read %d samples", self.rank, epoch, pass_no, n)

    def _read_pass(
        self,
        order: list[int],
        keep: np.ndarray | None,
        sink: list[tuple[str, str]],
        epoch: int,
        pass_no: int,
        who: int,
    ) -> Iterator[Raw]:
        """One pass over the shards ``order``: ``open_shards`` of them at a time, interleaved."""
        shards = [(self.urls[i], self.counts[i]) for i in order]
        if self.open_shards <= 1 or len(order) <= 1:
            return _read_raw(shards, self.image_ext, self.num_samples, sink, keep)
        readers = [
            functools.partial(_read_raw, [shard], self.image_ext, self.num_samples, sink, keep)
            for shard in shards
        ]
        counts = self.counts
        if keep is not None:  # class-balanced epoch: only the drawn members are read
            starts = np.cumsum([0, *self.counts[:-1]])
            counts = np.add.reduceat(keep.astype(np.int64), starts).tolist()
        expected = [counts[i] for i in order]
        rng = random.Random(mix_seed(self.seed, epoch, pass_no, who, _TAG_INTERLEAVE))
        return _interleave(readers, expected, self.open_shards, rng)

    def batches(
        self,
        epoch: int,
        worker: int,
        num_workers: int,
        sink: list[tuple[str, str]],
        first: int = 0,
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches ``k >= first`` with ``(k - first) % num_workers == worker``, in order (all
        from ``first`` with 1 worker). The stream before batch ``first`` is walked (it fixes
        the reserve and the positions) but not decoded: a run resumed mid-epoch."""
        owned = range(first + worker, self.steps, num_workers)
        if len(owned) == 0:
            return
        last = owned[-1]
        plan = self._layout(epoch)
        t, stride, start = plan.reserve, plan.stride, plan.start
        res_mod, res_rem = plan.reserve_mod, plan.reserve_rem
        reserve: list[Raw] = []
        chunk: list[Raw] = []
        for pos, raw in enumerate(self._stream(epoch, plan, sink)):
            if pos < t:
                if pos % res_mod == res_rem:
                    reserve.append(raw)
                continue
            g, off = divmod(pos - t, stride)
            if g < first or (g - first) % num_workers != worker:
                continue
            if not start <= off < start + self.b:
                continue
            chunk.append(raw)  # positions arrive in order, so this fills batch g's chunk
            if len(chunk) == self.b:
                yield self.decoder.full_batch(g, chunk, reserve, epoch, sink)
                chunk = []
                if g == last:
                    return

    def __iter__(self) -> Iterator[dict[str, Any]]:
        """Loader-worker entry point: this worker's batches with the bad samples attached."""
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        if self.shared_epoch is not None:
            epoch, first = int(self.shared_epoch[0]), int(self.shared_epoch[1])
        else:
            epoch, first = self.epoch, self.first
        sink: list[tuple[str, str]] = []
        for batch in self.batches(epoch, worker, num_workers, sink, first):
            batch["_bad"] = list(sink)
            sink.clear()
            yield batch
        # A trailing record-only item: it comes after every real batch in the loader's order
        # (its task number is >= steps_per_epoch), so it cannot disturb the batch order.
        yield {"_bad": list(sink)}


class TrainStream:
    """One rank's training batches, the same number on every rank (:mod:`distnoisy.data.stream`).

    Parameters
    ----------
    manifest
        The training shard set.
    rank, world_size
        This DDP rank and the number of ranks.
    local_batch_size
        Samples per batch on this rank (the global batch is ``world_size`` times that).
    seed
        Run seed; with ``epoch``, ``rank`` and ``world_size`` it fixes every batch.
    split
        ``"sample"`` (exact, world-size invariant) or ``"shard"`` (each rank reads its shards).
    transform
        ``f(img_uint8_CHW, index, epoch) -> Tensor``, e.g. from :func:`make_transform`. Must be
        picklable (a module-level class or function) when ``num_workers > 0``. Its
        ``channels`` attribute (1 or 3) sets the channels images are decoded to (``None``: the
        file's own); without one, RGB.
    shuffle_buffer
        Samples held by the shuffle buffer (references to their bytes, per process); 0 or 1 =
        no shuffling beyond the shard order and the interleave.
    open_shards
        Shards read at once, their samples interleaved at random before the shuffle buffer
        (1 = one shard after the other). Together with the shard order (shuffled every pass)
        and the buffer this mixes a set whose shards each hold few classes, as WebDataset
        pipelines do; a class-ordered set needs about as many open shards as it has classes.
    num_workers
        Loader worker processes (0 = decode in this process).
    balanced
        Class-balanced epochs: each epoch reads only this subset's draw (unselected members
        are skipped undecoded); ``steps_per_epoch = balanced.size // (world_size *
        local_batch_size)``, still identical on every rank. A :class:`KeptSubset` (the
        ``data.exclude_file`` mask) works the same way with one fixed mask: its excluded
        samples are never yielded and count as dropped in :class:`StreamStats`.

    Raises
    ------
    DataError
        The data set holds fewer samples than one global batch.
    ConfigError
        An invalid argument.
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        rank: int,
        world_size: int,
        local_batch_size: int,
        seed: int,
        split: str = "sample",
        transform: Transform,
        shuffle_buffer: int = 1000,
        open_shards: int = 4,
        num_workers: int = 0,
        balanced: BalancedSubset | KeptSubset | None = None,
    ) -> None:
        _check_rank(rank, world_size)
        if split not in SPLITS:
            raise ConfigError(f"data.split must be one of {SPLITS}, got {split!r}")
        if local_batch_size < 1:
            raise ConfigError(f"the local batch size must be at least 1, got {local_batch_size}")
        if num_workers < 0 or shuffle_buffer < 0:
            raise ConfigError("num_workers and shuffle_buffer must not be negative")
        if open_shards < 1:
            raise ConfigError(f"data.open_shards must be at least 1, got {open_shards}")
        n = manifest.num_samples
        big_b = world_size * local_batch_size
        per_epoch = balanced.size if balanced is not None else n
        steps = per_epoch // big_b
        if steps == 0:
            raise DataError(
                f"{manifest.root} holds {n} samples ({per_epoch} per epoch), fewer than one global "
                f"batch of {big_b} ({world_size} ranks x {local_batch_size}); lower "
                f"train.batch_size to at most {per_epoch}"
            )
        mode = split
        counts = [s.count for s in manifest.shards]
        if split == "shard" and len(counts) < world_size:
            log.warning(
                "%s has %d shards for %d ranks: using split='sample' (every rank reads every "
                "shard); write more, smaller shards to read disjoint shards per rank",
                manifest.root,
                len(counts),
                world_size,
            )
            mode = "sample"
        self.manifest = manifest
        self.rank, self.world_size = rank, world_size
        self.local_batch_size = local_batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.mode = mode
        self._steps = steps
        channels = getattr(transform, "channels", 3)
        self._source = _TrainSource(
            urls=manifest.urls,
            counts=counts,
            image_ext=manifest.image_ext,
            num_samples=n,
            rank=rank,
            world_size=world_size,
            local_batch_size=local_batch_size,
            steps=steps,
            seed=seed,
            mode=mode,
            transform=transform,
            channels=channels,
            shuffle_buffer=shuffle_buffer,
            open_shards=open_shards,
            subset=balanced,
        )
        self._bad = _BadRegistry(f"{manifest.split or 'train'} rank {rank}")
        self._loader: torch.utils.data.DataLoader | None = None
        if mode == "sample" or balanced is not None:
            self._dropped, self._repeated = n - steps * big_b, 0
        else:
            loads = [
                sum(counts[i] for i in mine) for mine in assign_shards(counts, world_size, seed, 0)
            ]
            need = steps * local_batch_size
            self._dropped = sum(max(0, x - need) for x in loads)
            self._repeated = sum(max(0, need - x) for x in loads)
        log.log(
            logging.INFO if rank == 0 else logging.DEBUG,
            "train stream rank %d/%d: split=%s, %d samples in %d shards, %d steps of %d x %d, "
            "%d dropped per epoch, seed %d, %d loader workers",
            rank,
            world_size,
            mode,
            n,
            len(counts),
            steps,
            world_size,
            local_batch_size,
            self._dropped,
            seed,
            num_workers,
        )

    @property
    def steps_per_epoch(self) -> int:
        """Batches per epoch, identical on every rank: ``N // (world_size * local_batch_size)``."""
        return self._steps

    @property
    def samples_dropped_per_epoch(self) -> int:
        """Samples not used in an epoch (see :class:`StreamStats`)."""
        return self._dropped

    @property
    def bad_samples(self) -> list[tuple[str, str]]:
        """Distinct ``(key, reason)`` of samples skipped so far (key = zero-padded index, or the
        shard file name for tar-level errors)."""
        return self._bad.list()

    @property
    def num_bad_samples(self) -> int:
        return len(self._bad.items)

    @property
    def stats(self) -> StreamStats:
        return StreamStats(
            mode=self.mode,
            steps_per_epoch=self._steps,
            local_batch_size=self.local_batch_size,
            global_batch_size=self.local_batch_size * self.world_size,
            samples_per_epoch=self._steps * self.local_batch_size * self.world_size,
            dropped_per_epoch=self._dropped,
            repeated_per_epoch=self._repeated,
            num_bad_samples=self.num_bad_samples,
        )

    def shards_of_rank(self, epoch: int) -> list[int]:
        """Indices (into ``manifest.shards``) of the shards this rank reads in ``epoch``."""
        return list(self._source._layout(epoch).shards)

    def _get_loader(self) -> torch.utils.data.DataLoader:
        if self._loader is None:
            import multiprocessing

            ctx = multiprocessing.get_context("forkserver")
            # Shared with the persistent workers: they read the epoch when an epoch starts.
            self._source.shared_epoch = ctx.RawArray("q", 2)
            self._loader = torch.utils.data.DataLoader(
                self._source,
                batch_size=None,
                num_workers=self.num_workers,
                multiprocessing_context=ctx,
                persistent_workers=True,
                collate_fn=_identity,
            )
        return self._loader

    def epoch_batches(self, epoch: int, first: int = 0) -> Iterator[dict[str, torch.Tensor]]:
        """Exactly :attr:`steps_per_epoch` batches ``{"image", "index"}`` of this epoch, or
        the last ``steps_per_epoch - first`` of them (a run resumed mid-epoch: the batches
        are those an uninterrupted epoch yields from batch ``first`` on).

        Raises
        ------
        DataError
            Only if nothing at all can be read (every shard unreadable), or, in the extreme, every
            sample of a batch and of the reserve is unusable.
        """
        count = 0
        if self.num_workers == 0:
            sink: list[tuple[str, str]] = []
            self._source.epoch, self._source.first = epoch, first
            for batch in self._source.batches(epoch, 0, 1, sink, first):
                self._bad.add(sink)
                sink.clear()
                count += 1
                yield batch
            self._bad.add(sink)
        else:
            loader = self._get_loader()
            self._source.shared_epoch[0], self._source.shared_epoch[1] = epoch, first
            for item in loader:
                self._bad.add(item.pop("_bad", ()))
                if "index" not in item:
                    continue  # a worker's trailing record-only item
                count += 1
                yield item
        if count != self._steps - first:  # cannot happen by construction; never short silently
            raise DataError(
                f"rank {self.rank} produced {count} batches instead of {self._steps - first} in "
                f"epoch {epoch}; this is a bug in distnoisy.data.stream"
            )

    def close(self) -> None:
        """Stop the loader workers (also done when the stream is garbage-collected)."""
        self._loader = None
