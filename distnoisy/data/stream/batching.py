"""Building batches inside a rank or a loader worker: decoding, replacing bad samples from the
reserve, and recording what was skipped.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

import torch

from distnoisy.core.errors import ConfigError, DataError
from distnoisy.data.stream.decode import _short, decode_image_bytes
from distnoisy.data.stream.tar_index import Raw, _LocalMember
from distnoisy.data.stream.transforms import ImageTransform, Transform
from distnoisy.data.torch_compat import new_shared_tensor

log = logging.getLogger(__name__)


# Bad samples logged at WARNING level per stream (the rest at DEBUG; all are recorded).
_MAX_WARNINGS = 20


def _new_batch_tensor(shape: tuple[int, ...], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An uninitialised batch; inside a loader worker, in shared memory.

    As ``default_collate`` does: filling shared memory directly means sending the batch to the
    main process copies nothing.
    """
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=dtype)
    return new_shared_tensor(shape, dtype)


class _BatchBuilder:
    """Collects one batch: ``ImageTransform`` outputs are normalised straight into their slot.

    With any other transform the outputs are stacked at the end. Measured on 256-px JPEGs with a
    224 crop: writing in place saves a float tensor per image and the stack (fresh memory whose
    page faults cost more than the arithmetic), about a third of the per-image time after
    decoding.
    """

    def __init__(self, capacity: int, transform: Transform) -> None:
        self.capacity = capacity
        self.transform = transform
        self.direct = isinstance(transform, ImageTransform) and transform.kind != "raw"
        # data.augment_on=device: uint8 images plus each one's (top, left, flip).
        self.deferred = self.direct and bool(getattr(transform, "defer", False))
        # data.decode=gpu: undecoded JPEG bytes, concatenated, with their offsets.
        self.encoded = self.deferred and bool(getattr(transform, "encoded", False))
        self.shape: torch.Size | None = None  # of one sample, set by the first
        self.out: torch.Tensor | None = None
        self.images: list[torch.Tensor] = []
        self.indices: list[int] = []
        self.draws: list[tuple[int, int, int]] = []
        self._draw: tuple[int, int, int] = (0, 0, 0)  # of the sample prepared last

    def __len__(self) -> int:
        return len(self.indices)

    def prepare(self, img: torch.Tensor, index: int, epoch: int) -> torch.Tensor:
        """The sample as it will be batched: the uint8 crop (direct) or the transform's output."""
        if self.deferred:
            img, self._draw = self.transform.deferred(img, index, epoch)  # type: ignore[attr-defined]
            return img
        if self.direct:
            return self.transform.geometry(img, index, epoch)  # type: ignore[attr-defined]
        return self.transform(img, index, epoch)

    def add(self, sample: torch.Tensor, index: int) -> None:
        if self.shape is None:
            self.shape = sample.shape
        if self.encoded:
            self.images.append(sample)
            self.draws.append(self._draw)
        elif self.deferred:
            if self.out is None:
                self.out = _new_batch_tensor((self.capacity, *sample.shape), torch.uint8)
            self.out[len(self.indices)].copy_(sample)
            self.draws.append(self._draw)
        elif self.direct:
            if self.out is None:
                self.out = _new_batch_tensor((self.capacity, *sample.shape))
            self.transform.normalize_into(sample, self.out[len(self.indices)])  # type: ignore[attr-defined]
        else:
            self.images.append(sample)
        self.indices.append(index)

    def repeat(self, j: int) -> None:
        """Append a copy of sample ``j`` of this batch."""
        if self.encoded:
            self.images.append(self.images[j])
            self.draws.append(self.draws[j])
        elif self.direct:
            assert self.out is not None
            self.out[len(self.indices)].copy_(self.out[j])
            if self.deferred:
                self.draws.append(self.draws[j])
        else:
            self.images.append(self.images[j])
        self.indices.append(self.indices[j])

    def build(self) -> dict[str, torch.Tensor]:
        n = len(self.indices)
        if self.encoded:
            # One tensor, not a list: a batch crosses from a loader process in one piece.
            sizes = torch.tensor([0] + [len(b) for b in self.images], dtype=torch.long)
            return {
                "jpeg": torch.cat(self.images),
                "jpeg_offsets": torch.cumsum(sizes, 0),
                "index": torch.tensor(self.indices, dtype=torch.long),
                "augment": torch.tensor(self.draws, dtype=torch.long).reshape(n, 3),
            }
        if self.direct:
            assert self.out is not None
            image = self.out if n == self.capacity else self.out[:n]
        else:
            image = torch.utils.data.default_collate(self.images)
        batch = {"image": image, "index": torch.tensor(self.indices, dtype=torch.long)}
        if self.deferred:
            batch["augment"] = torch.tensor(self.draws, dtype=torch.long).reshape(n, 3)
        return batch


