"""Reading local tar shards through a member index built once per process.

The first pass over a shard reads its tar headers only; later passes walk the index, and a
sample's bytes are read (one positioned read) only when it is decoded.
"""

from __future__ import annotations

import os
import re
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distnoisy.data.stream.decode import _unreadable_tar
from distnoisy.data.stream.records import truncated_reason

# (global index, image bytes or a reference to them, __key__, shard file name)
Raw = tuple[int, "bytes | _LocalMember", str, str]


class _LocalMember:
    """The image bytes of one sample in a local shard, read only when the sample is decoded.

    Every loader worker of a rank walks the rank's whole stream to keep batches independent of
    the number of workers (see :mod:`distnoisy.data.stream`); with these references, a worker
    reads only the bytes of its own batches and never parses a tar header after the first pass.
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


# webdataset's member grouping (``tariterators.base_plus_ext``), here so that reading local
# shards needs no webdataset (the GPU benchmark runs on machines without it).
_BASE_PLUS_EXT = re.compile(r"^((?:.*/|)[^.]+)[.]([^/]*)$")


def base_plus_ext(path: str) -> tuple[str | None, str | None]:
    """``(key, extensions)`` of a member name, split at the first dot of its base name."""
    match = _BASE_PLUS_EXT.match(path)
    return (match.group(1), match.group(2)) if match else (None, None)


def _index_shard(path: str, image_ext: str) -> _ShardIndex:
    """Index the ``image_ext`` members of a local shard; errors are recorded, not raised.

    The same grouping as webdataset's reader: a member's key is its name up to the first dot of
    the base name. Non-regular members and ``__meta__`` files are skipped. A cut header ends the
    shard silently (as in tarfile's stream mode: the manifest count reports it); a member whose
    data runs past the end of the file is an error.
    """
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
            sink.append((shard, truncated_reason(seen, expected)))
