"""The label file: a label per global sample index, saved as Parquet, loaded and validated.

The file (:func:`save_label_file` / :func:`load_label_file`) is Parquet with int64 columns
``index``, ``label`` and ``clean_label`` (-1 if unknown) plus JSON metadata; ``.csv`` and ``.npy``
files are accepted on load for user-supplied labels (``noise.kind=file``). A local path or a URL.
:mod:`distnoisy.data.noise` writes the synthetic-noise files and re-exports these names.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import numbers
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from distnoisy.core.errors import ConfigError, DataError
from distnoisy.data import fs

__all__ = ["LabelFile", "load_label_file", "read_label_file", "save_label_file"]

#: Key of the JSON metadata in the Parquet file's key/value metadata.
_META_KEY = b"distnoisy"


def _check_num_classes(num_classes: Any) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, numbers.Integral):
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    if num_classes < 2:
        raise ConfigError(f"num_classes must be >= 2, got {num_classes}")
    return int(num_classes)


@dataclass
class LabelFile:
    """A loaded label file, ordered by global sample index.

    Attributes
    ----------
    labels
        int64 array of the given (noisy) labels, ``labels[i]`` for sample index i.
    clean_labels
        int64 array of clean labels (-1 where unknown), or ``None`` if none are known.
    meta
        The file's metadata (empty for CSV and NPY files).
    """

    labels: np.ndarray
    clean_labels: np.ndarray | None
    meta: dict[str, Any] = field(default_factory=dict)


def _json_default(obj: Any) -> Any:
    # Metadata often carries numpy scalars (a rate from a config, a realised rate).
    if isinstance(obj, np.integer):
        return int(obj)
    if isinstance(obj, np.floating):
        return float(obj)
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON serialisable")


def save_label_file(
    path: str | os.PathLike[str],
    noisy: np.ndarray,
    clean: np.ndarray | None,
    meta: Mapping[str, Any],
) -> None:
    """Write a label file (Parquet) atomically.

    Parameters
    ----------
    path
        Destination; must end in ``.parquet``. Its directory must exist.
    noisy
        1-D integer array; row i is sample index i.
    clean
        1-D integer array of the same length (-1 for unknown), or ``None`` (all unknown).
    meta
        JSON-serialisable dict stored as file-level metadata (kind, rate, seed, ...).

    Notes
    -----
    The table is written to a temporary file in the same directory and moved into place with
    :func:`os.replace`, so concurrent readers (other Ray workers) see either the old file or the
    complete new one, never a partial file.
    """
    path = Path(path)
    if path.suffix != ".parquet":
        raise ConfigError(f"label files are written as Parquet; {path} must end in .parquet")
    noisy = np.asarray(noisy)
    if noisy.ndim != 1 or not np.issubdtype(noisy.dtype, np.integer):
        raise DataError(
            f"noisy labels must be a 1-D integer array, got {noisy.dtype} {noisy.shape}"
        )
    if clean is None:
        clean = np.full(noisy.shape, -1, dtype=np.int64)
    clean = np.asarray(clean)
    if clean.shape != noisy.shape or not np.issubdtype(clean.dtype, np.integer):
        raise DataError(
            f"clean labels must be a 1-D integer array of length {noisy.shape[0]}, "
            f"got {clean.dtype} {clean.shape}"
        )
    try:
        meta_json = json.dumps(dict(meta), sort_keys=True, default=_json_default)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"label-file metadata is not JSON serialisable: {exc}") from None
    table = pa.table(
        {
            "index": pa.array(np.arange(noisy.shape[0], dtype=np.int64)),
            "label": pa.array(noisy.astype(np.int64, copy=False)),
            "clean_label": pa.array(clean.astype(np.int64, copy=False)),
        }
    ).replace_schema_metadata({_META_KEY: meta_json.encode()})
    fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            pq.write_table(table, fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp_name, path)
    except BaseException:
        # Never leave a half-written temp file behind (e.g. disk full, KeyboardInterrupt).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def _first_few(values: np.ndarray, k: int = 5) -> str:
    shown = ", ".join(str(int(v)) for v in values[:k])
    return shown + (", ..." if values.size > k else "")


def _read_parquet(
    path: str | Path, source: Path | io.BytesIO
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, dict[str, Any]]:
    try:
        table = pq.read_table(source)
    except (pa.ArrowException, OSError) as exc:
        raise DataError(f"label file {path} is not a readable Parquet file: {exc}") from None
    meta: dict[str, Any] = {}
    raw = (table.schema.metadata or {}).get(_META_KEY)
    if raw is not None:
        try:
            meta = json.loads(raw)
        except ValueError:
            raise DataError(f"label file {path} has corrupt distnoisy metadata") from None
    columns: dict[str, np.ndarray | None] = {}
    for name in ("index", "label", "clean_label"):
        if name not in table.column_names:
            if name == "clean_label":
                columns[name] = None
                continue
            raise DataError(
                f"label file {path} has no {name!r} column (has: {', '.join(table.column_names)}); "
                f"expected columns index, label[, clean_label]"
            )
        col = table.column(name)
        if not pa.types.is_integer(col.type):
            raise DataError(
                f"label file {path}: column {name!r} has type {col.type}, expected an integer type"
            )
        if col.null_count:
            if name != "clean_label":
                raise DataError(f"label file {path}: column {name!r} has {col.null_count} nulls")
            col = col.fill_null(-1)  # a missing clean label is just "unknown"
        columns[name] = col.to_numpy().astype(np.int64, copy=False)
    assert columns["index"] is not None and columns["label"] is not None
    return columns["index"], columns["label"], columns["clean_label"], meta


def _read_csv(
    path: str | Path, source: Path | io.BytesIO
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Parse a CSV label file; also return each row's 1-based line number for error messages."""
    text = (
        open(source, newline="")  # noqa: SIM115 -- closed by the with statement
        if isinstance(source, Path)
        else io.TextIOWrapper(source, newline="")
    )
    with text as fh:
        reader = csv.reader(fh)
        header: list[str] | None = None
        for row in reader:
            if row:
                header = [h.strip() for h in row]
                break
        if header is None:
            raise DataError(
                f"label file {path} is empty; expected header index,label[,clean_label]"
            )
        for name in ("index", "label"):
            if name not in header:
                raise DataError(
                    f"label file {path}: header has no {name!r} column (header: "
                    f"{','.join(header)}); expected index,label[,clean_label]"
                )
        i_idx, i_lab = header.index("index"), header.index("label")
        i_cl = header.index("clean_label") if "clean_label" in header else None
        index: list[int] = []
        label: list[int] = []
        clean: list[int] = []
        lines: list[int] = []
        for row in reader:
            if not row:  # blank line
                continue
            line = reader.line_num
            if len(row) != len(header):
                raise DataError(
                    f"label file {path}, line {line}: {len(row)} fields, header has {len(header)}"
                )
            try:
                index.append(int(row[i_idx]))
                label.append(int(row[i_lab]))
                if i_cl is not None:
                    # An empty clean label means "unknown", like -1.
                    cell = row[i_cl].strip()
                    clean.append(int(cell) if cell else -1)
            except ValueError:
                raise DataError(
                    f"label file {path}, line {line}: expected integers, got {','.join(row)!r}"
                ) from None
            lines.append(line)
    return (
        np.asarray(index, dtype=np.int64),
        np.asarray(label, dtype=np.int64),
        np.asarray(clean, dtype=np.int64) if i_cl is not None else None,
        np.asarray(lines, dtype=np.int64),
    )


