"""Shard sets written once into a local cache and reused while their parameters are unchanged.

The built-in datasets (digits, Fashion-MNIST) are converted on first use. Each split is written
into a temporary sibling directory and renamed into place when finished, so a reader never
sees a half-written set, and concurrent writers (several runs started at once) end with one
valid set. A set is reused only when its manifest records exactly the parameters asked for.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import uuid
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from distnoisy.core.errors import DataError
from distnoisy.data.shards import Manifest, Sample, read_manifest, write_shards

log = logging.getLogger(__name__)


def cached_set(
    directory: Path, dataset: str, split: str, params: Mapping[str, Any]
) -> Manifest | None:
    """The manifest of ``directory`` if it is a complete ``dataset`` set made with ``params``."""
    if not (directory / "manifest.json").is_file():
        return None
    try:
        manifest = read_manifest(directory)
    except DataError as exc:
        log.warning("ignoring the %s cache in %s: %s", dataset, directory, exc)
        return None
    if manifest.dataset != dataset or manifest.split != split or manifest.params != params:
        return None
    return manifest


def all_cached(root: Path, dataset: str, splits: Iterable[str], params: Mapping[str, Any]) -> bool:
    """Whether every split under ``root`` is a complete set made with ``params``."""
    return all(cached_set(root / split, dataset, split, params) for split in splits)


def _install(tmp_split: Path, final: Path, dataset: str, split: str, params: dict) -> None:
    """Move a finished split into place; if another process got there first, keep theirs."""
    if cached_set(final, dataset, split, params) is not None:
        return  # a concurrent process won the race with identical content
    if final.exists():
        # A stale set (other parameters, or a broken one): move it aside, then take its place.
        trash = final.with_name(f".{final.name}.old-{uuid.uuid4().hex}")
        try:
            os.rename(final, trash)
        except FileNotFoundError:
            pass  # someone else moved it already
        else:
            shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp_split, final)
    except OSError:
        # Lost a race: a non-empty directory appeared at ``final`` in between. Use it if valid.
        if cached_set(final, dataset, split, params) is None:
            raise DataError(
                f"could not install {dataset} shards at {final}: another process put something "
                "else there; remove it and run again"
            ) from None


def encode_png(pixels: np.ndarray) -> bytes:
    """Lossless PNG bytes of a 2-D (grey-scale, mode "L") or H x W x 3 uint8 array."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def clean_png_samples(
    images: np.ndarray, labels: np.ndarray, rows: np.ndarray, key_prefix: str
) -> Iterator[Sample]:
    """``images[rows]`` as PNG samples with verified labels, indexed 0.. in ``rows``' order.

    The key ``{key_prefix}/{row}`` names each image's row in the source arrays.
    """
    for i, j in enumerate(rows):
        label = int(labels[j])
        yield Sample(
            index=i,
            image=encode_png(images[j]),
            label=label,
            clean_label=label,
            key=f"{key_prefix}/{int(j)}",
        )


def write_cached_sets(
    root: Path,
    parts: Mapping[str, Iterable[Sample]],
    *,
    dataset: str,
    classes: list[str],
    params: dict[str, Any],
    shard_size: int,
) -> None:
    """Write each split of ``parts`` as the PNG shard set ``root/<split>``, atomically.

    Parameters
    ----------
    root
        Cache directory (created).
    parts
        Split name -> its samples in global index order (consumed once each).
    dataset, classes, params, shard_size
        Recorded in each manifest (``params`` decides whether a later call reuses the set).

    Notes
    -----
    All splits are written before any is installed, so an error while writing (bad input,
    full disk) leaves the previous cache as it was and no temporary directory behind.
    """
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".{dataset}-tmp-{os.getpid()}-{uuid.uuid4().hex}"
    try:
        for split, samples in parts.items():
            write_shards(
                samples,
                tmp / split,
                split=split,
                classes=classes,
                shard_size=shard_size,
                image_ext="png",
                dataset=dataset,
                params=params,
            )
        for split in parts:
            _install(tmp / split, root / split, dataset, split, params)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
