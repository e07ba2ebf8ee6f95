"""Undecoded samples of a list of shards: local files through the member index, URLs through
webdataset's streaming reader, with unreadable members recorded rather than raised.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import numpy as np

from distnoisy.data import fs
from distnoisy.data.stream.decode import _unreadable_tar
from distnoisy.data.stream.records import truncated_reason
from distnoisy.data.stream.tar_index import Raw, _read_indexed


class _EndsWith:
    """``select_files`` predicate: read only the image member (labels come from the table)."""

    def __init__(self, suffix: str) -> None:
        self.suffix = suffix

    def __call__(self, fname: str) -> bool:
        return fname.endswith(self.suffix)


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
                        truncated_reason(seen[i], expected),
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
