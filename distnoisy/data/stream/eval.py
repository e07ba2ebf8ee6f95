"""One rank's share of an evaluation set: :class:`EvalStream`."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from distnoisy.core.errors import ConfigError
from distnoisy.data.shards import Manifest
from distnoisy.data.stream.batching import _BadRegistry, _BatchBuilder, _check_rank, _Decoder
from distnoisy.data.stream.readers import _read_raw
from distnoisy.data.stream.transforms import Transform


class EvalStream:
    """One rank's share of an evaluation set: every sample exactly once over all ranks.

    Rank ``r`` evaluates the contiguous index block ``[N*r // W, N*(r+1) // W)`` in index order,
    no shuffling, and reads only the shards that overlap it (so evaluation I/O does not grow with
    the number of ranks). Ranks may hold different numbers of samples (by one; more if samples are
    bad): gather results with padding, do not run per-batch collectives.

    Parameters
    ----------
    manifest
        The evaluation shard set.
    rank, world_size
        This rank and the number of ranks.
    batch_size
        Samples per batch; the last batch of a rank may be smaller.
    transform
        As for :class:`TrainStream` (``epoch`` is passed as 0).
    """

    def __init__(
        self,
        manifest: Manifest,
        *,
        rank: int,
        world_size: int,
        batch_size: int,
        transform: Transform,
    ) -> None:
        _check_rank(rank, world_size)
        if batch_size < 1:
            raise ConfigError(f"the evaluation batch size must be at least 1, got {batch_size}")
        self.manifest = manifest
        self.rank, self.world_size = rank, world_size
        self.batch_size = batch_size
        n = manifest.num_samples
        self.lo, self.hi = n * rank // world_size, n * (rank + 1) // world_size
        self._decoder = _Decoder(transform, getattr(transform, "channels", 3))
        self._shards = [
            i
            for i, s in enumerate(manifest.shards)
            if s.first_index < self.hi and s.first_index + s.count > self.lo
        ]
        self._bad = _BadRegistry(f"{manifest.split or 'eval'} rank {rank}")

    @property
    def num_local_samples(self) -> int:
        """Samples this rank evaluates when none is bad."""
        return self.hi - self.lo

    @property
    def bad_samples(self) -> list[tuple[str, str]]:
        return self._bad.list()

    @property
    def num_bad_samples(self) -> int:
        return len(self._bad.items)

    def batches(self) -> Iterator[dict[str, torch.Tensor]]:
        """This rank's batches ``{"image", "index"}`` in index order; bad samples skipped."""
        if self.hi <= self.lo:
            return
        urls, shards = self.manifest.urls, self.manifest.shards
        sink: list[tuple[str, str]] = []
        raws = _read_raw(
            [(urls[i], shards[i].count) for i in self._shards],
            self.manifest.image_ext,
            self.manifest.num_samples,
            sink,
        )
        batch = _BatchBuilder(self.batch_size, self._decoder.transform)
        for raw in raws:
            if not self.lo <= raw[0] < self.hi:
                continue
            self._decoder.add(raw, 0, batch, sink)
            self._bad.add(sink)
            sink.clear()
            if len(batch) == self.batch_size:
                yield batch.build()
                batch = _BatchBuilder(self.batch_size, self._decoder.transform)
        self._bad.add(sink)
        if len(batch):
            yield batch.build()
