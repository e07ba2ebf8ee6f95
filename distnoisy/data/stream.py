"""Decoded, augmented batches from WebDataset shards inside one DDP rank.

A batch is ``{"image": Tensor[b, C, H, W], "index": LongTensor[b]}``. The global sample index is
the spine: labels come from the trainer's label table (``labels.parquet`` or a noise file), never
from the shard.

Equal batch counts (the WebDataset DDP hang cannot happen)
-----------------------------------------------------------
:class:`TrainStream` yields exactly ``steps_per_epoch = N // (world_size * local_batch_size)``
batches of exactly ``local_batch_size`` on every rank, computed from the manifest alone. The loop
is driven by that count, not by how many samples a rank happens to read: the sample stream of an
epoch is endless (after the last shard it starts another pass over the shards, in a new order),
so uneven shards, more ranks than shards, unreadable tar members or corrupt images can change
*which* samples a rank sees, never how many batches it yields.

Two ways of splitting the data over ranks (``split=``):

``"sample"`` (exact; results do not depend on the number of ranks)
    Every rank reads the same global stream: shard order permuted by ``(seed, epoch)``,
    ``open_shards`` shards read at once and interleaved at random, then a shuffle buffer; every
    RNG is seeded by ``(seed, epoch)``, the same on every rank. After the first
    ``T = N - steps * B`` positions (the *reserve*, see below; ``B = world_size *
    local_batch_size``), global batch ``g`` is the next ``B`` positions and rank ``r`` takes the
    ``r``-th contiguous chunk of ``local_batch_size`` of it. Only the selected samples are
    decoded. Hence the concatenation over ranks of batch ``g`` equals batch ``g`` of a single
    process with batch size ``B``. Every rank walks every shard's samples (reading only the
    bytes of the samples it decodes when the shards are local files, see below), so this mode
    suits data sets a rank can walk each epoch (digits, CIFAR); from object storage every rank
    downloads every shard: use ``"shard"`` for Clothing1M/ImageNet-size data.
``"shard"`` (scales: a rank reads only its shards)
    Shards permuted by ``(seed, epoch)`` and assigned greedily by sample count (largest first,
    to the least-loaded rank); a rank shuffles its own samples (seed ``(seed, epoch, rank)``).
    Its ``open_shards`` are interleaved as in ``"sample"`` mode. A rank with more than
    ``steps * local_batch_size`` samples does not use the excess (its reserve); a rank with
    fewer reads its shards again. With fewer shards than ranks the stream
    falls back to ``"sample"`` (logged).

Mixing
------
A shard set converted from a class-ordered source (an image folder in listing order) holds one or
two classes per shard. Three things mix it: the shard order is shuffled every pass, ``open_shards``
shards are read at once with their samples interleaved at random (:func:`_interleave`), and the
shuffle buffer reorders what the interleave yields. The converters also write samples into shards
in a shuffled order, so their sets are mixed already; the training loop measures the class mix of
its batches (:mod:`distnoisy.data.mixing`) and warns when it is poor.

The reserve and bad samples
---------------------------
The ``T`` samples that the floor ``N // B`` leaves out of an epoch are taken from the *front* of
the (shuffled) stream rather than the back, so they are at hand, without look-ahead, to replace
samples that cannot be used: a corrupt image (decode fails), an image of the wrong size, or one
the transform rejects. Such a sample is skipped, counted and recorded in
:attr:`TrainStream.bad_samples` as ``(key, reason)``; its slot is filled from this rank's
reserve (rotated by the batch number, so the choice does not depend on other batches), and if the
reserve is used up, by repeating a good sample of the same batch. Samples lost at the tar level
(an unreadable or truncated shard, recorded under the shard's file name; a shard yielding fewer
samples than its manifest count is reported even when tarfile raises nothing) are the same on
every rank in ``"sample"`` mode and simply shorten the pass: the next pass fills the epoch.
Replacements make the W-invariance above approximate, for the batches concerned only.

Worker processes
----------------
``num_workers > 0`` runs the reading and decoding in a ``torch.utils.data.DataLoader`` with the
``forkserver`` context (Ray's advice for processes inside actors) and persistent workers. Every
loader worker reads the same stream as the rank and decodes only the batches with
``batch_no % num_workers == worker``; the DataLoader collects workers round-robin in order, so
the batches, and their order, are those of ``num_workers=0``. Each loader worker walks the
rank's whole stream. For local shard files that costs almost nothing: the first pass over a
shard builds an index of its image members (one tar-header pass, kept per process), later
passes walk the index, and a worker reads only the bytes of the samples it decodes (a
positioned read each). Shards given as URLs are streamed through webdataset, every byte by
every loader worker. Everything a worker runs is a
module-level object, so it pickles; a script that starts streams with workers needs the usual
``if __name__ == "__main__":`` guard (forkserver re-imports the main module).
"""