def _read_npy(path: str | Path, source: Path | io.BytesIO, num_samples: int) -> np.ndarray:
    try:
        arr = np.load(source, allow_pickle=False)
    except ValueError as exc:
        # Raised for object arrays (which would need pickle) and for malformed headers.
        raise DataError(f"label file {path} is not a plain numeric .npy array: {exc}") from None
    if not isinstance(arr, np.ndarray):
        raise DataError(f"label file {path} must hold one 1-D array, not an .npz archive")
    if arr.ndim != 1:
        raise DataError(f"label file {path} must hold a 1-D label array, got shape {arr.shape}")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"label file {path} has dtype {arr.dtype}, expected an integer dtype")
    if arr.shape[0] != num_samples:
        raise DataError(
            f"label file {path} has {arr.shape[0]} labels, expected {num_samples} "
            f"(one per sample index 0..{num_samples - 1})"
        )
    return arr.astype(np.int64, copy=False)


def _label_source(path: str | Path) -> Path | io.BytesIO | None:
    """The local file, or the bytes of a URL (one GET); None when nothing is there."""
    if isinstance(path, Path):
        return path if path.is_file() else None
    try:
        return io.BytesIO(fs.read_bytes(path))
    except FileNotFoundError:
        return None


def load_label_file(path: str | os.PathLike[str], num_samples: int, num_classes: int) -> LabelFile:
    """Load and validate a label file.

    Parameters
    ----------
    path
        ``.parquet`` (columns ``index``, ``label``, optional ``clean_label``), ``.csv`` (header
        ``index,label[,clean_label]``) or ``.npy`` (1-D integer array; position = index). A local
        path or a URL (read whole, through fsspec).
    num_samples
        N: the rows must cover each index 0..N-1 exactly once (in any order).
    num_classes
        C: labels must lie in 0..C-1; clean labels in 0..C-1 or -1 (unknown).

    Returns
    -------
    LabelFile
        Labels ordered by sample index. ``clean_labels`` is ``None`` when the file has no clean
        labels or all of them are -1.

    Raises
    ------
    DataError
        Missing/unreadable file, missing column, wrong dtype, bad or duplicate or missing
        indices, or a label out of range; the message is one line naming the problem. A URL
        that cannot be reached.
    """
    num_classes = _check_num_classes(num_classes)
    if isinstance(num_samples, bool) or not isinstance(num_samples, numbers.Integral):
        raise ConfigError(f"num_samples must be a positive integer, got {num_samples!r}")
    if num_samples < 1:
        raise ConfigError(f"num_samples must be a positive integer, got {num_samples}")
    return read_label_file(path, int(num_samples), num_classes)


