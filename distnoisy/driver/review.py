"""Files a person looks at after a run: training curves and the top label issues.

Written by the driver into the run directory and logged to the MLflow run, where the UI shows
them: ``training_curves.png`` (accuracies, memorized and loss per epoch),
``label_issues_top.html`` (the first rows of the review list with a thumbnail of each image,
embedded as base64 PNG, so the file stands alone) and ``label_issues_top.md`` (the same rows as
a Markdown table, without images).
"""

from __future__ import annotations

import base64
import html
import io
import json
import logging
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Rows of the review list in the previewable tables.
TOP_ISSUES = 50
#: Longest side of a thumbnail, in pixels (small images are enlarged, pixels kept sharp).
THUMB_PX = 64
CURVES_FILE = "training_curves.png"
ISSUES_HTML_FILE = "label_issues_top.html"
ISSUES_MD_FILE = "label_issues_top.md"
#: The merged most-likely issues every run writes (distnoisy.store.export.LABEL_ISSUES_TOP).
LABEL_ISSUES_TOP = "label_issues_top.parquet"

# Per-epoch history keys on the accuracy panel, with their legend labels.
_ACCURACY_CURVES = (
    ("train_acc_given", "train acc (given labels)"),
    ("val_acc", "clean val acc"),
    ("test_acc", "clean test acc"),
    ("memorized", "memorized (training predictions)"),
)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def curves_png(history: Sequence[dict[str, Any]]) -> bytes:
    """PNG of the per-epoch accuracies, ``memorized`` and the training loss (epochs from 1)."""
    import matplotlib

    matplotlib.use("Agg")  # no display; a driver may run headless
    import matplotlib.pyplot as plt

    epochs = np.arange(1, len(history) + 1)
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for key, label in _ACCURACY_CURVES:
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            acc_ax.plot(epochs, [np.nan if v is None else v for v in values], label=label)
    acc_ax.set(xlabel="epoch", ylabel="fraction", ylim=(0, 1.02), title="accuracy")
    acc_ax.legend(fontsize=8)
    loss_ax.plot(epochs, [h.get("train_loss", np.nan) for h in history], color="black")
    loss_ax.set(xlabel="epoch", ylabel="loss", title="training loss (method's objective)")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    return buf.getvalue()


def read_images(train_dir: str | os.PathLike[str], indices: Iterable[int]) -> dict[int, bytes]:
    """The stored image bytes of training samples ``indices``, read from their shards.

    Only the shards that hold the wanted indices are read; a sample that cannot be read
    (damaged data) is left out.
    """
    from distnoisy.data.shards import read_manifest
    from distnoisy.data.stream import _read_raw

    manifest = read_manifest(train_dir)
    wanted = {int(i) for i in indices}
    found: dict[int, bytes] = {}
    for url, shard in zip(manifest.urls, manifest.shards, strict=True):
        if not any(shard.first_index <= i < shard.first_index + shard.count for i in wanted):
            continue
        sink: list[tuple[str, str]] = []
        for index, data, _, _ in _read_raw(
            [(url, shard.count)], manifest.image_ext, manifest.num_samples, sink
        ):
            if index in wanted:
                try:
                    found[index] = data if isinstance(data, bytes) else data.read()
                except OSError:
                    continue
    return found


def thumbnail_png(data: bytes) -> bytes | None:
    """A PNG thumbnail (longest side :data:`THUMB_PX`) of image bytes; None if undecodable."""
    from PIL import Image

    from distnoisy.data.stream import decode_image_bytes

    try:
        img = decode_image_bytes(data, None)
    except ValueError:
        return None
    arr = img.permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr)
    scale = THUMB_PX / max(pil.size)
    size = (max(1, round(pil.size[0] * scale)), max(1, round(pil.size[1] * scale)))
    pil = pil.resize(size, Image.NEAREST if scale > 1 else Image.BILINEAR)
    buf = io.BytesIO()
    pil.save(buf, format="PNG")
    return buf.getvalue()


def _class_name(classes: Sequence[str], label: int) -> str:
    if label < 0:
        return "-"
    return f"{label} {classes[label]}" if label < len(classes) else str(label)


def _suggestion(classes: Sequence[str], label: int, confidence: float | None) -> str:
    """The suggested label as a reviewer reads it: with its confidence, or saying that the
    evidence names no other class (the label is then only the final model's runner-up)."""
    name = _class_name(classes, label)
    if label < 0 or confidence is None or confidence != confidence:
        return name
    if confidence <= 0:
        return f"{name} (no confident alternative)"
    return f"{name} ({100 * confidence:.0f}%)"


