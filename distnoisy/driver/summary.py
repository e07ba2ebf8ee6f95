"""The summary a finished training run prints."""

from __future__ import annotations

from typing import Any


def _fmt(v: Any) -> str:
    return "n/a" if v is None else f"{v:.4f}"


def _pct(v: Any) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _count(n: int, noun: str) -> str:
    """``1 epoch``, ``2 epochs``: a count with its noun in the right number."""
    return f"{n} {noun}{'' if n == 1 else 's'}"


def tracked_where(run_id: str | None) -> str:
    """``; MLflow run ID`` for a summary's last line, or that the run was not tracked."""
    return f"; MLflow run {run_id}" if run_id else "; not tracked in MLflow"


def _test_headline(summary: dict[str, Any]) -> str:
    """The test-accuracy line: the validation-selected number where a validation set exists.

    The best test accuracy over epochs selects the epoch on the test set itself (an optimistic
    oracle), so it is never the headline; it is shown, labelled, after the final one.
    """
    final = _pct(summary.get("test_acc"))
    best = _pct(summary.get("best_test_acc"))
    oracle = f"{best} test-selected (epoch {summary.get('best_epoch')})"
    if summary.get("best_val_epoch") is not None:
        return (
            f"  clean test accuracy   {_pct(summary.get('test_acc_at_best_val'))} at the best "
            f"val epoch {summary['best_val_epoch']}; {final} final, {oracle}"
        )
    return f"  clean test accuracy   {final} final; {oracle}"


def format_summary(summary: dict[str, Any]) -> str:
    pct = _pct

    lines = [
        f"distnoisy: {summary['method']} on {summary['dataset']} "
        f"({summary['num_train']} train samples, noise {summary['noise_kind']}, "
        f"realised rate {pct(summary.get('noise_rate_realised'))}, "
        f"{_count(summary['num_workers'], 'worker')})",
        _test_headline(summary),
        # Not the epoch lines' "memorized (training preds)": those are the augmented training
        # passes' predictions; this is the final weights on the un-augmented training set.
        f"  memorized noisy labels {pct(summary.get('memorized'))} of corrupted training samples "
        "(final weights)",
        f"  label-issue AUROC     {_fmt(summary.get('label_issue_auroc'))}"
        + (
            f"  (precision@k {pct(summary.get('label_issue_precision_at_k'))})"
            if summary.get("label_issue_precision_at_k") is not None
            else ""
        ),
        f"  label issues          {summary.get('num_label_issues', 'n/a')} flagged; estimated "
        f"noise rate {pct(summary.get('noise_rate_estimated'))} (realised "
        f"{pct(summary.get('noise_rate_realised'))})",
        f"  {_count(summary['epochs'], 'epoch')} in {summary.get('wall_s')} s; outputs in "
        f"{summary.get('output_dir')}{tracked_where(summary.get('mlflow_run_id'))}",
    ]
    known, n = summary.get("num_clean_known"), summary["num_train"]
    if known is not None and known < n:
        lines.insert(
            1,
            f"  noise rate, memorized and AUROC measured on the {known} of {n} training samples "
            "with a known clean label",
        )
    if summary.get("best_val_epoch") is not None:
        lines.insert(
            -1,
            f"  clean val accuracy    {pct(summary.get('best_val_acc'))} best (epoch "
            f"{summary['best_val_epoch']}, weights in weights_best.pt)",
        )
    if summary.get("bad_samples"):
        named = summary.get("bad_sample_list") or []
        first = ", ".join(f"{b['set']}:{b['key']}" for b in named[:3])
        lines.insert(
            -1,
            f"  skipped {summary['bad_samples']} corrupt or unreadable samples"
            + (f" ({first}{', ...' if len(named) > 3 else ''}; see summary.json)" if first else ""),
        )
    return "\n".join(lines)
