"""The shard-set format: its names and records, and reading a set (manifest and label table).

:mod:`distnoisy.data.shards` (which re-exports these names) describes the layout and writes sets.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from distnoisy.core.errors import DataError
from distnoisy.data import fs

# The logger of distnoisy.data.shards, which re-exports this module's readers.
log = logging.getLogger("distnoisy.data.shards")

FORMAT = "distnoisy-shards/1"
MANIFEST_NAME = "manifest.json"
LABELS_NAME = "labels.parquet"
IMAGE_EXTS = ("png", "jpg")
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