from __future__ import annotations

import functools
import io
import itertools
import logging
import os
import random
import re
import tarfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import IterableDataset

from distnoisy.choices import SPLITS
from distnoisy.data import fs
from distnoisy.data.shards import Manifest
from distnoisy.errors import ConfigError, DataError

log = logging.getLogger(__name__)

TRANSFORM_KINDS = ("digits", "cifar_train", "cifar_eval", "imagenet_train", "imagenet_eval", "raw")
# Tags that keep the RNG streams derived from one seed independent of each other.
_TAG_SHARD_ORDER = 1
_TAG_BUFFER = 2
_TAG_AUGMENT = 3
_TAG_BALANCED = 4
_TAG_INTERLEAVE = 5
_MASK64 = (1 << 64) - 1
# "decode_png, /__w/vision/.../decode_png.cpp:62, " in torchvision messages: noise for users.
_SOURCE_LOCATION = re.compile(r"([\w()]+, )?\S+\.(cpp|cu|h|hpp):\d+,? ?")
# "<_io.BytesIO object at 0x7f...>": addresses differ per call, and reasons must compare equal.
_ADDRESS = re.compile(r" at 0x[0-9a-fA-F]+")
# Bad samples logged at WARNING level per stream (the rest at DEBUG; all are recorded).
_MAX_WARNINGS = 20

# (global index, image bytes or a reference to them, __key__, shard file name)
Raw = tuple[int, "bytes | _LocalMember", str, str]
Transform = Callable[[torch.Tensor, int, int], torch.Tensor]


def mix_seed(*values: int) -> int:
    """Hash integers into a 64-bit seed (splitmix64 rounds).

    Stable across processes, platforms and Python versions, unlike ``hash()``; used for every RNG
    of the streams and the augmentations so that they depend only on the values passed.
    """
    h = 0x9E3779B97F4A7C15
    for v in values:
        h = (h ^ (int(v) & _MASK64)) + 0x9E3779B97F4A7C15 & _MASK64
        h = (h ^ (h >> 30)) * 0xBF58476D1CE4E5B9 & _MASK64
        h = (h ^ (h >> 27)) * 0x94D049BB133111EB & _MASK64
        h ^= h >> 31
    return h


# --------------------------------------------------------------------------------------------
# Transforms


