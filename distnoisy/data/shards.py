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
import dataclasses
import io
import json
import logging
import os
import re
import shutil
import uuid
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distnoisy.data import fs
from distnoisy.errors import ConfigError, DataError

log = logging.getLogger(__name__)

FORMAT = "distnoisy-shards/1"
MANIFEST_NAME = "manifest.json"
LABELS_NAME = "labels.parquet"
IMAGE_EXTS = ("png", "jpg")
# Fixed integer member mtime: the same samples give byte-identical shards (reproducible caches),
# and, unlike webdataset's default float time.time(), no PAX header per member (2x faster reads).
_TAR_MTIME = 0
_HOW_TO_CREATE = (
    "digits shards are created automatically by `python -m distnoisy.train` (data.name=digits); "
    "for other datasets run a converter, e.g. `python -m distnoisy.data.clothing1m --root DIR "
    "--out DIR` (CIFAR and image folders convert the same way), or write them with "
    "distnoisy.data.shards.write_shards"
)


@dataclass(frozen=True)
class Sample:
    """One sample to write.

    Parameters
    ----------
    index
        Global index within the split, 0..N-1; samples must arrive in index order.
    image
        Encoded image bytes (PNG or JPEG, matching ``image_ext``).
    label
        The dataset's own (possibly noisy) label, 0..C-1.
    clean_label
        The verified clean label when the dataset has one, else ``None``.
    key
        The dataset's own identifier (e.g. a file path); reported in outputs as ``key``.
    """

    index: int
    image: bytes
    label: int
    clean_label: int | None
    key: str


@dataclass(frozen=True)
class ShardInfo:
    """One shard of a manifest: file name, sample count, global index of its first sample."""

    name: str
    count: int
    first_index: int


@dataclass(frozen=True)
class Manifest:
    """The description of a shard set (``manifest.json``) plus the directory it was read from.

    Shard ``i`` holds the samples with global indices
    ``first_index .. first_index + count - 1``, in that order. ``root`` is that directory: an
    absolute local path, or a URL (``s3://...``, ``https://...``) for a remote set.
    """

    root: str
    dataset: str
    split: str
    num_samples: int
    num_classes: int
    classes: tuple[str, ...]
    image_ext: str
    has_clean_labels: bool
    shards: tuple[ShardInfo, ...]
    params: dict[str, Any] | None = field(default=None, compare=False)
    # Samples with a known clean label (all when ``has_clean_labels``; a subset is possible).
    num_clean_labels: int = 0

    @property
    def urls(self) -> list[str]:
        """Absolute paths (or URLs) of the shards, in manifest (= index) order."""
        return [fs.join(self.root, s.name) for s in self.shards]

    @property
    def labels_path(self) -> str:
        return fs.join(self.root, LABELS_NAME)

    def to_json(self) -> dict[str, Any]:
        """The ``manifest.json`` document (without the local ``root``)."""
        doc: dict[str, Any] = {
            "format": FORMAT,
            "dataset": self.dataset,
            "split": self.split,
            "num_samples": self.num_samples,
            "num_classes": self.num_classes,
            "classes": list(self.classes),
            "image_ext": self.image_ext,
            "has_clean_labels": self.has_clean_labels,
            "num_clean_labels": self.num_clean_labels,
            "shards": [dataclasses.asdict(s) for s in self.shards],
        }
        if self.params is not None:
            doc["params"] = self.params
        return doc


def shard_name(split: str, n: int) -> str:
    """File name of shard ``n`` of ``split``."""
    return f"{split}-{n:06d}.tar"


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
    if image_ext not in IMAGE_EXTS:
        raise ConfigError(f"image_ext must be one of {IMAGE_EXTS}, got {image_ext!r}")
    if shard_size < 1:
        raise ConfigError(f"shard_size must be at least 1, got {shard_size}")
    if not re.fullmatch(r"[A-Za-z0-9_-]+", split):
        raise ConfigError(f"split must be letters, digits, '_' or '-', got {split!r}")
    if not classes:
        raise ConfigError("classes must name at least one class")
    num_classes = len(classes)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    # Invalidate any previous set first: readers only trust a directory with a manifest.
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)

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