def _rows(issues: Any, classes: Sequence[str]) -> list[dict[str, str]]:
    """Display strings of the table's rows (a pandas frame of ``label_issues.parquet``)."""
    rows = []
    for rank, r in enumerate(issues.itertuples(index=False), start=1):
        corrupted = getattr(r, "is_corrupted", None)
        confidence = getattr(r, "suggestion_confidence", None)
        rows.append(
            {
                "rank": str(rank),
                "index": str(r.index),
                "key": str(r.key),
                "given": _class_name(classes, int(r.given_label)),
                "suggested (confidence)": _suggestion(classes, int(r.suggested_label), confidence),
                "score": f"{r.score:.4f}",
                "flagged": "yes" if r.is_label_issue else "no",
                "trained": "yes" if getattr(r, "trained", True) else "no",
                "corrupted": "?"
                if corrupted is None or corrupted != corrupted
                else ("yes" if corrupted else "no"),
            }
        )
    return rows


def issues_markdown(rows: list[dict[str, str]], title: str, note: str = "") -> str:
    """The rows as a Markdown table under a heading (and a line of ``note``)."""
    cols = list(rows[0]) if rows else ["rank"]
    lines = [f"# {title}", ""]
    if note:
        lines += [note, ""]
    lines += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rows:
        cells = [row[c].replace("|", "\\|") for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def issues_html(
    rows: list[dict[str, str]], thumbs: dict[int, bytes], title: str, note: str = ""
) -> str:
    """The rows as a standalone HTML page, each with its image's thumbnail (and a line of
    ``note`` under the heading)."""
    cols = list(rows[0]) if rows else ["rank"]
    head = "".join(f"<th>{html.escape(c)}</th>" for c in ["image", *cols])
    body = []
    for row in rows:
        png = thumbs.get(int(row["index"]))
        img = (
            f'<img alt="sample {row["index"]}" src="data:image/png;base64,'
            f'{base64.b64encode(png).decode("ascii")}">'
            if png
            else "unreadable"
        )
        cells = "".join(f"<td>{html.escape(row[c])}</td>" for c in cols)
        body.append(f"<tr><td>{img}</td>{cells}</tr>")
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        "<style>table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}"
        "img{image-rendering:pixelated}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>"
        + (f"<p>{html.escape(note)}</p>" if note else "")
        + f"<table><thead><tr>{head}</tr></thead><tbody>"
        + "".join(body)
        + "</tbody></table></body></html>\n"
    )


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def count_note(summary: dict[str, Any]) -> str:
    """One line on the flag count: how many rows are flagged and the estimated noise rate it
    comes from, beside the realised rate where it is known (docs/methods.md#flags)."""
    if summary.get("num_label_issues") is None:
        return ""
    note = (
        f"{summary['num_label_issues']} samples flagged (is_label_issue): the estimated noise "
        f"rate {_pct(summary.get('noise_rate_estimated'))}"
    )
    if summary.get("noise_rate_realised") is not None:
        note += f" (realised {_pct(summary['noise_rate_realised'])})"
    note += (
        f" from a confident joint on the {summary.get('label_issue_count_source')}. "
        f"Suggested label: the most likely class other than the given one by the "
        f"{summary.get('suggested_label_source')} (in brackets: the evidence's share for it)."
    )
    return note


def write_report(
    run_dir: Path,
    history: Sequence[dict[str, Any]],
    train_dir: str,
    classes: Sequence[str],
    summary: dict[str, Any] | None = None,
) -> list[Path]:
    """Write the curves and the top-issue tables into ``run_dir``; returns their paths.
    ``summary``: the run's summary, for the line on the flag count (default: read from
    ``run_dir/summary.json`` where it exists)."""
    import pyarrow.parquet as pq

    run_dir = Path(run_dir)
    written = []
    if history:
        _write_atomic(run_dir / CURVES_FILE, curves_png(history))
        written.append(run_dir / CURVES_FILE)
    # The merged top-k file exists for both store layouts (a partitioned run has no single
    # label_issues.parquet).
    issues = pq.read_table(run_dir / LABEL_ISSUES_TOP).slice(0, TOP_ISSUES).to_pandas()
    rows = _rows(issues, classes)
    title = f"Top {len(rows)} label issues of {run_dir.name} (most likely wrong first)"
    if summary is None and (run_dir / "summary.json").is_file():
        summary = json.loads((run_dir / "summary.json").read_text())
    note = count_note(summary or {})
    try:
        images = read_images(train_dir, [int(i) for i in issues["index"]])
    except Exception as exc:  # the tables are still worth having without the thumbnails
        log.warning("label-issue thumbnails left out: could not read %s: %s", train_dir, exc)
        images = {}
    thumbs = {i: png for i, data in images.items() if (png := thumbnail_png(data)) is not None}
    _write_atomic(run_dir / ISSUES_HTML_FILE, issues_html(rows, thumbs, title, note).encode())
    _write_atomic(run_dir / ISSUES_MD_FILE, issues_markdown(rows, title, note).encode())
    return [*written, run_dir / ISSUES_HTML_FILE, run_dir / ISSUES_MD_FILE]