class ImageTransform:
    """Per-sample image transform: uint8 ``C x H x W`` -> normalised float ``C x H x W``.

    Randomness (crops, flips) comes from a ``torch.Generator`` seeded by ``(seed, epoch, index)``,
    so a sample's augmentation does not depend on which rank or loader worker sees it, and a run
    is reproducible. Plain attributes only: instances pickle into loader workers.

    Parameters
    ----------
    kind
        One of :data:`TRANSFORM_KINDS`. ``digits``: scale to 0..1 and normalise, nothing else
        (any image size: digits and Fashion-MNIST, each with its own mean/std).
        ``cifar_train``: pad 4 (zeros), random crop back to the input size, horizontal flip with
        p=0.5. ``cifar_eval``: none. ``imagenet_train``: resize the shorter side to 256, random
        crop 224, flip. ``imagenet_eval``: resize 256, centre crop 224. ``raw``: the decoded
        uint8 image unchanged (its own channel count; for inspecting data).
    mean, std
        Per-channel statistics on the 0..1 scale; their length (1 or 3) sets the channel count
        images are decoded to (grey-scale or RGB). ``None`` only for ``raw``.
    seed
        Seed of the augmentation randomness (pass the run's seed).
    size
        ``imagenet_*`` crop size (224, the protocol); the resize is ``round(size * 256 / 224)``
        (256). Smaller sizes give cheap runs (tests, quick experiments).
    """

    def __init__(
        self,
        kind: str,
        mean: Sequence[float] | None,
        std: Sequence[float] | None,
        seed: int = 0,
        size: int = 224,
    ) -> None:
        if kind not in TRANSFORM_KINDS:
            raise ConfigError(f"unknown transform {kind!r}; choose one of {TRANSFORM_KINDS}")
        if size < 1:
            raise ConfigError(f"the crop size must be at least 1, got {size}")
        self.kind = kind
        self.seed = int(seed)
        self.size = int(size)
        self.resize = round(self.size * 256 / 224)
        # Normalisation as one scale and shift per channel: x/255 -> x/(255 std) - mean/std.
        self.affine: list[tuple[float, float]] = []
        if kind == "raw":
            self.mean = self.std = None
            self.channels: int | None = None
            return
        if mean is None or std is None:
            raise ConfigError(f"transform {kind!r} needs mean and std")
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3):
            raise ConfigError(
                f"transform {kind!r}: mean {list(self.mean)} and std {list(self.std)} must both "
                "have 1 (grey-scale) or 3 (RGB) values"
            )
        if min(self.std) <= 0:
            raise ConfigError(f"transform {kind!r}: std must be positive, got {list(self.std)}")
        self.channels = len(self.mean)
        self.affine = [(1 / (255 * s), -m / s) for m, s in zip(self.mean, self.std, strict=True)]

    def __repr__(self) -> str:
        return (
            f"ImageTransform({self.kind!r}, mean={self.mean}, std={self.std}, seed={self.seed}, "
            f"size={self.size})"
        )

    def _generator(self, index: int, epoch: int) -> torch.Generator:
        seed = mix_seed(self.seed, epoch, index, _TAG_AUGMENT) & ((1 << 63) - 1)
        return torch.Generator().manual_seed(seed)

    def geometry(self, img: torch.Tensor, index: int, epoch: int) -> torch.Tensor:
        """The resize/pad, crop and flip of ``img``, still uint8 (often a view of it)."""
        import torchvision.transforms.v2.functional as F

        kind = self.kind
        if kind in ("cifar_train", "imagenet_train"):
            gen = self._generator(index, epoch)
            if kind == "cifar_train":
                h, w = int(img.shape[-2]), int(img.shape[-1])
                img = F.pad(img, [4, 4, 4, 4], fill=0)
            else:
                if min(img.shape[-2:]) != self.resize:  # pre-resized shards: nothing to do
                    img = F.resize(img, [self.resize], antialias=True)
                h = w = self.size
            top = int(torch.randint(0, int(img.shape[-2]) - h + 1, (1,), generator=gen))
            left = int(torch.randint(0, int(img.shape[-1]) - w + 1, (1,), generator=gen))
            img = F.crop(img, top, left, h, w)
            if float(torch.rand(1, generator=gen)) < 0.5:
                img = F.horizontal_flip(img)
        elif kind == "imagenet_eval":
            if min(img.shape[-2:]) != self.resize:
                img = F.resize(img, [self.resize], antialias=True)
            img = F.center_crop(img, [self.size, self.size])
        return img

    def normalize_into(self, img: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """Write ``(img / 255 - mean) / std`` into the float tensor ``out`` (same shape).

        One conversion pass and one fused scale-and-shift per channel, in place: writing each
        sample straight into its slot of the batch saves a float copy per image and the stack,
        whose fresh memory (page faults) cost more than the arithmetic.
        """
        out.copy_(img)
        for c, (scale, shift) in enumerate(self.affine):
            out[c].mul_(scale).add_(shift)
        return out

    def __call__(self, img: torch.Tensor, index: int, epoch: int) -> torch.Tensor:
        if self.kind == "raw":
            return img
        crop = self.geometry(img, index, epoch)
        return self.normalize_into(crop, torch.empty(crop.shape, dtype=torch.float32))


def make_transform(
    kind: str,
    mean: Sequence[float] | None,
    std: Sequence[float] | None,
    *,
    seed: int = 0,
    size: int = 224,
) -> ImageTransform:
    """Build the picklable per-sample transform ``f(img_uint8, index, epoch) -> Tensor``.

    See :class:`ImageTransform` for the kinds. Pass the run's ``seed`` so that augmentations
    change with it.
    """
    return ImageTransform(kind, mean, std, seed=seed, size=size)


# --------------------------------------------------------------------------------------------
# Decoding


def decode_image_bytes(data: bytes, channels: int | None) -> torch.Tensor:
    """Decode PNG/JPEG bytes to a uint8 ``C x H x W`` tensor.

    ``channels`` 1 or 3 converts to grey-scale / RGB (e.g. grey or CMYK JPEGs in RGB data);
    ``None`` keeps the file's channels (alpha dropped). torchvision's decoder first, PIL as a
    fallback for what it does not handle.

    Raises
    ------
    ValueError
        Neither decoder can read the bytes (the message has both reasons).
    """
    from torchvision.io import ImageReadMode, decode_image

    mode = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}.get(channels, ImageReadMode.UNCHANGED)
    try:
        img = decode_image(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=mode)
    except Exception as exc:  # torchvision raises RuntimeError/ValueError for bad input
        try:
            img = _decode_pil(data, channels)
        except Exception as exc2:
            raise ValueError(f"{_short(exc)}; PIL: {_short(exc2)}") from None
    if channels is None and img.shape[0] in (2, 4):
        img = img[: img.shape[0] - 1]  # drop alpha
    return img