def _require(doc: dict[str, Any], name: str, kind: type | tuple[type, ...], path: str) -> Any:
    if name not in doc:
        raise DataError(f"{path}: manifest has no {name!r} field")
    value = doc[name]
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is int):
        raise DataError(f"{path}: manifest field {name!r} has the wrong type ({value!r})")
    return value


def _some(names: list[str]) -> str:
    """The first three names, and how many more."""
    more = f" and {len(names) - 3} more" if len(names) > 3 else ""
    return f"{', '.join(names[:3])}{more}"


def read_manifest(directory: str | os.PathLike[str]) -> Manifest:
    """Read and check ``directory/manifest.json``.

    Parameters
    ----------
    directory
        A shard-set directory (or the path of its ``manifest.json``): a local path or a URL
        (``s3://bucket/c1m-wds/noisy_train``, ``https://...``; see :mod:`distnoisy.data.fs`).

    Returns
    -------
    Manifest

    Raises
    ------
    DataError
        The directory or manifest is missing (the message says how to create shards), the manifest
        is not valid JSON or has another format version, its counts do not add up, a shard it
        lists is missing, or a URL cannot be reached.
    ConfigError
        A URL whose fsspec backend is not installed.
    """
    if fs.is_url(directory):
        root = str(directory).rstrip("/")
        if fs.basename(root) == MANIFEST_NAME:
            root = fs.parent(root)
        path = fs.join(root, MANIFEST_NAME)
        try:
            raw = fs.read_bytes(path)
        except FileNotFoundError:
            raise DataError(
                f"no {MANIFEST_NAME} at {root} (a wrong URL, not a shard set, or its upload did "
                f"not finish: upload a converter's whole output); {_HOW_TO_CREATE}"
            ) from None
    else:
        local = Path(directory).expanduser()
        if local.name == MANIFEST_NAME:
            local = local.parent
        path = str(local / MANIFEST_NAME)
        if not local.is_dir():
            raise DataError(f"shard directory {local} does not exist; {_HOW_TO_CREATE}")
        if not Path(path).is_file():
            raise DataError(
                f"no {MANIFEST_NAME} in {local} (not a shard set, or its writing did not finish); "
                f"{_HOW_TO_CREATE}"
            )
        try:
            raw = Path(path).read_bytes()
        except OSError as exc:
            raise DataError(f"{path}: cannot read the manifest ({exc})") from exc
        root = str(local.resolve())
    manifest = _parse_manifest(raw, root, path)
    missing = _missing_shards(manifest)
    if missing:
        raise DataError(
            f"{path}: shard file(s) listed in the manifest are missing: "
            f"{_some([fs.join(root, m) for m in missing])}"
        )
    return manifest


