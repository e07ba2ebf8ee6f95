"""The console summary: its headline test accuracy (selected on validation, never on test), its
last line."""

from __future__ import annotations

from distnoisy.driver.summary import format_summary

BASE = {
    "method": "ce",
    "dataset": "digits",
    "num_train": 1000,
    "noise_kind": "symmetric",
    "num_workers": 1,
    "epochs": 3,
    "test_acc": 0.90,
    "best_test_acc": 0.95,
    "best_epoch": 1,
}


def _headline(summary: dict) -> str:
    return next(line for line in format_summary(summary).splitlines() if "test accuracy" in line)


def test_headline_is_the_test_accuracy_at_the_best_validation_epoch():
    summary = {**BASE, "best_val_epoch": 2, "best_val_acc": 0.8, "test_acc_at_best_val": 0.91}
    line = _headline(summary)
    # The first number on the line is the reported one; the test-selected one comes labelled.
    assert line.split()[3] == "91.0%"
    assert "best val epoch 2" in line and "95.0% test-selected (epoch 1)" in line


def test_headline_without_a_validation_set_is_the_final_accuracy():
    line = _headline({**BASE, "best_val_epoch": None})
    assert line.split()[3] == "90.0%" and "95.0% test-selected" in line


def test_counts_of_one_are_singular():
    lines = format_summary({**BASE, "epochs": 1, "num_workers": 1}).splitlines()
    assert lines[0].endswith(", 1 worker)")
    assert lines[-1].startswith("  1 epoch in ")
    lines = format_summary({**BASE, "epochs": 2, "num_workers": 2}).splitlines()
    assert lines[0].endswith(", 2 workers)") and lines[-1].startswith("  2 epochs in ")


def test_the_last_line_names_the_mlflow_run_or_says_the_run_was_not_tracked():
    tracked = format_summary({**BASE, "output_dir": "/r", "mlflow_run_id": "abc123"})
    assert tracked.splitlines()[-1].endswith("outputs in /r; MLflow run abc123")
    untracked = format_summary({**BASE, "output_dir": "/r", "wall_s": 9.5, "mlflow_run_id": None})
    assert untracked.splitlines()[-1].endswith("outputs in /r; not tracked in MLflow")
    assert "None" not in untracked