def _decode_pil(data: bytes, channels: int | None) -> torch.Tensor:
    import numpy as np
    from PIL import Image

    with Image.open(io.BytesIO(data)) as im:
        if channels == 1:
            im = im.convert("L")
        elif channels == 3 or im.mode not in ("L", "RGB"):
            im = im.convert("RGB")
        arr = np.array(im, dtype=np.uint8)
    t = torch.from_numpy(arr)
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def _short(exc: BaseException, limit: int = 160) -> str:
    """One line: exception type and message, without C++ source locations."""
    lines = str(exc).strip().splitlines()
    text = _ADDRESS.sub("", _SOURCE_LOCATION.sub("", lines[-1] if lines else ""))
    msg = f"{type(exc).__name__}: {text}"
    return msg if len(msg) <= limit else msg[: limit - 3] + "..."


# --------------------------------------------------------------------------------------------
# Reading tar shards through webdataset


class _EndsWith:
    """``select_files`` predicate: read only the image member (labels come from the table)."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix

    def __call__(self, fname: str) -> bool:
        return fname.endswith(self.suffix)


def _unreadable_tar(exn: BaseException) -> str:
    """The record's reason for a tar-level error, the same from either reader."""
    if isinstance(exn, OSError) and exn.errno is not None:
        first = f"[Errno {exn.errno}] {exn.strerror}"
    else:
        first = str(exn.args[0]) if exn.args else ""
        first = first.split(" @ <", 1)[0]  # tarfile appends " @ <file object>"
    return f"unreadable tar data: {type(exn).__name__}: {first}"[:200]


class _ErrorRecorder:
    """webdataset ``handler=``: record a tar-level error as a bad sample and keep going.

    The record's key is the file name of the shard being read, which :func:`_open_shards` sets
    before opening it (webdataset's messages name the shard inconsistently, or not at all).
    """

    def __init__(self, sink: list[tuple[str, str]]) -> None:
        self.sink = sink
        self.shard = "?"

    def __call__(self, exn: BaseException) -> bool:
        self.sink.append((self.shard, _unreadable_tar(exn)))
        return True


