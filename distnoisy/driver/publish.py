"""After the launcher returns: the run's outputs copied out of its final checkpoint, the
summary completed, the review files written and everything logged to MLflow."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from distnoisy.engine.checkpoint import OUTPUTS_DIR

if TYPE_CHECKING:
    from distnoisy.data.prepare import DataSpec


OUTPUT_FILES = ("summary.json", "label_issues_top.parquet", "weights.pt")


#: Written only by some runs: the best-by-validation weights need a validation set; the tables
#: are single files with a replicated store, partitioned datasets (directories) with a
#: partitioned one (README "What a run writes").
OPTIONAL_OUTPUT_FILES = (
    "weights_best.pt",
    "label_issues.parquet",
    "sample_stats.parquet",
    "label_issues",
    "sample_stats",
)


def publish(final_ckpt: Path, run_dir: Path) -> None:
    """Copy the finished run's outputs from its final checkpoint into the run dir, atomically."""
    src = final_ckpt / OUTPUTS_DIR
    optional = [n for n in OPTIONAL_OUTPUT_FILES if (src / n).exists()]
    for name in (*OUTPUT_FILES, *optional):
        tmp = run_dir / f".{name}.tmp"
        if (src / name).is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
            shutil.copytree(src / name, tmp)
            shutil.rmtree(run_dir / name, ignore_errors=True)
        else:
            shutil.copyfile(src / name, tmp)
        os.replace(tmp, run_dir / name)


def segments_of(run_dir: Path) -> list[float]:
    """Wall seconds of the run's earlier segments (interrupted, then resumed), from run.json."""
    info = run_dir / "run.json"
    if not info.exists():
        return []
    return [float(x) for x in json.loads(info.read_text()).get("segments_s", [])]


def save_segments(run_dir: Path, segments: list[float]) -> None:
    info_path = run_dir / "run.json"
    if not info_path.exists():
        return
    info = json.loads(info_path.read_text())
    info["segments_s"] = [round(x, 2) for x in segments]
    tmp = info_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    os.replace(tmp, info_path)


def final_summary(run_dir: Path, segments: list[float], run_id: str | None) -> dict[str, Any]:
    """The published ``summary.json`` with wall time (every segment of a resumed run), MLflow
    run id and output dir added."""
    summary = json.loads((run_dir / "summary.json").read_text())
    summary.update(
        wall_s=round(sum(segments), 2),
        wall_s_segments=[round(x, 2) for x in segments],
        mlflow_run_id=run_id,
        output_dir=str(run_dir),
    )
    tmp = run_dir / ".summary.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2))
    os.replace(tmp, run_dir / "summary.json")
    return summary


def write_review(run_dir: Path, summary: dict[str, Any], spec: DataSpec) -> None:
    """Training curves and the top label issues with thumbnails (:mod:`distnoisy.driver.review`)."""
    from distnoisy.driver.review import write_report

    write_report(run_dir, summary.get("history") or [], str(spec.train_dir), spec.classes)


#: Summary figures logged to MLflow as ``final_<name>`` (the per-epoch ones have no prefix).
FINAL_METRICS = (
    "test_acc",
    "best_test_acc",
    "val_acc",
    "best_val_acc",
    "test_acc_at_best_val",
    "memorized",
    "clean_train_acc",
    "train_acc_given",
    "label_issue_auroc",
    "label_issue_precision_at_k",
    "noise_rate_realised",
    "num_train_seen",
    "bad_samples",
    "wall_s",
)


#: Run-directory files logged as MLflow artifacts (those that exist). The label-issue table is
#: one file with a replicated store and a directory of parts with a partitioned one (logged as
#: an artifact directory of the same name); the merged top rows are one file with either.
ARTIFACT_FILES = (
    "config.yaml",
    "summary.json",
    "label_issues.parquet",
    "label_issues",
    "label_issues_top.parquet",
    "noise_transition.json",
    "method_resources.json",
    "weights.pt",
    "weights_best.pt",
)


def log_final(uri: str, run_id: str, run_dir: Path, summary: dict[str, Any]) -> None:
    """Log the summary figures, the report and the run's output files to its MLflow run."""
    from distnoisy import tracking
    from distnoisy.driver import review

    final = {k: summary[k] for k in FINAL_METRICS if summary.get(k) is not None}
    tracking.RunLogger(uri, run_id, 0).log_metrics(
        {f"final_{k}": v for k, v in final.items()}, step=summary["epochs"]
    )
    report = (review.CURVES_FILE, review.ISSUES_HTML_FILE, review.ISSUES_MD_FILE)
    tracking.log_artifacts(uri, run_id, [run_dir / n for n in (*ARTIFACT_FILES, *report)])
