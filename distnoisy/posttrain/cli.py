"""``python -m distnoisy.posttrain run=<dir | MLflow run id> [--config FILE] [key=value]``."""

from __future__ import annotations

from typing import Any

from distnoisy.driver.cli import Command, run_command
from distnoisy.driver.summary import tracked_where


def usage() -> str:
    from distnoisy.driver.config_help import key_lines, leaf_keys
    from distnoisy.posttrain.config import PostTrainConfig

    return (
        "usage: python -m distnoisy.posttrain run=<output_dir | MLflow run id> "
        "[--config FILE.yaml] [key=value ...]\n\n"
        "Post-train a finished run: refit its linear head on frozen features, remove the\n"
        "training samples with the largest influence on it a few at a time, refit, and stop\n"
        "when the accuracy on the noisy validation labels stops improving. Writes summary.json,\n"
        "rounds.csv/.md, removed.parquet, label_issues.parquet, weights.pt and posttrain.png\n"
        "into output_dir (default <run>/posttrain-<score>) and an MLflow child run of the run.\n\n"
        "Keys (key=default, then its meaning):\n"
        + "\n".join(key_lines(leaf_keys(PostTrainConfig())))
        + "\n"
    )


def _versus(gain: float | None) -> str:
    return "" if gain is None else f" ({100 * gain:+.1f} points over early stopping)"


def format_summary(s: dict[str, Any]) -> str:
    def pct(v: Any) -> str:
        return "n/a" if v is None else f"{100 * v:.1f}%"

    lines = [
        f"distnoisy posttrain: {s['score']} on {s['method']} run {s['source_run']} "
        f"({s.get('weights', 'final')} weights)",
        f"  clean test accuracy   {pct(s.get('test_acc_before'))} run final, "
        f"{pct(s.get('test_acc_at_best_val'))} run at its best val epoch, "
        f"{pct(s.get('test_acc_refit_only'))} refit only, {pct(s.get('test_acc'))} post-trained"
        + _versus(s.get("gain_over_early_stopping")),
        f"  removed               {s['removed']} samples ({pct(s['removed_fraction'])}) in "
        f"{max(s['best_round'], 0)} round(s)",
    ]
    if s.get("precision_removed") is not None:
        lines.append(
            f"  removed precision     {pct(s['precision_removed'])} (recall "
            f"{pct(s.get('recall_removed'))}); round-1 AUROC {s['auroc']:.4f}"
        )
    if s.get("test_acc_finetuned") is not None:
        lines.append(f"  fine-tuned            {pct(s['test_acc_finetuned'])}")
    lines.append(f"  outputs in {s['output_dir']}{tracked_where(s.get('mlflow_run_id'))}")
    return "\n".join(lines)


def _parse(args: list[str]) -> Any:
    from distnoisy.posttrain.config import load

    return load(args)


def _run(cfg: Any) -> str:
    from distnoisy.posttrain.run import posttrain

    return format_summary(posttrain(cfg))


def _interrupted(cfg: Any) -> str:
    return (
        "distnoisy: posttrain interrupted; post-training does not resume: run the command "
        "again to start over"
    )


COMMAND = Command(usage=usage, parse=_parse, run=_run, interrupted=_interrupted)


def main(argv: list[str] | None = None) -> int:
    """0 on success or ``--help``, 2 on bad input (one line), 130 when interrupted."""
    return run_command(COMMAND, argv)