def read_label_file(path: str | os.PathLike[str], num_samples: int, num_classes: int) -> LabelFile:
    """:func:`load_label_file` for a caller whose ``num_samples`` (>= 1) and ``num_classes``
    (>= 2) are already checked (a shard set's manifest, a checked noise request): the file's
    rows are checked, the arguments are not."""
    path = str(path) if fs.is_url(path) else Path(path)
    source = _label_source(path)
    if source is None:
        raise DataError(
            f"label file {path} does not exist: synthetic noise files are generated by distnoisy "
            f"(noise.kind=symmetric|pair|instance, cached as noise-<dataset>-<kind>-<rate>-<seed>"
            f".parquet); for noise.kind=file give a .parquet/.csv/.npy with one label per sample "
            f"index 0..{num_samples - 1}"
        )
    index, label, clean, lines, meta = _read_rows(path, source, num_samples)
    _check_rows(path, index, label, clean, lines, num_samples, num_classes)

    order = np.argsort(index, kind="stable")
    labels = label[order]
    clean_labels = clean[order] if clean is not None else None
    if clean_labels is not None and bool(np.all(clean_labels == -1)):
        clean_labels = None
    return LabelFile(labels=labels, clean_labels=clean_labels, meta=meta)


def _read_rows(
    path: str | Path, source: Path | io.BytesIO, num_samples: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray | None, dict[str, Any]]:
    """(index, label, clean label or None, CSV line numbers or None, metadata) in file order."""
    ext = os.path.splitext(str(path))[1]
    suffix = ext.lower()
    lines: np.ndarray | None = None
    meta: dict[str, Any] = {}
    if suffix == ".parquet":
        index, label, clean, meta = _read_parquet(path, source)
    elif suffix == ".csv":
        index, label, clean, lines = _read_csv(path, source)
    elif suffix == ".npy":
        label = _read_npy(path, source, num_samples)
        index, clean = np.arange(num_samples, dtype=np.int64), None
    else:
        raise DataError(
            f"label file {path} has unsupported suffix {ext!r}; use .parquet, .csv or .npy"
        )
    return index, label, clean, lines, meta


def _check_rows(
    path: str | Path,
    index: np.ndarray,
    label: np.ndarray,
    clean: np.ndarray | None,
    lines: np.ndarray | None,
    num_samples: int,
    num_classes: int,
) -> None:
    """Raise :class:`DataError` unless each index 0..N-1 appears once and labels are in range."""

    def where(pos: int) -> str:
        # Point at the CSV line when there is one: that is what the user will open.
        at = f"index {int(index[pos])}"
        return f"{at} (line {int(lines[pos])})" if lines is not None else at

    # Indices: each of 0..N-1 exactly once.
    out = np.flatnonzero((index < 0) | (index >= num_samples))
    if out.size:
        p = int(out[0])
        raise DataError(
            f"label file {path}: {out.size} rows have an index outside 0..{num_samples - 1}, "
            f"first: {where(p)}"
        )
    counts = np.bincount(index, minlength=num_samples)
    dup = np.flatnonzero(counts > 1)
    if dup.size:
        raise DataError(
            f"label file {path}: {dup.size} indices appear more than once, first: {_first_few(dup)}"
        )
    missing = np.flatnonzero(counts == 0)
    if missing.size:
        raise DataError(
            f"label file {path}: {missing.size} of {num_samples} sample indices are missing, "
            f"first: {_first_few(missing)}"
        )

    # Labels: report the first offending row in file order.
    bad = np.flatnonzero((label < 0) | (label >= num_classes))
    if bad.size:
        p = int(bad[0])
        raise DataError(
            f"label file {path}: label {int(label[p])} at {where(p)} is outside the valid range "
            f"0..{num_classes - 1} ({bad.size} labels out of range)"
        )
    if clean is not None:
        bad = np.flatnonzero((clean < -1) | (clean >= num_classes))
        if bad.size:
            p = int(bad[0])
            raise DataError(
                f"label file {path}: clean_label {int(clean[p])} at {where(p)} is outside the "
                f"valid range 0..{num_classes - 1} (or -1 for unknown)"
            )
