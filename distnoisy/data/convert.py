"""Shared machinery of the dataset converters (Clothing1M, CIFAR, image folders).

A converter lists its samples as :class:`Item` (global index, image source, labels, key) per
split and calls :func:`convert_split`, which writes the shard set in parallel, one shard per task,
with a progress display, and resumably: shards finished by an earlier (interrupted) run with the
same parameters are skipped, and a split whose manifest already records them is skipped whole.

Images that cannot be read or decoded at conversion time keep their index (so the indices and
label files stay aligned with the dataset's key lists): their original bytes (empty if the file is
missing) go into the shard, the training stream skips and counts them, and the conversion report
names them.
"""

from __future__ import annotations

import io
import logging
import multiprocessing
import sys
import time
from collections.abc import Sequence
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distnoisy.core.errors import ConfigError
from distnoisy.core.machine import usable_cpus
from distnoisy.data.shards import (
    Manifest,
    Sample,
    begin_shard_set,
    finish_shard_set,
    finished_shard,
    read_manifest,
    write_shard,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Item:
    """One sample to convert: ``source`` is a file path (str) or already encoded image bytes."""

    index: int
    source: str | bytes
    label: int
    clean_label: int | None
    key: str


@dataclass(frozen=True)
class EncodeOptions:
    """How images are stored: ``resize`` = shorter side in pixels (None = keep the bytes)."""

    resize: int | None = None
    quality: int = 90
    image_ext: str = "jpg"


def encode_image(source: str | bytes, opts: EncodeOptions) -> tuple[bytes, str | None]:
    """The bytes to store for one image, and a problem description (None if it is fine).

    Without ``resize`` a file's bytes are stored as they are, after one decode that reports an
    image training would skip (JPEGs decoded at 1/8 scale). With ``resize`` the image is
    decoded, converted to RGB, its shorter side scaled to ``resize`` (antialiased bilinear,
    like torchvision's ``Resize``) and re-encoded as JPEG; an image that fails to decode keeps
    its original bytes.
    """
    try:
        if isinstance(source, bytes):
            data = source
        else:
            with open(source, "rb") as f:
                data = f.read()
    except OSError as exc:
        return b"", f"cannot read the image file: {exc.strerror or exc}"
    from PIL import Image

    if opts.resize is None:
        # Stored as they are, but decoded once (JPEGs at 1/8 scale: cheap) so that an image
        # training would skip is reported now, by name, and not found only when training.
        return data, _undecodable(data) if data else "empty image file"

    try:
        with Image.open(io.BytesIO(data)) as im:
            im = im.convert("RGB")
            w, h = im.size
            scale = opts.resize / min(w, h)
            if scale != 1.0:
                size = (max(1, round(w * scale)), max(1, round(h * scale)))
                im = im.resize(size, Image.Resampling.BILINEAR)
            buf = io.BytesIO()
            im.save(buf, format="JPEG", quality=opts.quality)
    except Exception as exc:  # PIL raises many types for damaged data
        return data, f"cannot decode the image: {type(exc).__name__}: {str(exc)[:120]}"
    return buf.getvalue(), None


def _undecodable(data: bytes) -> str | None:
    """Why PIL cannot decode ``data`` (truncated or damaged), or None when it can."""
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.draft("RGB", (64, 64))  # JPEG: decode at reduced scale, every byte still read
            im.load()
    except Exception as exc:  # PIL raises many types for damaged data
        return f"cannot decode the image: {type(exc).__name__}: {str(exc)[:120]}"
    return None


def _convert_shard(
    out_dir: str,
    split: str,
    number: int,
    items: list[Item],
    num_classes: int,
    opts: EncodeOptions,
    tag: Any,
) -> tuple[int, int, list[tuple[str, str]]]:
    """Worker task: encode and write one shard. Returns (number, samples, problems)."""
    samples: list[Sample] = []
    problems: list[tuple[str, str]] = []
    for it in items:
        data, problem = encode_image(it.source, opts)
        if problem is not None:
            problems.append((it.key, problem))
        samples.append(Sample(it.index, data, it.label, it.clean_label, it.key))
    write_shard(
        out_dir,
        samples,
        split=split,
        number=number,
        num_classes=num_classes,
        image_ext=opts.image_ext,
        tag=tag,
    )
    return number, len(items), problems


class Progress:
    """A one-line progress bar on a terminal; a log line every ~10% otherwise (CI, files)."""

    def __init__(self, what: str, total: int, *, done: int = 0) -> None:
        self.what, self.total, self.done = what, total, done
        self.start_done = done
        self.t0 = time.perf_counter()
        self.tty = sys.stderr.isatty()
        self._next_log = done + max(1, total // 10)

    def update(self, n: int) -> None:
        self.done += n
        rate = (self.done - self.start_done) / max(time.perf_counter() - self.t0, 1e-9)
        if self.tty:
            frac = self.done / max(self.total, 1)
            bar = "#" * int(30 * frac)
            sys.stderr.write(
                f"\r{self.what}: [{bar:<30}] {self.done}/{self.total} images, {rate:.0f}/s"
            )
            sys.stderr.flush()
        elif self.done >= self._next_log or self.done == self.total:
            log.info("%s: %d/%d images (%.0f/s)", self.what, self.done, self.total, rate)
            self._next_log = self.done + max(1, self.total // 10)

    def close(self) -> None:
        if self.tty:
            sys.stderr.write("\n")


@dataclass
class SplitResult:
    """What converting one split did."""

    manifest: Manifest
    converted: int  # images encoded in this run (0 when everything was done already)
    skipped_shards: int  # shards found finished and not rewritten
    seconds: float
    problems: list[tuple[str, str]]


def convert_split(
    items: Sequence[Item],
    out_dir: Path,
    *,
    split: str,
    classes: list[str],
    dataset: str,
    shard_size: int,
    opts: EncodeOptions,
    params: dict[str, Any],
    pool: Executor | None = None,
) -> SplitResult:
    """Write ``items`` (in index order 0..N-1) as the shard set ``out_dir``, resumably.

    Parameters
    ----------
    pool
        Executor encoding shards in parallel (from :func:`make_pool`); None = in this process.
    params
        The conversion parameters (recorded in the manifest); finished shards and sets are
        reused only when these are equal.
    """
    if shard_size < 1:
        raise ConfigError(f"--shard-size must be at least 1, got {shard_size}")
    out_dir = Path(out_dir)
    t0 = time.perf_counter()
    if begin_shard_set(out_dir, params):
        log.info("%s/%s: already converted in %s, skipped", dataset, split, out_dir)
        return SplitResult(read_manifest(out_dir), 0, 0, 0.0, [])
    chunks = [list(items[i : i + shard_size]) for i in range(0, len(items), shard_size)]
    todo = [
        n
        for n in range(len(chunks))
        if not finished_shard(out_dir, split=split, number=n, tag=params)
    ]
    skipped = len(chunks) - len(todo)
    if skipped:
        log.info(
            "%s/%s: %d of %d shards already written, resuming", dataset, split, skipped, len(chunks)
        )
    left = sum(len(chunks[n]) for n in todo)
    progress = Progress(f"{dataset}/{split}", len(items), done=len(items) - left)
    problems: list[tuple[str, str]] = []
    converted = 0
    args = (str(out_dir), split)
    try:
        if pool is None or len(todo) <= 1:
            for n in todo:
                _, count, bad = _convert_shard(*args, n, chunks[n], len(classes), opts, params)
                problems += bad
                converted += count
                progress.update(count)
        else:
            futures = [
                pool.submit(_convert_shard, *args, n, chunks[n], len(classes), opts, params)
                for n in todo
            ]
            for fut in as_completed(futures):
                _, count, bad = fut.result()
                problems += bad
                converted += count
                progress.update(count)
    finally:
        progress.close()
    manifest = finish_shard_set(
        out_dir,
        split=split,
        num_shards=len(chunks),
        classes=classes,
        image_ext=opts.image_ext,
        dataset=dataset,
        params=params,
    )
    seconds = time.perf_counter() - t0
    for key, why in problems[:20]:
        log.warning("%s/%s: %s: %s (kept; training skips it)", dataset, split, key, why)
    return SplitResult(manifest, converted, skipped, seconds, sorted(problems))


def make_pool(workers: int) -> ProcessPoolExecutor | None:
    """Processes for :func:`convert_split` (None for ``workers == 1``: work in this process).

    ``forkserver``: safe in processes that run threads (Ray, MLflow); the tasks are small.
    """
    if workers < 1:
        raise ConfigError(f"--workers must be at least 1, got {workers}")
    if workers == 1:
        return None
    ctx = multiprocessing.get_context("forkserver")
    return ProcessPoolExecutor(max_workers=workers, mp_context=ctx)


def default_workers() -> int:
    """All CPUs this process may use."""
    return usable_cpus()
