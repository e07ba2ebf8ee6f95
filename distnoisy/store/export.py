"""The partitioned Parquet export of per-sample tables, and its readers.

A partitioned dataset is a directory of ``part-00000.parquet``, ``part-00001.parquet``, ... and
an ``index.json`` (:data:`INDEX_FILE`) listing each part's file, row count and first global
sample index, and the columns with their Arrow types. Each part is written by the rank that owns
its rows, atomically and in parallel with the others; the index is written last (by rank 0),
so a dataset with an index is complete. Readers go part by part and batch by batch
(:func:`iter_sample_stats`, :func:`iter_parts`): no step holds a whole table.

Label issues: each part is ranked on its own (:func:`rank_part`, by decreasing score, NaN last,
ties by sample index: the order of :func:`distnoisy.issues.ranking.rank_by_score`), and
:func:`merge_top_k` merges the parts' heads into the ``k`` most likely issues overall, keeping
at most ``2k`` rows in memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

INDEX_FILE = "index.json"
#: The per-sample stats of a run: a partitioned dataset, or the single file of older runs.
SAMPLE_STATS_DIR = "sample_stats"
SAMPLE_STATS_FILE = "sample_stats.parquet"
#: The ranked label issues of a partitioned run, and the merged top-k of any run.
LABEL_ISSUES_DIR = "label_issues"
LABEL_ISSUES_TOP = "label_issues_top.parquet"
#: Rows of ``label_issues_top.parquet`` unless told otherwise.
TOP_K = 10_000


def part_name(part: int) -> str:
    return f"part-{part:05d}.parquet"


def atomic_write_table(table: pa.Table, path: Path) -> None:
    """Write a Parquet file under a hidden temporary name, then rename: it appears whole."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    pq.write_table(table, tmp)
    os.replace(tmp, path)


def field_columns(fields: dict[str, Any]) -> dict[str, pa.Array]:
    """Arrow columns of store fields (tensors or arrays, ``[n]`` or ``[n, ...]``): vector
    fields become fixed-size lists, float16/bfloat16 become float32."""
    columns: dict[str, pa.Array] = {}
    for name, t in fields.items():
        if isinstance(t, torch.Tensor):
            half = t.dtype in (torch.float16, torch.bfloat16)
            t = t.float().numpy() if half else t.numpy()
        arr = np.asarray(t)
        if arr.dtype == np.float16:
            arr = arr.astype(np.float32)
        if arr.ndim == 1:
            columns[name] = pa.array(arr)
        else:
            flat = arr.reshape(len(arr), -1)
            columns[name] = pa.FixedSizeListArray.from_arrays(
                pa.array(flat.reshape(-1)), flat.shape[1]
            )
    return columns


def write_part(directory: Path, part: int, table: pa.Table, first_index: int) -> dict[str, Any]:
    """Write one part atomically; returns its entry for :func:`write_index`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    atomic_write_table(table, directory / part_name(part))
    return {"file": part_name(part), "rows": table.num_rows, "first_index": int(first_index)}


def write_index(directory: Path, parts: list[dict[str, Any]], schema: pa.Schema) -> None:
    """Write ``index.json`` (after every part): parts in order, total rows, column types."""
    directory = Path(directory)
    index = {
        "format": 1,
        "num_rows": int(sum(p["rows"] for p in parts)),
        "parts": sorted(parts, key=lambda p: p["file"]),
        "columns": {f.name: str(f.type) for f in schema},
    }
    tmp = directory / f".{INDEX_FILE}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, directory / INDEX_FILE)


def read_index(directory: Path) -> dict[str, Any]:
    """The ``index.json`` of a partitioned dataset (FileNotFoundError if incomplete)."""
    return json.loads((Path(directory) / INDEX_FILE).read_text())


def iter_parts(
    directory: Path, columns: list[str] | None = None, batch_rows: int = 65_536
) -> Iterator[pa.RecordBatch]:
    """Record batches of a partitioned dataset, part by part, in the index's order."""
    for entry in read_index(directory)["parts"]:
        with pq.ParquetFile(Path(directory) / entry["file"]) as f:
            yield from f.iter_batches(batch_size=batch_rows, columns=columns)


def iter_sample_stats(
    run_dir: Path, columns: list[str] | None = None, batch_rows: int = 65_536
) -> Iterator[pa.RecordBatch]:
    """The per-sample stats of a finished run, batch by batch, in sample-index order.

    Reads the partitioned ``sample_stats/`` export, or the single ``sample_stats.parquet`` of
    runs that wrote one (small, replicated runs and older versions).

    Parameters
    ----------
    run_dir
        The run's output directory.
    columns
        Columns to read (default: all), e.g. ``["index", "loss_hist", "pred_hist"]``.
    batch_rows
        Most rows per batch.
    """
    run_dir = Path(run_dir)
    if (run_dir / SAMPLE_STATS_DIR / INDEX_FILE).exists():
        yield from iter_parts(run_dir / SAMPLE_STATS_DIR, columns, batch_rows)
        return
    single = run_dir / SAMPLE_STATS_FILE
    if not single.exists():
        raise FileNotFoundError(
            f"{run_dir} has no per-sample stats ({SAMPLE_STATS_DIR}/{INDEX_FILE} or "
            f"{SAMPLE_STATS_FILE}): is it the output directory of a finished run?"
        )
    with pq.ParquetFile(single) as f:
        yield from f.iter_batches(batch_size=batch_rows, columns=columns)


# -- label issues ---------------------------------------------------------------------------
def order_issues(table: pa.Table) -> pa.Table:
    """Rows by decreasing score, NaN last, ties by increasing sample index; rows with
    ``trained`` false (never trained on) after all others, as in ``rank_by_score``."""
    score = table.column("score").to_numpy(zero_copy_only=False).astype(np.float64)
    index = table.column("index").to_numpy(zero_copy_only=False)
    untrained = np.zeros(len(score), bool)
    if "trained" in table.column_names:
        untrained = ~table.column("trained").to_numpy(zero_copy_only=False).astype(bool)
    # lexsort: last key first; NaN compares largest, so -score puts NaN last.
    return table.take(pa.array(np.lexsort((index, -score, untrained))))


def rank_part(table: pa.Table) -> pa.Table:
    """One part of the label-issue ranking: its rows in review order (needs ``index`` and
    ``score`` columns)."""
    return order_issues(table)


def merge_top_k(directory: Path, k: int = TOP_K) -> pa.Table:
    """The ``k`` most likely label issues of a ranked partitioned dataset.

    Each part is ranked, so only its first ``k`` rows can make the top ``k``; the parts' heads
    are merged one at a time into a running top ``k`` (at most ``2k`` rows in memory).
    """
    top: pa.Table | None = None
    for entry in read_index(directory)["parts"]:
        with pq.ParquetFile(Path(directory) / entry["file"]) as f:
            head = next(f.iter_batches(batch_size=max(k, 1)), None)
        if head is None:
            continue
        head_t = pa.Table.from_batches([head])
        top = head_t if top is None else pa.concat_tables([top, head_t.cast(top.schema)])
        top = order_issues(top).slice(0, k)
    if top is None:
        raise ValueError(f"{directory} holds no rows")
    return top


def write_top_k(directory: Path, path: Path, k: int = TOP_K) -> int:
    """Write :func:`merge_top_k` of ``directory`` to ``path`` atomically; its row count."""
    top = merge_top_k(directory, k)
    atomic_write_table(top, Path(path))
    return top.num_rows
