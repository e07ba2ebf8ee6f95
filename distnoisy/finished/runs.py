"""Finished runs as the input of the later phases (post-training, analysis).

A phase names a run the way a user sees it: its output directory, or its MLflow run id (the
id the summary line and the MLflow UI show). :func:`open_run` resolves either, checks that the
run finished and wrote the outputs the phase needs, and returns a :class:`FinishedRun` with
its resolved config, summary and readers for its per-sample tables. Every problem is one
:class:`~distnoisy.core.errors.ConfigError` line naming the run and the fix.

The per-sample tables are read column by column and, for large runs, batch by batch
(:meth:`FinishedRun.iter_table`), so a phase never needs the whole table in memory at once.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from distnoisy.config import Config, load_config
from distnoisy.core.errors import ConfigError

#: An MLflow run id: 32 lower-case hex digits.
MLFLOW_RUN_ID = re.compile(r"^[0-9a-f]{32}$")

#: The MLflow tag that records a run's output directory (set when the run starts).
OUTPUT_DIR_TAG = "distnoisy.output_dir"

#: What most phases read: the summary, the final weights and the per-sample statistics.
DEFAULT_REQUIRED = ("config.yaml", "summary.json", "weights.pt", "sample_stats.parquet")

#: Outputs a partitioned run writes as a directory of parts instead of one file.
PARTITIONED_OUTPUTS = ("sample_stats.parquet", "label_issues.parquet")


@dataclass(frozen=True)
class FinishedRun:
    """A finished training run's directory, resolved config and summary."""

    run_dir: Path
    config: Config
    summary: dict[str, Any]
    mlflow_run_id: str | None
    tracking_uri: str | None

    def path(self, name: str) -> Path:
        """A file of the run directory."""
        return self.run_dir / name

    def weights(self, best: bool = False) -> dict[str, dict[str, Any]]:
        """Every network's state dict (``{"model": ...}``, two networks for ELR+/LIMIT),
        loaded with ``weights_only=True``; ``best`` for the best-by-validation weights."""
        import torch

        name = "weights_best.pt" if best else "weights.pt"
        path = self.path(name)
        if not path.is_file():
            hint = " (it needs a validation set)" if best else ""
            raise ConfigError(f"run {self.run_dir} has no {name}{hint}")
        return torch.load(path, map_location="cpu", weights_only=True)

    def read_table(
        self, name: str = "sample_stats.parquet", columns: Sequence[str] | None = None
    ) -> dict[str, np.ndarray]:
        """Columns of a per-sample table as numpy arrays (vector columns as ``(N, k)``)."""
        parts = list(self.iter_table(name, columns))
        if not parts:
            return {}
        return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}

    def iter_table(
        self,
        name: str = "sample_stats.parquet",
        columns: Sequence[str] | None = None,
        batch_rows: int = 65536,
    ) -> Iterator[dict[str, np.ndarray]]:
        """The table in batches of at most ``batch_rows`` rows, in row order.

        A partitioned run (``store.backend``) wrote ``sample_stats/`` and ``label_issues/``
        (parts plus ``index.json``) instead of the single files; ``name`` reads either layout.
        """
        import pyarrow.parquet as pq

        from distnoisy.store.export import INDEX_FILE, iter_parts

        path = self.path(name)
        parts = self.path(name.removesuffix(".parquet"))
        if (parts / INDEX_FILE).is_file():
            first = sorted(parts.glob("part-*.parquet"))
            schema = pq.read_schema(first[0]).names if first else []
            batches = iter_parts(parts, list(columns) if columns else None, batch_rows)
        elif path.is_file():
            pf = pq.ParquetFile(path)
            schema = pf.schema_arrow.names
            batches = pf.iter_batches(batch_size=batch_rows, columns=list(columns or []) or None)
        else:
            raise ConfigError(f"run {self.run_dir} has no {name}; was it written by distnoisy?")
        missing = sorted(set(columns or ()) - set(schema))
        if missing:
            raise ConfigError(
                f"{path} has no column(s) {', '.join(missing)}; it was written by an older "
                "distnoisy: re-run the training to get them"
            )
        for batch in batches:
            yield {c: _column_to_numpy(batch.column(c)) for c in batch.schema.names}


