"""Shard sets: WebDataset tar shards of one split, their ``manifest.json`` and ``labels.parquet``.

A shard set is one directory::

    train/
      train-000000.tar ...   WebDataset shards (``{split}-{n:06d}.tar``)
      labels.parquet         index, key, label, clean_label (-1 = unknown): all labels, no images
      manifest.json          written last: N, C, class names, shard list ("distnoisy-shards/1")

Every tar sample holds ``__key__`` = the zero-padded global index (WebDataset cuts keys at the
first dot of a file name, so dataset paths cannot be keys), the encoded image (``png``/``jpg``),
``cls`` (the dataset's own label, ASCII), ``clean.cls`` when the clean label is known, and a
``json`` member ``{"index", "key", "label", "clean_label"}`` with the dataset's own key. Nothing
is ever pickled. Files appear under their final names only when complete (temp name, then
``os.replace``), so a reader never sees a half-written shard, label table or manifest.

Two ways to write a set: :func:`write_shards` streams samples in one process; converters of
large data sets use :func:`begin_shard_set`, :func:`write_shard` (one shard at a time, from any
number of processes, each finished shard marked by a sidecar in ``.progress/``),
:func:`finished_shard` (a re-run skips what is done) and :func:`finish_shard_set` (label table and
manifest, last). Clean labels may be known for only some samples (``clean_label = -1`` elsewhere;
``num_clean_labels`` in the manifest; :func:`read_labels` with ``partial_clean=True``).
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from distnoisy.core.errors import ConfigError, DataError
from distnoisy.data.shard_format import (
    FORMAT,
    IMAGE_EXTS,
    LABELS_NAME,
    MANIFEST_NAME,
    Manifest,
    Sample,
    ShardInfo,
    read_labels,
    read_manifest,
    shard_list_dir,
    shard_name,
)

log = logging.getLogger(__name__)

# The format and the readers live in distnoisy.data.shard_format; re-exported here.
__all__ = [
    "FORMAT",
    "IMAGE_EXTS",
    "LABELS_NAME",
    "MANIFEST_NAME",
    "PROGRESS_DIR",
    "Manifest",
    "Sample",
    "ShardInfo",
    "begin_shard_set",
    "finish_shard_set",
    "finished_shard",
    "read_labels",
    "read_manifest",
    "shard_list_dir",
    "shard_name",
    "write_shard",
    "write_shards",
]

# Fixed integer member mtime: the same samples give byte-identical shards (reproducible caches),
# and, unlike webdataset's default float time.time(), no PAX header per member (2x faster reads).
_TAR_MTIME = 0


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _member_dict(sample: Sample, image_ext: str) -> dict[str, Any]:
    """The tar members of one sample, all already bytes (``encoder=False``: no pickling path)."""
    meta = {
        "index": sample.index,
        "key": sample.key,
        "label": sample.label,
        "clean_label": -1 if sample.clean_label is None else sample.clean_label,
    }
    members: dict[str, Any] = {
        "__key__": f"{sample.index:09d}",
        image_ext: bytes(sample.image),
        "cls": str(sample.label).encode("ascii"),
        "json": json.dumps(meta, ensure_ascii=False).encode("utf-8"),
    }
    if sample.clean_label is not None:
        members["clean.cls"] = str(sample.clean_label).encode("ascii")
    return members


class _ShardFile:
    """A shard being written under a temp name; ``commit`` gives it its final name."""

    def __init__(self, final: Path) -> None:
        import webdataset as wds

        self.final = final
        self.tmp = final.with_name(f".{final.name}.tmp-{uuid.uuid4().hex}")
        self.file = open(self.tmp, "wb")  # noqa: SIM115 -- closed in commit/abort
        self.writer = wds.TarWriter(self.file, encoder=False, mtime=_TAR_MTIME)
        self.count = 0

    def write(self, members: dict[str, Any]) -> None:
        self.writer.write(members)
        self.count += 1

    def commit(self) -> None:
        self.writer.close()
        self.file.flush()
        os.fsync(self.file.fileno())
        self.file.close()
        os.replace(self.tmp, self.final)

    def abort(self) -> None:
        # The write already failed; the temp file goes away whatever close() does.
        with contextlib.suppress(Exception):
            self.writer.close()
        self.file.close()
        self.tmp.unlink(missing_ok=True)


def write_shards(
    samples: Iterable[Sample],
    out_dir: Path,
    *,
    split: str,
    classes: list[str],
    shard_size: int,
    image_ext: str,
    dataset: str,
    params: dict[str, Any] | None = None,
) -> Manifest:
    """Write one split as WebDataset shards plus ``labels.parquet`` and ``manifest.json``.

    Parameters
    ----------
    samples
        The samples, in global index order 0..N-1 (checked).
    out_dir
        Directory of the shard set (created). An existing shard set there is replaced: its
        manifest is removed first, so the directory is never a valid but mixed set.
    split
        Split name (``train``, ``test``, ...); used in the shard names.
    classes
        Class names; ``len(classes)`` is C and labels must lie in 0..C-1.
    shard_size
        Samples per shard (the last shard may hold fewer).
    image_ext
        ``"png"`` or ``"jpg"``: the member name of the image bytes.
    dataset
        Dataset name recorded in the manifest.
    params
        Optional JSON-serialisable parameters stored in the manifest (e.g. how the set was made,
        used by caches to decide whether it can be reused).

    Returns
    -------
    Manifest
        The manifest that was written.

    Raises
    ------
    ConfigError
        Invalid arguments (shard size, extension, split name, no classes).
    DataError
        A sample out of order or with a label outside 0..C-1; nothing is left under a final name.
    """
    _check_write_args(split, classes, shard_size, image_ext)
    num_classes = len(classes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Invalidate any previous set first: readers only trust a directory with a manifest.
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)

    shards, indices, keys, labels, cleans = _write_members(
        samples, out_dir, split, num_classes, shard_size, image_ext, dataset
    )
    return _finalize(
        out_dir,
        split=split,
        classes=classes,
        image_ext=image_ext,
        dataset=dataset,
        params=params,
        shards=shards,
        indices=indices,
        keys=keys,
        labels=labels,
        cleans=cleans,
    )


def _check_write_args(split: str, classes: list[str], shard_size: int, image_ext: str) -> None:
    """``ConfigError`` for an invalid shard size, extension, split name or empty class list."""
    if image_ext not in IMAGE_EXTS:
        raise ConfigError(f"image_ext must be one of {IMAGE_EXTS}, got {image_ext!r}")
    if shard_size < 1:
        raise ConfigError(f"shard_size must be at least 1, got {shard_size}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", split):
        raise ConfigError(f"split must be letters, digits, '_' or '-', got {split!r}")
    if not classes:
        raise ConfigError("classes must name at least one class")


def _write_members(
    samples: Iterable[Sample],
    out_dir: Path,
    split: str,
    num_classes: int,
    shard_size: int,
    image_ext: str,
    dataset: str,
) -> tuple[list[ShardInfo], list[int], list[str], list[int], list[int]]:
    """Write the samples' shards; (shards, indices, keys, labels, clean labels or -1).

    A shard appears under its final name only when complete; on an error the open one is
    removed.
    """
    indices: list[int] = []
    keys: list[str] = []
    labels: list[int] = []
    cleans: list[int] = []
    shards: list[ShardInfo] = []
    current: _ShardFile | None = None
    first_index = 0
    try:
        for expected, s in enumerate(samples):
            _check_sample(s, expected, split, num_classes)
            if current is None:
                current = _ShardFile(out_dir / shard_name(split, len(shards)))
                first_index = s.index
            current.write(_member_dict(s, image_ext))
            indices.append(s.index)
            keys.append(s.key)
            labels.append(s.label)
            cleans.append(-1 if s.clean_label is None else s.clean_label)
            if current.count == shard_size:
                current.commit()
                shards.append(ShardInfo(current.final.name, current.count, first_index))
                if len(shards) % 100 == 0:  # progress on long conversions
                    log.info(
                        "%s/%s: %d samples in %d shards so far",
                        dataset,
                        split,
                        len(indices),
                        len(shards),
                    )
                current = None
        if current is not None:
            current.commit()
            shards.append(ShardInfo(current.final.name, current.count, first_index))
            current = None
    finally:
        if current is not None:
            current.abort()
    return shards, indices, keys, labels, cleans


def _check_sample(s: Sample, expected: int, split: str, num_classes: int) -> None:
    """Index order and label range of one sample to write (``DataError`` naming it)."""
    if s.index != expected:
        raise DataError(
            f"write_shards({split}): sample #{expected} has index {s.index}; samples must "
            "come in global index order 0..N-1"
        )
    if not 0 <= s.label < num_classes:
        raise DataError(
            f"write_shards({split}): sample {s.index} ({s.key}) has label {s.label}, "
            f"outside 0..{num_classes - 1}"
        )
    if s.clean_label is not None and not 0 <= s.clean_label < num_classes:
        raise DataError(
            f"write_shards({split}): sample {s.index} ({s.key}) has clean label "
            f"{s.clean_label}, outside 0..{num_classes - 1}"
        )


def _finalize(
    out_dir: Path,
    *,
    split: str,
    classes: list[str],
    image_ext: str,
    dataset: str,
    params: dict[str, Any] | None,
    shards: list[ShardInfo],
    indices: list[int],
    keys: list[str],
    labels: list[int],
    cleans: list[int],
) -> Manifest:
    """Remove stale shards, then write ``labels.parquet`` and, last, ``manifest.json``."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    num_classes = len(classes)
    # Shards left over from an earlier, larger set of the same split would never be read (the
    # manifest lists shards explicitly) but waste space and confuse a glob: remove them.
    written = {s.name for s in shards}
    for stale in out_dir.glob(f"{split}-*.tar"):
        if stale.name not in written:
            stale.unlink(missing_ok=True)

    clean_known = [c >= 0 for c in cleans]
    has_clean = bool(cleans) and all(clean_known)
    if any(clean_known) and not has_clean:
        # E.g. Clothing1M's noisy train set: ~25k of 1M images also have a verified label.
        log.info(
            "%s/%s: %d of %d samples have a clean label (labels.parquet keeps them, -1 = unknown; "
            "read_labels(partial_clean=True) returns them)",
            dataset,
            split,
            sum(clean_known),
            len(cleans),
        )
    table = pa.table(
        {
            "index": pa.array(indices, type=pa.int64()),
            "key": pa.array(keys, type=pa.string()),
            "label": pa.array(labels, type=pa.int64()),
            "clean_label": pa.array(cleans, type=pa.int64()),
        }
    )
    buf = io.BytesIO()
    pq.write_table(table, buf)
    _atomic_write_bytes(out_dir / LABELS_NAME, buf.getvalue())

    manifest = Manifest(
        root=str(out_dir.resolve()),
        dataset=dataset,
        split=split,
        num_samples=len(indices),
        num_classes=num_classes,
        classes=tuple(classes),
        image_ext=image_ext,
        has_clean_labels=has_clean,
        shards=tuple(shards),
        params=params,
        num_clean_labels=sum(clean_known),
    )
    doc = json.dumps(manifest.to_json(), indent=1, ensure_ascii=False).encode("utf-8")
    _atomic_write_bytes(out_dir / MANIFEST_NAME, doc)
    log.debug(
        "wrote %s/%s: %d samples in %d shards to %s",
        dataset,
        split,
        manifest.num_samples,
        len(shards),
        out_dir,
    )
    return manifest