def _open_shards(urls: Iterable[str], recorder: _ErrorRecorder) -> Iterator[dict[str, Any]]:
    """``{"url", "stream"}`` per shard, for webdataset's ``tar_file_expander``.

    Local paths are opened with ``open``, URLs through fsspec (:func:`fs.open_binary`), one at a
    time; a shard that cannot be opened (missing, a 404, an unreachable host) is recorded and
    skipped. Each stream is closed as soon as the next one is asked for (or the reader stops),
    so remote connections do not pile up.
    """
    for url in urls:
        recorder.shard = fs.basename(url)
        try:
            stream = fs.open_binary(url)
        except Exception as exn:  # recorded as bad data, like an unreadable tar
            recorder(exn)
            continue
        try:
            yield {"url": url, "stream": stream}
        finally:
            stream.close()


# --------------------------------------------------------------------------------------------
# Reading local shards through a member index


class _LocalMember:
    """The image bytes of one sample in a local shard, read only when the sample is decoded.

    Every loader worker of a rank walks the rank's whole stream to keep batches independent of
    the number of workers (module docstring); with these references, a worker reads only the
    bytes of its own batches and never parses a tar header after the first pass.
    """

    __slots__ = ("offset", "path", "size")

    def __init__(self, path: str, offset: int, size: int) -> None:
        self.path, self.offset, self.size = path, offset, size

    def read(self) -> bytes:
        fd = os.open(self.path, os.O_RDONLY)
        try:
            data = os.pread(fd, self.size, self.offset)
        finally:
            os.close(fd)
        if len(data) != self.size:
            raise OSError(f"read {len(data)} of {self.size} bytes (the file changed)")
        return data


@dataclass(frozen=True)
class _ShardIndex:
    """Where the image members of one local shard are (one header pass, cached per process).

    About 20 bytes per sample (Clothing1M's 1M images: 20 MB per process); the keys are kept
    only where they are not the zero-padded global index.
    """

    indices: np.ndarray  # int64 global index of each image member, -1 = key not an index
    offsets: np.ndarray  # int64 byte offset of each image member's data
    sizes: np.ndarray  # int32 size of each image member
    odd_keys: dict[int, str]  # member position -> __key__, where it is not f"{index:09d}"
    records: list[tuple[str, str]]  # (key or shard name, reason) met while indexing
    num_misnamed: int  # samples whose image member has another extension ("x.y.jpg")

    def key(self, position: int) -> str:
        return self.odd_keys.get(position) or f"{int(self.indices[position]):09d}"


# (path, size, mtime) -> index; a shard rewritten under the same name is indexed again.
_INDEX_CACHE: dict[tuple[str, int, int], _ShardIndex] = {}


def _index_shard(path: str, image_ext: str) -> _ShardIndex:
    """Index the ``image_ext`` members of a local shard; errors are recorded, not raised.

    The same grouping as webdataset's reader: a member's key is its name up to the first dot of
    the base name. Non-regular members and ``__meta__`` files are skipped. A cut header ends the
    shard silently (as in tarfile's stream mode: the manifest count reports it); a member whose
    data runs past the end of the file is an error.
    """
    from webdataset.tariterators import base_plus_ext

    name = Path(path).name
    indices: list[int] = []
    offsets: list[int] = []
    sizes: list[int] = []
    odd_keys: dict[int, str] = {}
    records: list[tuple[str, str]] = []
    misnamed = 0
    suffix = "." + image_ext
    try:
        file_size = os.stat(path).st_size
        with tarfile.open(path, mode="r:") as tf:
            while (member := tf.next()) is not None:
                if not member.isreg() or not member.name.endswith(suffix):
                    continue
                key, ext = base_plus_ext(member.name)
                if key is None or re.match(r"__[^/]*__($|/)", member.name):
                    continue
                if member.offset_data + member.size > file_size:
                    raise tarfile.ReadError("unexpected end of data")
                if ext != image_ext:
                    records.append((key, f"no {image_ext} member (in {name})"))
                    misnamed += 1
                    continue
                try:
                    index = int(key)
                except ValueError:
                    index = -1
                if index < 0 or key != f"{index:09d}":
                    odd_keys[len(indices)] = key
                indices.append(index)
                offsets.append(member.offset_data)
                sizes.append(member.size)
    except (OSError, tarfile.TarError) as exc:
        records.append((name, _unreadable_tar(exc)))
    return _ShardIndex(
        np.asarray(indices, np.int64),
        np.asarray(offsets, np.int64),
        np.asarray(sizes, np.int32),
        odd_keys,
        records,
        misnamed,
    )


