"""What post-training writes into its output directory (every file atomically).

``summary.json``, ``rounds.csv``/``rounds.md``, ``removed.parquet``, ``label_issues.parquet``
(ranked: removed samples first in removal order, then the kept ones by their last score),
``weights.pt`` (the run's networks with the refined head) and ``posttrain.png``.
"""

from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from distnoisy.posttrain.rounds import RoundsResult

ROUND_COLUMNS = (
    "round",
    "removed",
    "removed_fraction",
    "val_acc_noisy",
    "val_acc",
    "val_nll_noisy",
    "val_nll",
    "test_acc",
    "train_acc_kept",
    "precision_removed",
    "recall_removed",
    "wall_s",
)


def _replace(tmp: Path, path: Path) -> None:
    os.replace(tmp, path)


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    _replace(tmp, path)


def write_json(path: Path, data: dict[str, Any]) -> None:
    write_text(path, json.dumps(data, indent=2))


def write_array(path: Path, array: np.ndarray) -> None:
    """An ``.npy`` file, written atomically."""
    tmp = path.with_name(f".{path.name}.tmp.npy")
    np.save(tmp, array)
    _replace(tmp, path)


def write_parquet(path: Path, columns: dict[str, Any]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    tmp = path.with_name(f".{path.name}.tmp")
    pq.write_table(pa.table(columns), tmp)
    _replace(tmp, path)


def rounds_csv(rounds: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=ROUND_COLUMNS, extrasaction="ignore")
    writer.writeheader()
    for row in rounds:
        writer.writerow({k: "" if row.get(k) is None else row[k] for k in ROUND_COLUMNS})
    return buf.getvalue()


def _cell(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and not float(v).is_integer():
        return f"{v:.4f}"
    return str(int(v)) if isinstance(v, float) else str(v)


def rounds_markdown(rounds: list[dict[str, Any]], best: int) -> str:
    cols = [c for c in ROUND_COLUMNS if any(r.get(c) is not None for r in rounds)]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in rounds:
        mark = " (kept)" if row["round"] == best else ""
        cells = [_cell(row.get(c)) + (mark if c == "round" else "") for c in cols]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def comparison_markdown(summary: dict[str, Any]) -> str:
    """The line under the rounds table that compares post-training with the run itself: its
    final accuracy and its own early stopping (the test accuracy at its best validation
    epoch)."""
    gain = summary.get("gain_over_early_stopping")
    versus = "" if gain is None else f" ({100 * gain:+.1f} points over the run's early stopping)"
    epoch = summary.get("best_val_epoch")
    return (
        f"\nClean test accuracy: the run {_pct(summary.get('test_acc_before'))} final, "
        f"{_pct(summary.get('test_acc_at_best_val'))} at its best validation epoch"
        f"{'' if epoch is None else f' ({epoch})'}; post-trained from its "
        f"{summary.get('weights', 'final')} weights {_pct(summary.get('test_acc'))}{versus}.\n"
    )


def rounds_page(rounds: list[dict[str, Any]], best: int, summary: dict[str, Any]) -> str:
    """``rounds.md``: the rounds table, the comparison with the run and, after a fine-tune,
    its line."""
    page = rounds_markdown(rounds, best) + comparison_markdown(summary)
    if summary.get("finetune"):
        page += finetune_markdown(summary["finetune"])
    return page


def finetune_markdown(ft: dict[str, Any]) -> str:
    """The fine-tune's line under the rounds table."""
    epoch = ft.get("selected_epoch")
    chosen = (
        "no epoch beat the post-trained head on the validation set: the head is kept"
        if epoch == 0
        else f"epoch {epoch} selected on {ft.get('selected_on')}"
    )
    return (
        f"\nFine-tuned the whole network for {ft['epochs']} epochs on the {ft['kept']} kept "
        f"samples ({ft['output_dir']}): {chosen}, test_acc {_cell(ft.get('test_acc'))} "
        f"(last epoch {_cell(ft.get('test_acc_last'))}).\n"
    )


def removed_table(
    res: RoundsResult,
    keys: list[str],
    given: np.ndarray,
    suggested: np.ndarray,
    corrupted: np.ndarray | None,
) -> dict[str, Any]:
    """Columns of ``removed.parquet`` in removal order."""
    idx = res.order
    cols: dict[str, Any] = {
        "index": idx,
        "key": [keys[i] for i in idx],
        "round": res.removed_round[idx],
        "score": res.score[idx],
        "given_label": given[idx],
        "suggested_label": suggested[idx],
    }
    if corrupted is not None:
        cols["is_corrupted"] = corrupted[idx]
    return cols


def label_issue_table(
    res: RoundsResult,
    keys: list[str],
    given: np.ndarray,
    suggested: np.ndarray,
    corrupted: np.ndarray | None,
) -> dict[str, Any]:
    """Every training sample, ranked: removed first (removal order), then kept by score."""
    kept = np.flatnonzero(res.removed_round < 0)
    kept = kept[np.argsort(-res.score[kept], kind="stable")]
    idx = np.concatenate([res.order, kept]).astype(np.int64)
    cols: dict[str, Any] = {
        "index": idx,
        "key": [keys[i] for i in idx],
        "given_label": given[idx],
        "suggested_label": suggested[idx],
        "score": res.score[idx],
        "is_label_issue": res.removed_round[idx] >= 1,
        "removed_round": res.removed_round[idx],
    }
    if corrupted is not None:
        cols["is_corrupted"] = corrupted[idx]
    return cols


def refined_weights(
    weights: dict[str, dict[str, Any]], networks: tuple[str, ...], theta: np.ndarray
) -> dict[str, dict[str, Any]]:
    """The run's weights with the refined head ``theta = [W b]`` written back.

    With ``k`` predicting networks whose features were concatenated (ELR+), network ``j`` gets
    ``k * W_j`` and bias ``b``, so the mean of their logits is ``W [h_1; ...; h_k] + b``.
    """
    import torch

    out = {name: dict(state) for name, state in weights.items()}
    k = len(networks)
    w, b = theta[:, :-1], theta[:, -1]
    d = w.shape[1] // k
    for j, name in enumerate(networks):
        ref = out[name]["classifier.weight"]
        out[name]["classifier.weight"] = torch.tensor(
            k * w[:, j * d : (j + 1) * d], dtype=ref.dtype
        )
        out[name]["classifier.bias"] = torch.tensor(b, dtype=out[name]["classifier.bias"].dtype)
    return out


def save_weights(path: Path, state: dict[str, Any]) -> None:
    import torch

    tmp = path.with_name(f".{path.name}.tmp")
    torch.save(state, tmp)
    _replace(tmp, path)


def plot(path: Path, rounds: list[dict[str, Any]], best: int) -> None:
    """Accuracies and the removed samples' precision against the removed fraction."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = [r["removed_fraction"] for r in rounds]
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (
        ("test_acc", "clean test accuracy"),
        ("val_acc", "validation accuracy"),
        ("val_acc_noisy", "validation accuracy (noisy labels)"),
        ("precision_removed", "precision of removed samples"),
    ):
        ys = [r.get(key) for r in rounds]
        if any(v is not None for v in ys):
            ax.plot(x, [np.nan if v is None else v for v in ys], marker="o", label=label)
    kept = rounds[best]["removed_fraction"] if best >= 0 else 0.0
    ax.axvline(kept, color="grey", ls="--", lw=1, label="kept round")
    ax.set_xlabel("removed fraction of the training set")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    _replace(tmp, path)