def _column_to_numpy(col: Any) -> np.ndarray:
    """A pyarrow column as numpy: fixed-size lists become 2-D, nullable booleans become
    float (NaN for null)."""
    import pyarrow as pa

    if pa.types.is_fixed_size_list(col.type):
        width = col.type.list_size
        return col.flatten().to_numpy(zero_copy_only=False).reshape(len(col), width)
    if pa.types.is_boolean(col.type) and col.null_count:
        values = col.fill_null(False).to_numpy(zero_copy_only=False).astype(np.float64)
        values[col.is_null().to_numpy(zero_copy_only=False)] = np.nan
        return values
    return col.to_numpy(zero_copy_only=False)


def resolve_run_dir(ref: str, tracking_uri: str | None = None) -> tuple[Path, str | None]:
    """The output directory of run ``ref`` (a directory, or an MLflow run id), and the MLflow
    run id when ``ref`` was one.

    Raises
    ------
    ConfigError
        If ``ref`` is neither an existing directory nor a run id known to the tracking store.
    """
    path = Path(ref).expanduser()
    if path.is_dir():
        return path.resolve(), None
    if path.exists():
        raise ConfigError(f"run={ref} is a file; pass a run's output directory or MLflow run id")
    if not MLFLOW_RUN_ID.match(ref):
        raise ConfigError(
            f"run={ref}: no such directory, and not an MLflow run id (32 hex digits); pass a "
            "run's output directory (runs/...) or the run id its summary printed"
        )
    return _run_dir_from_mlflow(ref, tracking_uri), ref


def _run_dir_from_mlflow(run_id: str, tracking_uri: str | None) -> Path:
    from distnoisy import tracking

    uri = tracking_uri or tracking.default_tracking_uri()
    if uri.startswith("sqlite:///") and not Path(uri[len("sqlite:///") :]).is_file():
        # Opening a client would create an empty database at the path; say what is missing.
        raise ConfigError(
            f"run={run_id}: no MLflow store at {uri}; run from the directory that holds "
            "mlflow.db, or pass tracking.uri=..."
        )
    tags = tracking.run_tags(uri, run_id)
    if tags is None:
        raise ConfigError(
            f"run={run_id}: no such MLflow run at {uri}; check the id in the MLflow UI, or pass "
            "tracking.uri=..."
        )
    out = tags.get(OUTPUT_DIR_TAG)
    if not out:
        raise ConfigError(
            f"MLflow run {run_id} has no {OUTPUT_DIR_TAG} tag (not a distnoisy training run); "
            "pass its output directory instead"
        )
    if not Path(out).is_dir():
        raise ConfigError(
            f"MLflow run {run_id} wrote to {out}, which does not exist here; pass run=<a copy "
            "of that directory>"
        )
    return Path(out).resolve()


def _has_output(run_dir: Path, name: str) -> bool:
    if (run_dir / name).is_file():
        return True
    parts = run_dir / name.removesuffix(".parquet") / "index.json"
    return name in PARTITIONED_OUTPUTS and parts.is_file()


def open_run(
    ref: str,
    tracking_uri: str | None = None,
    require: Sequence[str] = DEFAULT_REQUIRED,
) -> FinishedRun:
    """Resolve run ``ref`` and check that it finished with the outputs ``require`` names.

    Parameters
    ----------
    ref
        An output directory or an MLflow run id.
    tracking_uri
        Where to look up an MLflow run id (default: ``./mlflow.db``, as training uses).
    require
        Files of the run directory the caller reads.

    Raises
    ------
    ConfigError
        One line naming what is missing and the fix.
    """
    run_dir, run_id = resolve_run_dir(ref, tracking_uri)
    missing = [name for name in require if not _has_output(run_dir, name)]
    if missing:
        started = (run_dir / "run.json").is_file()
        why = (
            "the run has not finished: resume it with `python -m distnoisy.train "
            f"output_dir={run_dir} resume=true`"
            if started
            else "it is not a distnoisy run directory"
        )
        raise ConfigError(f"run {run_dir} has no {', '.join(missing)}: {why}")
    config = load_config(["--config", str(run_dir / "config.yaml")])
    summary = json.loads((run_dir / "summary.json").read_text())
    info_path = run_dir / "run.json"
    info = json.loads(info_path.read_text()) if info_path.is_file() else {}
    return FinishedRun(
        run_dir=run_dir,
        config=config,
        summary=summary,
        mlflow_run_id=run_id or info.get("mlflow_run_id"),
        tracking_uri=info.get("tracking_uri") or tracking_uri,
    )