def _parse_manifest(raw: bytes, root: str, path: str) -> Manifest:
    """Check a ``manifest.json`` document (read from ``path``) and build its :class:`Manifest`."""
    try:
        doc = json.loads(raw)
    except ValueError as exc:
        raise DataError(f"{path}: cannot read the manifest ({exc})") from exc
    if not isinstance(doc, dict):
        raise DataError(f"{path}: the manifest is not a JSON object")
    fmt = doc.get("format")
    if fmt != FORMAT:
        raise DataError(
            f"{path}: manifest format {fmt!r} is not supported (expected {FORMAT!r}); "
            "re-create the shards with this version of distnoisy"
        )
    num_samples = _require(doc, "num_samples", int, path)
    num_classes = _require(doc, "num_classes", int, path)
    classes = _require(doc, "classes", list, path)
    image_ext = _require(doc, "image_ext", str, path)
    raw_shards = _require(doc, "shards", list, path)
    if image_ext not in IMAGE_EXTS:
        raise DataError(f"{path}: image_ext {image_ext!r} is not one of {IMAGE_EXTS}")
    if len(classes) != num_classes:
        raise DataError(f"{path}: {len(classes)} class names but num_classes={num_classes}")
    shards = []
    next_index = 0
    for i, s in enumerate(raw_shards):
        try:
            info = ShardInfo(str(s["name"]), int(s["count"]), int(s["first_index"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise DataError(f"{path}: shard entry #{i} is malformed ({s!r})") from exc
        if info.first_index != next_index or info.count < 1 or "/" in info.name:
            raise DataError(
                f"{path}: shard {info.name} (first_index {info.first_index}, count {info.count})"
                f" does not continue the index range at {next_index}"
            )
        next_index += info.count
        shards.append(info)
    if next_index != num_samples:
        raise DataError(f"{path}: shards hold {next_index} samples but num_samples={num_samples}")
    return Manifest(
        root=root,
        dataset=str(doc.get("dataset", "")),
        split=str(doc.get("split", "")),
        num_samples=num_samples,
        num_classes=num_classes,
        classes=tuple(str(c) for c in classes),
        image_ext=image_ext,
        has_clean_labels=bool(doc.get("has_clean_labels", False)),
        shards=tuple(shards),
        params=doc.get("params"),
        num_clean_labels=int(
            doc.get("num_clean_labels", num_samples if doc.get("has_clean_labels") else 0)
        ),
    )


def _missing_shards(manifest: Manifest) -> list[str]:
    """Names of the manifest's shards that are not there; one listing for a remote set."""
    if not fs.is_url(manifest.root):
        return [s.name for s in manifest.shards if not (Path(manifest.root) / s.name).is_file()]
    try:
        names = fs.list_names(manifest.root)
    except (FileNotFoundError, DataError) as exc:
        names, why = set(), fs.describe(exc)
    else:
        why = f"no {MANIFEST_NAME} in its listing"
    if MANIFEST_NAME not in names:  # e.g. a web server without directory indexes
        log.info(
            "cannot list %s (%s): its shards are not checked before reading; a missing one is "
            "recorded as bad data when read",
            manifest.root,
            why,
        )
        return []
    return [s.name for s in manifest.shards if s.name not in names]


def shard_list_dir(shards: list[str], what: str) -> str:
    """The directory of a shard set named by its shards, checked against its manifest.

    Parameters
    ----------
    shards
        Shard paths or URLs, e.g. a brace pattern expanded by :func:`distnoisy.data.fs.expand`.
        They must be exactly the shards of the ``manifest.json`` in their directory, in any
        order: a subset would leave global sample indices without samples.
    what
        How the user named them, for messages (``data.urls=...``).

    Returns
    -------
    str
        The set's directory (``Manifest.root``).

    Raises
    ------
    DataError
        A name that is not a ``.tar`` shard, shards in several directories, or a list that is not
        the manifest's (the message names what is missing, extra or repeated).
    """
    shards = [s if fs.is_url(s) else str(Path(s).expanduser().resolve()) for s in shards]
    odd = [s for s in shards if not s.endswith(".tar")]
    if odd:
        raise DataError(f"{what}: {odd[0]} is not a .tar shard; name a directory or .tar shards")
    dirs = sorted({fs.parent(s) for s in shards})
    if len(dirs) > 1:
        raise DataError(
            f"{what}: these shards lie in {len(dirs)} directories ({_some(dirs)}); name the "
            "shards of one set, or its directory"
        )
    manifest = read_manifest(dirs[0])
    listed = Counter(fs.basename(s) for s in shards)
    expected = [s.name for s in manifest.shards]
    problems = [
        f"{label}: {_some(names)}"
        for label, names in (
            ("missing", [n for n in expected if n not in listed]),
            ("not in the manifest", sorted(set(listed) - set(expected))),
            ("listed twice", sorted(n for n, k in listed.items() if k > 1)),
        )
        if names
    ]
    if problems:
        raise DataError(
            f"{what} must name exactly the {len(expected)} shards of "
            f"{fs.join(manifest.root, MANIFEST_NAME)} (a subset would break the global sample "
            f"index); {'; '.join(problems)}; give the directory instead: {manifest.root}"
        )
    return manifest.root


def read_labels(
    manifest: Manifest, *, partial_clean: bool = False
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """All labels of a shard set from ``labels.parquet``, without decoding any image.

    Parameters
    ----------
    manifest
        The shard set (from :func:`read_manifest`).
    partial_clean
        Also return clean labels known for only some samples (``-1`` where unknown), e.g.
        Clothing1M's noisy-train images that also have a verified label.

    Returns
    -------
    labels : numpy.ndarray of int64, shape (N,)
        The dataset's own labels, row ``i`` = global index ``i``.
    clean_labels : numpy.ndarray of int64, shape (N,), or None
        Clean labels when the manifest says they are known (with ``partial_clean``: when any is
        known, ``-1`` = unknown), else ``None``.
    keys : numpy.ndarray of str (object), shape (N,)
        The dataset's own keys.

    Raises
    ------
    DataError
        The file is missing or unreadable, lacks a column, its indices do not cover 0..N-1 exactly
        once, or a label lies outside 0..C-1 (the message names the index and the value); a URL
        cannot be reached.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = manifest.labels_path
    source: str | pa.BufferReader = path
    try:
        if fs.is_url(path):
            source = pa.BufferReader(fs.read_bytes(path))  # one GET; pyarrow needs random access
        elif not Path(path).is_file():
            raise FileNotFoundError(path)
    except FileNotFoundError:
        raise DataError(f"label table {path} is missing; {_HOW_TO_CREATE}") from None
    try:
        table = pq.read_table(source)
    except Exception as exc:  # pyarrow raises several types for a damaged file
        raise DataError(f"{path}: cannot read the label table ({exc})") from exc
    for col in ("index", "key", "label", "clean_label"):
        if col not in table.column_names:
            raise DataError(f"{path}: column {col!r} is missing (found {table.column_names})")
    n, c = manifest.num_samples, manifest.num_classes
    index = table.column("index").to_numpy().astype(np.int64, copy=False)
    if len(index) != n:
        raise DataError(f"{path}: {len(index)} rows but the manifest says {n} samples")
    order = np.argsort(index, kind="stable")
    if not np.array_equal(index[order], np.arange(n)):
        outside = index[(index < 0) | (index >= n)]
        if len(outside):
            raise DataError(f"{path}: index {int(outside[0])} is outside 0..{n - 1}")
        counts = np.bincount(index, minlength=n)
        i = int(np.flatnonzero(counts != 1)[0])
        raise DataError(
            f"{path}: indices must cover 0..{n - 1} exactly once; index {i} appears "
            f"{int(counts[i])} times"
        )
    labels = table.column("label").to_numpy().astype(np.int64, copy=False)[order]
    clean = table.column("clean_label").to_numpy().astype(np.int64, copy=False)[order]
    keys = np.asarray(table.column("key").to_pylist(), dtype=object)[order]
    bad = np.flatnonzero((labels < 0) | (labels >= c))
    if len(bad):
        i = int(bad[0])
        raise DataError(f"{path}: index {i} has label {int(labels[i])}, outside 0..{c - 1}")
    bad = np.flatnonzero((clean < -1) | (clean >= c))
    if len(bad):
        i = int(bad[0])
        raise DataError(
            f"{path}: index {i} has clean label {int(clean[i])}, outside 0..{c - 1} (-1 = unknown)"
        )
    if partial_clean and (clean >= 0).any():
        return labels, clean, keys
    if not manifest.has_clean_labels:
        return labels, None, keys
    if (clean < 0).any():
        i = int(np.flatnonzero(clean < 0)[0])
        raise DataError(f"{path}: the manifest says clean labels are known but index {i} has none")
    return labels, clean, keys
