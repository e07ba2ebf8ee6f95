"""``python -m distnoisy.posttrain`` end to end on a real digits run, and its bad-input lines."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from distnoisy.finished.features import extract_features
from distnoisy.finished.runs import open_run
from distnoisy.posttrain.cli import main


@pytest.fixture(scope="module")
def source(ce_run):
    """The session's short real CE run with a noisy validation split, tracked in SQLite (see
    tests/conftest.py): ``(run_dir, tracking uri, summary)``. Post-training adds feature cache
    entries to it and child MLflow runs, nothing else."""
    return ce_run.run_dir, ce_run.uri, ce_run.summary


@pytest.mark.slow
def test_posttrain_end_to_end(source, tmp_path, capsys):
    run_dir, uri, train_summary = source
    out = tmp_path / "pt"
    args = [
        f"run={train_summary['mlflow_run_id']}",
        f"tracking.uri={uri}",
        f"output_dir={out}",
        "posttrain.fraction_per_round=0.1",
        "posttrain.max_removed=0.2",
        "posttrain.patience=5",
    ]
    assert main(args) == 0
    console = capsys.readouterr().out
    s = json.loads((out / "summary.json").read_text())
    for name in ("rounds.csv", "rounds.md", "posttrain.png", "config.yaml", "weights.pt"):
        assert (out / name).is_file(), name
    # weights=auto: the run kept its best-by-validation weights, so the features are theirs and
    # the run's head on them gives its own early-stopping figure, stated beside the result.
    assert s["weights"] == "best" and s["weights_requested"] == "auto"
    assert s["test_acc_at_best_val"] == train_summary["test_acc_at_best_val"]
    assert s["test_acc_before"] == train_summary["test_acc"]
    assert s["test_acc_at_best_val"] == pytest.approx(s["test_acc_before_features"], abs=1e-6)
    gain = s["test_acc"] - s["test_acc_at_best_val"]
    assert s["gain_over_early_stopping"] == pytest.approx(gain)
    assert s["selected_on"] == "val_acc"
    assert f"{100 * s['test_acc_at_best_val']:.1f}% run at its best val epoch" in console
    assert f"({100 * gain:+.1f} points over early stopping)" in console
    rounds_md = (out / "rounds.md").read_text()
    assert f"{100 * s['test_acc_at_best_val']:.1f}% at its best validation epoch" in rounds_md
    assert f"({100 * gain:+.1f} points over the run's early stopping)" in rounds_md
    assert [r["round"] for r in s["rounds"]] == [0, 1, 2]
    n = train_summary["num_train"]
    assert s["rounds"][1]["removed"] == int(np.ceil(0.1 * n))

    removed = pq.read_table(out / "removed.parquet").to_pandas()
    assert list(removed.columns) == [
        "index",
        "key",
        "round",
        "score",
        "given_label",
        "suggested_label",
        "is_corrupted",
    ]
    # The table holds the removals of the rounds the stopping rule kept: none when it kept round
    # 0 (the refit on the best-by-validation weights was not beaten), at least round 1's else.
    assert len(removed) == s["removed"]
    assert (s["removed"] > 0) == (s["best_round"] >= 1)
    assert s["removed"] == 0 or s["removed"] >= s["rounds"][1]["removed"]
    assert (removed["round"] >= 1).all()
    # The precision of the removals against the truth, as the summary says.
    if len(removed):
        assert removed["is_corrupted"].mean() == pytest.approx(s["precision_removed"])
    else:  # nothing removed: no precision to state
        assert s["precision_removed"] is None or np.isnan(s["precision_removed"])
    issues = pq.read_table(out / "label_issues.parquet").to_pandas()
    assert sorted(issues["index"]) == list(range(n))
    assert set(issues.loc[issues.is_label_issue, "index"]) == set(removed["index"])
    assert issues["is_label_issue"].iloc[: len(removed)].all()  # ranked first

    # The refined weights load with weights_only and give the suggested labels.
    state = torch.load(out / "weights.pt", weights_only=True)
    feats = extract_features(
        open_run(str(run_dir)), ("train",), weights="best", launcher="local", num_workers=1
    )
    h = np.asarray(feats["train"].features, np.float64)
    w = state["model"]["classifier.weight"].double().numpy()
    b = state["model"]["classifier.bias"].double().numpy()
    pred = np.argmax(h @ w.T + b, 1)
    np.testing.assert_array_equal(pred[issues["index"]], issues["suggested_label"])

    # A child run of the source run, finished, with the per-round metrics.
    from mlflow.tracking import MlflowClient

    child = MlflowClient(uri).get_run(s["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == train_summary["mlflow_run_id"]
    assert child.info.status == "FINISHED"
    assert "final_test_acc" in child.data.metrics


def test_second_posttrain_reuses_the_cached_features(source, tmp_path):
    run_dir = source[0]
    common = ["posttrain.score=grad_norm", "posttrain.max_removed=0.1", "tracking.enabled=false"]
    assert main([f"run={run_dir}", f"output_dir={tmp_path / 'a'}", *common]) == 0
    entries = list((run_dir / "features").iterdir())
    stamps = {p: p.stat().st_mtime_ns for e in entries for p in e.iterdir()}
    assert main([f"run={run_dir}", f"output_dir={tmp_path / 'b'}", *common]) == 0
    assert list((run_dir / "features").iterdir()) == entries
    assert {p: p.stat().st_mtime_ns for p in stamps} == stamps


@pytest.mark.parametrize(
    "extra, message",
    [
        (["posttrain.fraction_per_round=1.0"], "fraction_per_round=1.0 must be in (0, 1)"),
        (["posttrain.fraction_per_round=0"], "fraction_per_round=0.0 must be in (0, 1)"),
        (["data.name=cifar10"], "was trained on data.name=digits, not data.name=cifar10"),
        (["posttrain.scor=influence"], "unknown config key 'posttrain.scor'"),
        (["posttrain.score=magic"], "invalid posttrain.score='magic'"),
        (["posttrain.finetune_epochs=-1"], "posttrain.finetune_epochs=-1 must be >= 0"),
        (["posttrain.select_on=test"], "invalid posttrain.select_on='test'"),
        (["posttrain.weights=last"], "invalid posttrain.weights='last'"),
    ],
)
def test_bad_input_is_one_line_before_any_output(source, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    assert main([f"run={source[0]}", f"output_dir={out}", *extra]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and message in err, err
    assert not out.exists()


@pytest.mark.slow
def test_auto_weights_are_the_final_ones_without_best_weights(source, tmp_path):
    """A run that kept no best-by-validation weights is post-trained from its final ones."""
    no_best = tmp_path / "no_best"
    shutil.copytree(source[0], no_best, ignore=shutil.ignore_patterns("features", "checkpoints"))
    (no_best / "weights_best.pt").unlink()
    out = tmp_path / "pt"
    args = [
        f"run={no_best}",
        f"output_dir={out}",
        "tracking.enabled=false",
        "posttrain.max_removed=0.1",
    ]
    assert main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["weights"] == "final" and s["weights_requested"] == "auto"
    assert s["test_acc_before"] == pytest.approx(s["test_acc_before_features"], abs=1e-6)
    assert [p.name.split("-")[0] for p in (no_best / "features").iterdir()] == ["final"]


def test_bad_runs_are_one_line(source, tmp_path, capsys):
    run_dir, uri, _ = source
    empty = tmp_path / "empty"
    empty.mkdir()
    no_weights = tmp_path / "no_weights"
    shutil.copytree(run_dir, no_weights, ignore=shutil.ignore_patterns("features", "checkpoints"))
    (no_weights / "weights.pt").unlink()
    no_best = tmp_path / "no_best"
    shutil.copytree(run_dir, no_best, ignore=shutil.ignore_patterns("features", "checkpoints"))
    (no_best / "weights_best.pt").unlink()
    cases = [
        ([f"run={empty}"], "has no config.yaml"),
        ([f"run={no_weights}", "posttrain.weights=final"], "has no weights.pt"),
        ([f"run={tmp_path / 'no_best'}", "posttrain.weights=best"], "has no weights_best.pt"),
        (["run=" + "0" * 32, f"tracking.uri={uri}"], "no such MLflow run"),
    ]
    for args, message in cases:
        out = tmp_path / "never"
        assert main([*args, f"output_dir={out}"]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and message in err, err
        assert not out.exists()


def _removed_with_scoring_ranks(source, out: Path, workers: int, launcher: str):
    """``removed.parquet`` of a post-training whose rounds are scored on ``workers`` ranks."""
    run_dir, uri, _ = source
    args = [
        f"run={run_dir}",
        f"tracking.uri={uri}",
        f"output_dir={out}",
        "posttrain.score=influence",
        "posttrain.hessian=ekfac",
        "posttrain.fraction_per_round=0.1",
        "posttrain.max_removed=0.2",
        "posttrain.patience=5",
        "posttrain.weights=final",
        "posttrain.select_on=val_noisy",
        f"posttrain.num_workers={workers}",
        f"posttrain.launcher={launcher}",
    ]
    assert main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    assert s["score_workers"] == workers
    assert not (out / ".scratch").exists()
    return pq.read_table(out / "removed.parquet").to_pandas()


@pytest.mark.slow
@pytest.mark.parametrize("launcher", ["local", "ray"])
def test_one_and_two_scoring_ranks_remove_the_same_samples(source, tmp_path, request, launcher):
    """posttrain.num_workers=2 scores each round on two ranks, spawned processes or Ray Train
    workers inside the command (EK-FAC factors all-reduced): the removed set and the scores
    equal the one-process ones."""
    if launcher == "ray":
        request.getfixturevalue("ray_cluster")  # the session's local Ray cluster
    one = _removed_with_scoring_ranks(source, tmp_path / "w1", 1, "local")
    two = _removed_with_scoring_ranks(source, tmp_path / "w2", 2, launcher)
    assert len(one) > 0
    assert sorted(one["index"]) == sorted(two["index"])
    np.testing.assert_allclose(
        one.sort_values("index")["score"], two.sort_values("index")["score"], rtol=1e-9
    )


@pytest.mark.slow
def test_finetune_trains_on_the_kept_samples_only(source, tmp_path):
    """posttrain.finetune_epochs: the run's config through the normal training loop with the
    removed set masked out and the post-trained weights as the start; a child MLflow run."""
    import mlflow

    run_dir, uri, train_summary = source
    out = tmp_path / "ft"
    args = [
        f"run={run_dir}",
        f"tracking.uri={uri}",
        f"output_dir={out}",
        "posttrain.fraction_per_round=0.1",
        "posttrain.max_removed=0.2",
        "posttrain.patience=5",
        "posttrain.weights=final",
        "posttrain.select_on=val_noisy",
        "posttrain.finetune_epochs=2",
    ]
    assert main(args) == 0
    s = json.loads((out / "summary.json").read_text())
    removed = pq.read_table(out / "removed.parquet").column("index").to_numpy()
    assert len(removed) > 0
    assert sorted(np.load(out / "finetune_exclude.npy").tolist()) == sorted(removed.tolist())
    ft = open_run(str(out / "finetune"))
    assert ft.config.train.epochs == 2 and ft.config.train.init_weights == str(out / "weights.pt")
    run_lr = open_run(str(run_dir)).config.train.lr
    assert ft.config.train.lr == pytest.approx(0.1 * run_lr)  # a tenth of the run's by default
    hist = {}
    for part in ft.iter_table(columns=["index", "loss_hist"]):
        for i, h in zip(part["index"], part["loss_hist"], strict=True):
            hist[int(i)] = np.asarray(h, np.float64)
    gone = set(removed.tolist())
    assert all(np.isnan(hist[i]).all() for i in gone)  # never trained on
    kept_seen = [np.isfinite(h).any() for i, h in hist.items() if i not in gone]
    assert np.mean(kept_seen) > 0.95  # (an epoch drops the floor's remainder)
    assert s["finetune"]["kept"] == train_summary["num_train"] - len(removed)
    assert s["test_acc_finetuned"] == s["finetune"]["test_acc"] is not None
    assert "Fine-tuned the whole network for 2 epochs" in (out / "rounds.md").read_text()
    # The fine-tune's epoch is selected on the same validation labels as the rounds; epoch 0
    # is the post-trained head, kept when no fine-tune epoch beats it.
    ft_s = s["finetune"]
    assert ft_s["selected_on"] == "val_acc_noisy" and len(ft_s["history"]) == 2
    head = s["val_acc_noisy"]
    best = max(h["val_acc_noisy"] for h in ft_s["history"])
    if best > head:
        row = ft_s["history"][ft_s["selected_epoch"] - 1]
        assert row["val_acc_noisy"] == best and s["test_acc_finetuned"] == row["test_acc"]
    else:
        assert ft_s["selected_epoch"] == 0 and s["test_acc_finetuned"] == s["test_acc"]
    assert ft_s["test_acc_last"] == ft_s["history"][-1]["test_acc"]
    # It starts from the post-trained network and holds the noisy validation accuracy.
    before = train_summary["history"][-1]["val_acc_noisy"]
    assert s["val_acc_noisy_finetuned"] >= before - 0.01, (s["val_acc_noisy_finetuned"], before)
    child = mlflow.MlflowClient(uri).get_run(s["finetune"]["mlflow_run_id"])
    assert child.data.tags["mlflow.parentRunId"] == train_summary["mlflow_run_id"]
    assert child.info.status == "FINISHED"