# --------------------------------------------------------------------------------------------
# Resumable writing, one shard at a time (converters: parallel workers, re-runs skip done shards)

PROGRESS_DIR = ".progress"


def _sidecar(out_dir: Path, name: str) -> Path:
    return out_dir / PROGRESS_DIR / f"{name}.json"


def begin_shard_set(out_dir: Path | str, params: dict[str, Any] | None) -> bool:
    """Prepare ``out_dir`` for :func:`write_shard` calls; ``True`` if the set is already complete.

    A complete set (its manifest exists and records the same ``params``) needs no work. Otherwise
    the manifest is removed first, so the directory is never a valid but mixed set, and shards
    finished by an earlier, interrupted run with the same ``params`` are kept for
    :func:`finished_shard`.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / MANIFEST_NAME
    if path.is_file():
        try:
            doc = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            doc = {}
        if doc.get("format") == FORMAT and doc.get("params") == params:
            return True
        path.unlink()
    return False


def write_shard(
    out_dir: Path | str,
    samples: list[Sample],
    *,
    split: str,
    number: int,
    num_classes: int,
    image_ext: str,
    tag: Any = None,
) -> ShardInfo:
    """Write shard ``number`` of a set, plus a sidecar that marks it finished.

    The shard holds ``samples`` (consecutive global indices); its labels go into a sidecar under
    ``out_dir/.progress/``, written after the shard has its final name. A shard counts as
    finished (:func:`finished_shard`) only when both exist, the tar has the recorded size and the
    sidecar's ``tag`` equals the caller's (e.g. the conversion parameters). Safe to call from
    several processes for different shard numbers.

    Raises
    ------
    DataError
        Non-consecutive indices or a label outside 0..C-1 (nothing is left under a final name).
    """
    out_dir = Path(out_dir)
    if image_ext not in IMAGE_EXTS:
        raise ConfigError(f"image_ext must be one of {IMAGE_EXTS}, got {image_ext!r}")
    if not samples:
        raise ConfigError(f"shard {number} of {split} has no samples")
    first = samples[0].index
    for i, sample in enumerate(samples):
        _check_sample(sample, first + i, split, num_classes)
    name = shard_name(split, number)
    _sidecar(out_dir, name).unlink(missing_ok=True)
    (out_dir / PROGRESS_DIR).mkdir(parents=True, exist_ok=True)
    shard = _ShardFile(out_dir / name)
    try:
        for sample in samples:
            shard.write(_member_dict(sample, image_ext))
        shard.commit()
    except BaseException:
        shard.abort()
        raise
    doc = {
        "name": name,
        "count": len(samples),
        "first_index": first,
        "size": (out_dir / name).stat().st_size,
        "tag": tag,
        "keys": [x.key for x in samples],
        "labels": [x.label for x in samples],
        "clean_labels": [-1 if x.clean_label is None else x.clean_label for x in samples],
    }
    _atomic_write_bytes(_sidecar(out_dir, name), json.dumps(doc, ensure_ascii=False).encode())
    return ShardInfo(name, len(samples), first)


def _read_sidecar(out_dir: Path, split: str, number: int) -> dict[str, Any] | None:
    name = shard_name(split, number)
    try:
        doc = json.loads(_sidecar(out_dir, name).read_text(encoding="utf-8"))
        if (out_dir / name).stat().st_size != doc["size"]:
            return None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return doc


def finished_shard(out_dir: Path | str, *, split: str, number: int, tag: Any = None) -> bool:
    """Whether shard ``number`` was completely written by :func:`write_shard` with ``tag``."""
    doc = _read_sidecar(Path(out_dir), split, number)
    return doc is not None and doc.get("tag") == tag


def finish_shard_set(
    out_dir: Path | str,
    *,
    split: str,
    num_shards: int,
    classes: list[str],
    image_ext: str,
    dataset: str,
    params: dict[str, Any] | None = None,
) -> Manifest:
    """Write ``labels.parquet`` and ``manifest.json`` of shards ``0..num_shards-1``.

    Call it after every shard is finished. The sidecars are removed once the manifest exists
    (a re-run then recognises the whole set by its manifest, see :func:`begin_shard_set`).

    Raises
    ------
    DataError
        A shard is missing or unfinished, or the shards do not continue each other's indices.
    """
    out_dir = Path(out_dir)
    shards: list[ShardInfo] = []
    indices: list[int] = []
    keys: list[str] = []
    labels: list[int] = []
    cleans: list[int] = []
    for number in range(num_shards):
        doc = _read_sidecar(out_dir, split, number)
        if doc is None:
            raise DataError(
                f"{out_dir}: shard {shard_name(split, number)} is missing or unfinished; re-run "
                "the conversion (finished shards are kept)"
            )
        if doc["first_index"] != len(indices):
            raise DataError(
                f"{out_dir}: shard {doc['name']} starts at index {doc['first_index']}, expected "
                f"{len(indices)}"
            )
        shards.append(ShardInfo(doc["name"], int(doc["count"]), int(doc["first_index"])))
        indices.extend(range(len(indices), len(indices) + int(doc["count"])))
        keys.extend(doc["keys"])
        labels.extend(doc["labels"])
        cleans.extend(doc["clean_labels"])
    manifest = _finalize(
        out_dir,
        split=split,
        classes=classes,
        image_ext=image_ext,
        dataset=dataset,
        params=params,
        shards=shards,
        indices=indices,
        keys=keys,
        labels=labels,
        cleans=cleans,
    )
    shutil.rmtree(out_dir / PROGRESS_DIR, ignore_errors=True)
    return manifest
