"""The analysis outputs: ``analysis.csv``, ``analysis.md`` and ``analysis.png`` (atomic writes)."""

from __future__ import annotations

import csv
import io
import math
import os
import uuid
from pathlib import Path
from typing import Any

from distnoisy.analyze.pipeline import Analysis

#: CSV columns, in order (``method`` and ``bucket`` first).
CSV_COLUMNS = (
    "method",
    "bucket",
    "score_lo",
    "score_hi",
    "n_train",
    "n_corrupted",
    "noise_rate",
    "memorized",
    "stays_memorized",
    "first_memorized_epoch",
    "n_test",
    "test_acc",
    "confidence",
    "ref_test_acc",
    "excess_error",
)
# (column, title, percent?) of the markdown tables.
MD_COLUMNS = (
    ("test_acc", "clean test acc", True),
    ("excess_error", "excess error from noise", True),
    ("memorized", "memorized (of corrupted)", True),
    ("stays_memorized", "stays memorized", True),
    ("first_memorized_epoch", "first memorized epoch", False),
    ("confidence", "test confidence", True),
)


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fmt(value: Any, percent: bool) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{100 * value:.1f}" if percent else f"{value:.1f}"


def to_csv(result: Analysis) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for label in result.labels:
        for row in result.rows[label]:
            writer.writerow({"method": label, **{k: row.get(k, "") for k in CSV_COLUMNS[1:]}})
    return buf.getvalue()


def _bucket_title(result: Analysis, b: int) -> str:
    first = result.rows[result.labels[0]][b]
    n = len(result.rows[result.labels[0]])
    where = "rarest" if b == 0 else "most frequent" if b == n - 1 else ""
    name = f"Bucket {b}" + (f" ({where})" if where else "")
    score = "subpopulation size" if result.frequency == "subpopulation" else "k-NN density"
    lo, hi = first["score_lo"], first["score_hi"]
    rng = f"{score} {'< ' + format(hi, '.3g') if math.isinf(lo) else format(lo, '.3g')}"
    if not math.isinf(lo):
        rng += f" to {format(hi, '.3g')}" if not math.isinf(hi) else " and above"
    return (
        f"### {name}: {rng}; {first['n_train']} training samples, {first['n_test']} test "
        f"samples (noise rate {_fmt(first['noise_rate'], True)}%)"
    )


def to_markdown(result: Analysis) -> str:
    """One table per bucket: a row per run, the statistics in columns (percent)."""
    cols = [c for c in MD_COLUMNS if c[0] != "excess_error" or result.reference]
    lines = []
    for b in range(len(result.edges) + 1):
        lines += [_bucket_title(result, b), ""]
        lines.append("| method | " + " | ".join(t for _, t, _ in cols) + " |")
        lines.append("|---|" + "---|" * len(cols))
        for label in result.labels:
            row = result.rows[label][b]
            cells = [_fmt(row.get(k), pct) for k, _, pct in cols]
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(result: Analysis, path: Path) -> None:
    """Test accuracy, memorisation (and excess error) against the bucket, a line per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("test_acc", "clean test accuracy"), ("memorized", "memorized (of corrupted)")]
    if result.reference:
        panels.append(("excess_error", "excess test error from noise"))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6))
    buckets = list(range(len(result.edges) + 1))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for label in result.labels:
            values = [result.rows[label][b].get(key, math.nan) for b in buckets]
            if not all(isinstance(v, float) and math.isnan(v) for v in values):
                ax.plot(buckets, values, marker="o", label=label)
        ax.set_title(title)
        ax.set_xlabel("frequency bucket (0 = rarest)")
        ax.set_xticks(buckets)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    _atomic_write(path, buf.getvalue())


def write_outputs(result: Analysis, out_dir: Path, header: str = "") -> list[Path]:
    """Write the three files into ``out_dir`` (created); returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [out_dir / "analysis.csv", out_dir / "analysis.md", out_dir / "analysis.png"]
    _atomic_write(paths[0], to_csv(result).encode())
    _atomic_write(paths[1], (header + to_markdown(result)).encode())
    plot(result, paths[2])
    return paths