def _shard_index(path: str, image_ext: str) -> _ShardIndex:
    try:
        st = os.stat(path)
    except OSError:
        return _index_shard(path, image_ext)  # records the error; nothing to cache
    tag = (path, st.st_size, st.st_mtime_ns)
    index = _INDEX_CACHE.get(tag)
    if index is None:
        index = _INDEX_CACHE[tag] = _index_shard(path, image_ext)
    return index


def _read_indexed(
    shards: Sequence[tuple[str, int]],
    image_ext: str,
    num_samples: int,
    sink: list[tuple[str, str]],
    keep: np.ndarray | None,
) -> Iterator[Raw]:
    """:func:`_read_raw` for local shard files: the same samples and records, bytes deferred."""
    for path, expected in shards:
        shard = Path(path).name
        index = _shard_index(path, image_ext)
        sink.extend(index.records)
        ids, sizes = index.indices, index.sizes
        valid = (ids >= 0) & (ids < num_samples)
        for pos in np.flatnonzero(~valid).tolist():
            key = index.key(pos)
            if ids[pos] < 0:
                sink.append((key, f"key is not a global index (in {shard})"))
            else:
                sink.append((key, f"index outside 0..{num_samples - 1} (in {shard})"))
        use = valid if keep is None else valid & keep[np.where(valid, ids, 0)]
        for pos in np.flatnonzero(use & (sizes == 0)).tolist():
            sink.append((index.key(pos), f"no {image_ext} member (in {shard})"))
        # Vectorised selection: a balanced epoch (Clothing1M: 19% of the set) walks only its draw.
        for pos in np.flatnonzero(use & (sizes > 0)).tolist():
            offset, size = int(index.offsets[pos]), int(sizes[pos])
            yield int(ids[pos]), _LocalMember(path, offset, size), index.key(pos), shard
        seen = len(ids) + index.num_misnamed  # samples, as webdataset's reader counts them
        if seen < expected:
            sink.append(
                (shard, f"shard yielded {seen} of {expected} samples (truncated or unreadable)")
            )


def _read_raw(
    shards: Sequence[tuple[str, int]],
    image_ext: str,
    num_samples: int,
    sink: list[tuple[str, str]],
    keep: np.ndarray | None = None,
) -> Iterator[Raw]:
    """Undecoded samples ``(index, image bytes, key, shard)`` of ``shards`` (url, count), in order.

    Samples without an image member or with a key that is not an index in 0..N-1 are recorded
    in ``sink`` and skipped, and so is a shard that yields fewer samples than the manifest says
    (truncated: Python's tarfile ends a stream at a cut header without an error). Nothing here
    is decoded, so it is cheap enough to run on every rank. ``keep`` (a boolean mask over the
    global indices) passes on only the selected samples (class-balanced epochs).

    Local shard files go through a member index built once per process
    (:func:`_read_indexed`: the bytes are read only when a sample is decoded), URLs through
    webdataset's streaming reader; both yield the same samples and records.
    """
    if not any(fs.is_url(u) for u, _ in shards):
        return _read_indexed(shards, image_ext, num_samples, sink, keep)
    return _read_webdataset(shards, image_ext, num_samples, sink, keep)