class _Decoder:
    """Decode + transform raw samples into a batch, skipping and recording bad ones."""

    def __init__(self, transform: Transform, channels: int | None) -> None:
        self.transform = transform
        self.channels = channels
        self.raw_mode = getattr(transform, "kind", None) == "raw"
        self.encoded = bool(getattr(transform, "encoded", False))

    def add(self, raw: Raw, epoch: int, batch: _BatchBuilder, sink: list[tuple[str, str]]) -> bool:
        """Decode ``raw`` into ``batch``; False (recorded in ``sink``) if it is unusable."""
        index, data, key, shard = raw
        if isinstance(data, _LocalMember):
            try:
                data = data.read()
            except OSError as exc:
                sink.append((key, f"unreadable image member in {shard}: {_short(exc)}"))
                return False
        if self.encoded:  # decoded on the device: only a JPEG's signature is checked here
            if bytes(data[:3]) != b"\xff\xd8\xff":
                sink.append((key, f"not a JPEG in {shard} (data.decode=gpu reads JPEG only)"))
                return False
            img = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            batch.add(batch.prepare(img, index, epoch), index)
            return True
        try:
            img = decode_image_bytes(data, self.channels)
        except ValueError as exc:
            sink.append((key, f"corrupt image in {shard}: {exc}"))
            return False
        try:
            out = batch.prepare(img, index, epoch)
        except Exception as exc:  # e.g. an image too small for a crop: skip it, keep training
            sink.append((key, f"transform failed in {shard}: {_short(exc)}"))
            return False
        if batch.shape is not None and out.shape != batch.shape:
            if self.raw_mode:
                raise DataError(
                    f"raw images of different sizes cannot be batched ({tuple(out.shape)} vs "
                    f"{tuple(batch.shape)}, sample {key} in {shard}); use batch_size=1"
                )
            sink.append((key, f"image shape {tuple(out.shape)} != {tuple(batch.shape)} in {shard}"))
            return False
        batch.add(out, index)
        return True

    def full_batch(
        self,
        batch_no: int,
        chunk: list[Raw],
        reserve: list[Raw],
        epoch: int,
        sink: list[tuple[str, str]],
    ) -> dict[str, torch.Tensor]:
        """Exactly ``len(chunk)`` samples: bad ones replaced from the reserve, else repeated."""
        size = len(chunk)
        batch = _BatchBuilder(size, self.transform)
        for raw in chunk:
            self.add(raw, epoch, batch, sink)
        if len(batch) < size and reserve:
            # Rotate by the batch number: the choice depends only on this batch, so any loader
            # worker makes the same one.
            for i in range(len(reserve)):
                if len(batch) == size:
                    break
                self.add(reserve[(batch_no + i) % len(reserve)], epoch, batch, sink)
        if not len(batch):
            raise DataError(
                f"every sample of batch {batch_no} and of the reserve is unusable; last problems: "
                f"{sink[-3:]}"
            )
        j = 0
        while len(batch) < size:  # reserve exhausted: repeat good samples of this batch
            batch.repeat(j)
            j += 1
        return batch.build()


def _identity(x: Any) -> Any:
    """DataLoader ``collate_fn``: batches are made in the workers already."""
    return x


class _BadRegistry:
    """Distinct (key, reason) pairs, in the order first met; logs the first few."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.items: dict[tuple[str, str], None] = {}

    def add(self, records: Iterable[tuple[str, str]]) -> None:
        for key, reason in records:
            item = (str(key), str(reason))
            if item in self.items:
                continue
            self.items[item] = None
            level = logging.WARNING if len(self.items) <= _MAX_WARNINGS else logging.DEBUG
            log.log(level, "%s: skipped bad sample %s: %s", self.what, key, reason)

    def list(self) -> list[tuple[str, str]]:
        return list(self.items)


def _check_rank(rank: int, world_size: int) -> None:
    if world_size < 1 or not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} / world_size {world_size} is not a valid DDP rank")