def _read_webdataset(
    shards: Sequence[tuple[str, int]],
    image_ext: str,
    num_samples: int,
    sink: list[tuple[str, str]],
    keep: np.ndarray | None = None,
) -> Iterator[Raw]:
    """:func:`_read_raw` through webdataset's streaming tar reader (URLs, any fsspec protocol)."""
    # webdataset's own tar iteration (the stages wds.WebDataset chains: tar_file_expander, then
    # group_by_keys) behind our opener. WebDataset's opener hands URLs to gopen, which shells
    # out to curl/gsutil and knows no s3://; ours reads any fsspec URL in-process, and the
    # chain needs no node/worker splitters (the stream's plan decides who reads which shard).
    from webdataset.tariterators import group_by_keys, tar_file_expander

    urls = [u for u, _ in shards]
    recorder = _ErrorRecorder(sink)
    files = tar_file_expander(
        _open_shards(urls, recorder), handler=recorder, select_files=_EndsWith("." + image_ext)
    )
    position = {u: i for i, u in enumerate(urls)}
    seen = [0] * len(shards)
    checked = 0  # shards before this one are finished and checked

    def check_until(stop: int) -> None:
        nonlocal checked
        for i in range(checked, stop):
            url, expected = shards[i]
            if seen[i] < expected:
                sink.append(
                    (
                        fs.basename(url),
                        f"shard yielded {seen[i]} of {expected} samples (truncated or unreadable)",
                    )
                )
        checked = max(checked, stop)

    for sample in group_by_keys(files, handler=recorder):
        key = str(sample.get("__key__", "?"))
        url = str(sample.get("__url__", "?"))
        shard = fs.basename(url)
        i = position.get(url)
        if i is not None:
            check_until(i)
            seen[i] += 1
        data = sample.get(image_ext)
        try:
            index = int(key)
        except ValueError:
            sink.append((key, f"key is not a global index (in {shard})"))
            continue
        if not 0 <= index < num_samples:
            sink.append((key, f"index outside 0..{num_samples - 1} (in {shard})"))
        elif keep is not None and not keep[index]:
            continue  # not drawn this epoch: skipped before any decoding
        elif not data:
            sink.append((key, f"no {image_ext} member (in {shard})"))
        else:
            yield index, data, key, shard
    check_until(len(shards))


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


def _new_batch_tensor(shape: tuple[int, ...]) -> torch.Tensor:
    """An uninitialised float batch; inside a loader worker, in shared memory.

    As ``default_collate`` does: filling shared memory directly means sending the batch to the
    main process copies nothing.
    """
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(shape, dtype=torch.float32)
    numel = 1
    for n in shape:
        numel *= n
    storage = torch.empty(0)._typed_storage()._new_shared(numel)
    return torch.empty(0).new(storage).view(shape)


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
        self.shape: torch.Size | None = None  # of one sample, set by the first
        self.out: torch.Tensor | None = None
        self.images: list[torch.Tensor] = []
        self.indices: list[int] = []

    def __len__(self) -> int:
        return len(self.indices)

    def prepare(self, img: torch.Tensor, index: int, epoch: int) -> torch.Tensor:
        """The sample as it will be batched: the uint8 crop (direct) or the transform's output."""
        if self.direct:
            return self.transform.geometry(img, index, epoch)  # type: ignore[attr-defined]
        return self.transform(img, index, epoch)

    def add(self, sample: torch.Tensor, index: int) -> None:
        if self.shape is None:
            self.shape = sample.shape
        if self.direct:
            if self.out is None:
                self.out = _new_batch_tensor((self.capacity, *sample.shape))
            self.transform.normalize_into(sample, self.out[len(self.indices)])  # type: ignore[attr-defined]
        else:
            self.images.append(sample)
        self.indices.append(index)

    def repeat(self, j: int) -> None:
        """Append a copy of sample ``j`` of this batch."""
        if self.direct:
            assert self.out is not None
            self.out[len(self.indices)].copy_(self.out[j])
        else:
            self.images.append(self.images[j])
        self.indices.append(self.indices[j])

    def build(self) -> dict[str, torch.Tensor]:
        n = len(self.indices)
        if self.direct:
            assert self.out is not None
            image = self.out if n == self.capacity else self.out[:n]
        else:
            image = torch.utils.data.default_collate(self.images)
        return {"image": image, "index": torch.tensor(self.indices, dtype=torch.long)}


class _Decoder:
    """Decode + transform raw samples into a batch, skipping and recording bad ones."""

    def __init__(self, transform: Transform, channels: int | None) -> None:
        self.transform = transform
        self.channels = channels
        self.raw_mode = getattr(transform, "kind", None) == "raw"

    def add(self, raw: Raw, epoch: int, batch: _BatchBuilder, sink: list[tuple[str, str]]) -> bool:
        """Decode ``raw`` into ``batch``; False (recorded in ``sink``) if it is unusable."""
        index, data, key, shard = raw
        if isinstance(data, _LocalMember):
            try:
                data = data.read()
            except OSError as exc:
                sink.append((key, f"unreadable image member in {shard}: {_short(exc)}"))
                return False
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
        subset: BalancedSubset | None = None,
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
        self.shared_epoch: Any = None  # a multiprocessing RawValue once loader workers exist

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
        self, epoch: int, worker: int, num_workers: int, sink: list[tuple[str, str]]
    ) -> Iterator[dict[str, torch.Tensor]]:
        """Batches ``k`` with ``k % num_workers == worker``, in order (all with 1 worker)."""
        owned = range(worker, self.steps, num_workers)
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
            if g % num_workers != worker or not start <= off < start + self.b:
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
        epoch = int(self.shared_epoch.value) if self.shared_epoch is not None else self.epoch
        sink: list[tuple[str, str]] = []
        for batch in self.batches(epoch, worker, num_workers, sink):
            batch["_bad"] = list(sink)
            sink.clear()
            yield batch
        # A trailing record-only item: it comes after every real batch in the loader's order
        # (its task number is >= steps_per_epoch), so it cannot disturb the batch order.
        yield {"_bad": list(sink)}


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


class TrainStream:
    """One rank's training batches, the same number on every rank (see the module docstring).

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
        local_batch_size)``, still identical on every rank.

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
        balanced: BalancedSubset | None = None,
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
            self._source.shared_epoch = ctx.RawValue("q", 0)
            self._loader = torch.utils.data.DataLoader(
                self._source,
                batch_size=None,
                num_workers=self.num_workers,
                multiprocessing_context=ctx,
                persistent_workers=True,
                collate_fn=_identity,
            )
        return self._loader

    def epoch_batches(self, epoch: int) -> Iterator[dict[str, torch.Tensor]]:
        """Exactly :attr:`steps_per_epoch` batches ``{"image", "index"}`` of this epoch.

        Raises
        ------
        DataError
            Only if nothing at all can be read (every shard unreadable), or, in the extreme, every
            sample of a batch and of the reserve is unusable.
        """
        count = 0
        if self.num_workers == 0:
            sink: list[tuple[str, str]] = []
            self._source.epoch = epoch
            for batch in self._source.batches(epoch, 0, 1, sink):
                self._bad.add(sink)
                sink.clear()
                count += 1
                yield batch
            self._bad.add(sink)
        else:
            loader = self._get_loader()
            self._source.shared_epoch.value = epoch
            for item in loader:
                self._bad.add(item.pop("_bad", ()))
                if "image" not in item:
                    continue  # a worker's trailing record-only item
                count += 1
                yield item
        if count != self._steps:  # cannot happen by construction; never return short silently
            raise DataError(
                f"rank {self.rank} produced {count} batches instead of {self._steps} in epoch "
                f"{epoch}; this is a bug in distnoisy.data.stream"
            )

    def close(self) -> None:
        """Stop the loader workers (also done when the stream is garbage-collected)."""
        self._loader = None


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
