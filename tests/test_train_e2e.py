"""End-to-end runs on the real digits data: Ray Train DDP, MLflow, outputs, resume, failures."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from local_mlflow import sqlite_uri
from mlflow.tracking import MlflowClient

from distnoisy.config import load_config
from distnoisy.train import main, train

pytestmark = pytest.mark.slow


def _cfg(tmp_path: Path, digits_root: Path, mlflow_uri: str, *overrides: str):
    return load_config(
        [
            f"data.root={digits_root}",
            f"output_dir={tmp_path / 'run'}",
            f"tracking.uri={mlflow_uri}",
            *overrides,
        ]
    )


#: Epochs of the module's default run on 2 Ray workers.
RAY_EPOCHS = 6


@pytest.fixture(scope="module")
def ray_run(tmp_path_factory, digits_root, ray_cluster) -> tuple[Path, str, dict]:
    """The default run (ELR, 2 Ray Train workers on the session's cluster) for RAY_EPOCHS
    epochs, tracked in SQLite: ``(run_dir, uri, summary)``. The output test reads it and the
    driver-kill test resumes to it."""
    tmp = tmp_path_factory.mktemp("ray_run")
    uri = sqlite_uri(tmp)
    cfg = _cfg(tmp, digits_root, uri, f"train.epochs={RAY_EPOCHS}", "scaling.num_workers=2")
    return tmp / "run", uri, train(cfg)


def test_ray_two_workers_writes_outputs_and_tracks(ray_run):
    run_dir, mlflow_uri, summary = ray_run
    for name in ("config.yaml", "summary.json", "label_issues.parquet", "sample_stats.parquet"):
        assert (run_dir / name).is_file(), name
    assert summary["num_workers"] == 2 and summary["epochs"] == RAY_EPOCHS
    assert 0.3 < summary["noise_rate_realised"] < 0.5
    for key in ("test_acc", "best_test_acc", "memorized", "label_issue_auroc", "wall_s"):
        assert isinstance(summary[key], float), key
    assert summary["test_acc"] > 0.5  # a few epochs on digits already learn the clean signal

    issues = pq.read_table(run_dir / "label_issues.parquet").to_pandas()
    assert len(issues) == summary["num_train"]
    assert list(issues.columns[:5]) == ["index", "key", "given_label", "suggested_label", "score"]
    assert np.all(np.diff(issues["score"].to_numpy()) <= 0)  # ranked
    assert sorted(issues["index"]) == list(range(summary["num_train"]))
    assert issues["key"].str.startswith("digits/").all()

    stats = pq.read_table(run_dir / "sample_stats.parquet").to_pandas()
    hist = np.stack(stats["loss_hist"].to_numpy())
    assert hist.shape == (summary["num_train"], RAY_EPOCHS)
    # Shard split: each epoch draws floor(N / 64) * 64 samples, a few twice, a few not at all.
    assert np.isfinite(hist).mean() > 0.95
    targets = np.stack(stats["elr_target"].to_numpy())
    # Zero init and no bias correction: after k visits a target sums to 1 - beta**k.
    sums = targets.sum(1, keepdims=True)
    visits = 1 - 0.7 ** np.arange(1, 2 * RAY_EPOCHS + 1)
    assert np.abs(sums - visits).min(1).max() < 1e-4

    client = MlflowClient(mlflow_uri)
    run = client.get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.params["method.lam"] == "3.0" and run.data.params["scaling.num_workers"] == "2"
    test_acc = client.get_metric_history(run.info.run_id, "test_acc")
    assert [m.step for m in test_acc] == list(range(RAY_EPOCHS))
    assert test_acc[-1].value == pytest.approx(summary["test_acc"])
    assert "memorized" in run.data.metrics and "noise_rate_realised" in run.data.metrics
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"config.yaml", "summary.json", "label_issues.parquet"} <= artifacts


def test_elr_targets_identical_for_one_and_two_workers(
    tmp_path, digits_root, mlflow_uri, ray_cluster
):
    # One global sample order (data.split=sample) and a model without batch-dependent layers
    # make 1 and 2 workers the same computation up to float summation order (see
    # _assert_same_computation_up_to_rounding).
    common = (
        "train.epochs=3",
        "data.split=sample",
        "train.optimizer=sgd",
        "train.lr=0.01",
        "tracking.enabled=false",
    )
    one = train(
        _cfg(
            tmp_path / "a",
            digits_root,
            mlflow_uri,
            *common,
            "scaling.launcher=local",
            "scaling.num_workers=1",
        )
    )
    two = train(_cfg(tmp_path / "b", digits_root, mlflow_uri, *common, "scaling.num_workers=2"))
    _assert_same_computation_up_to_rounding(tmp_path / "a/run", tmp_path / "b/run", one, two)
    # Each epoch uses floor(1437 / 64) * 64 = 1408 samples: most samples were visited 3 times.
    t1 = _targets(tmp_path / "a/run")
    assert np.mean(np.abs(t1.sum(1) - (1 - 0.7**3)) < 1e-5) > 0.9


def _targets(run_dir: Path) -> np.ndarray:
    table = pq.read_table(run_dir / "sample_stats.parquet")
    return np.stack(table["elr_target"].to_numpy(zero_copy_only=False))


#: How far the logits of two runs that differ only in float summation order may drift apart, as
#: a fraction of the logits' scale. 1 and 2 workers run the same SGD steps on the same batches;
#: only the order of float32 sums differs (the all-reduce adds two half-batch gradients, one
#: worker sums the batch at once): ~1e-7 relative per step. Training amplifies it (ReLU and
#: max-pool switches): after 2-3 epochs at lr=0.01 the final logits differ by 0.15-0.4% of
#: their largest value here. A difference in the computation itself (a lost or doubled
#: gradient, another sample order, another learning rate) moves them by tens of percent.
LOGIT_DRIFT = 0.05
#: Evaluation during training and the feature extraction below batch the test set differently;
#: float32 rounding of logits of order 1.
EVAL_ROUNDING = 1e-5


def _assert_same_computation_up_to_rounding(
    dir_a: Path, dir_b: Path, summary_a: dict, summary_b: dict
) -> None:
    """Two ELR runs that differ only in float summation order: their final logits agree up to
    a small drift, their ELR targets as closely as those logits imply, and their test
    accuracies up to the predictions that the measured logit difference can flip."""
    from distnoisy.data.prepare import prepare_data
    from distnoisy.data.shard_format import read_labels
    from distnoisy.data.shards import read_manifest
    from distnoisy.finished.features import extract_features
    from distnoisy.finished.runs import open_run

    runs = [open_run(str(d)) for d in (dir_a, dir_b)]
    fa, fb = (extract_features(r, launcher="local", num_workers=1) for r in runs)
    za, zb = np.asarray(fa["test"].logits), np.asarray(fb["test"].logits)
    delta = float(np.abs(za - zb).max())
    delta_train = float(np.abs(np.asarray(fa["train"].logits) - fb["train"].logits).max())
    assert max(delta, delta_train) <= LOGIT_DRIFT * np.abs(za).max(), (delta, delta_train)

    # A target is an EMA of the sample's softmax outputs (weights summing to 1 - beta**k < 1),
    # and softmax moves by at most half the largest logit change: |dt| <= max_visits |dz| / 2.
    # The logit differences grow during training, so the final weights' difference on the
    # training set bounds those of the visits; a factor 2 covers the last visit's steps.
    dt = float(np.abs(_targets(dir_a) - _targets(dir_b)).max())
    assert dt <= delta_train, (dt, delta_train)

    labels = read_labels(read_manifest(prepare_data(runs[0].config).test_dir))[0]
    n = len(labels)

    def margin(z: np.ndarray) -> np.ndarray:
        top2 = np.sort(z, axis=1)[:, -2:]
        return top2[:, 1] - top2[:, 0]

    for z, summary in ((za, summary_a), (zb, summary_b)):
        # The summary's accuracy is that of these weights, up to the near-ties that
        # evaluation's own batching can flip ...
        acc = float((z.argmax(1) == labels).mean())
        ties = int((margin(z) <= 2 * EVAL_ROUNDING).sum())
        assert abs(summary["test_acc"] - acc) <= ties / n + 1e-6, (summary["test_acc"], acc)
    # ... and the two accuracies differ by at most the test images whose top-two margin the
    # logit difference (plus evaluation's rounding on either side) can close. The model is
    # mid-training, so there are several: 6 of 360 flipped on another machine.
    near_ties = int((margin(za) <= 2 * delta + 6 * EVAL_ROUNDING).sum())
    assert abs(summary_a["test_acc"] - summary_b["test_acc"]) <= near_ties / n + 1e-6, (
        summary_a["test_acc"],
        summary_b["test_acc"],
        delta,
        near_ties,
    )


def test_local_launcher_two_processes_matches_one(tmp_path, digits_root, mlflow_uri):
    # The launcher for machines without Ray (e.g. a GPU box): spawned processes with a gloo group.
    common = (
        "train.epochs=2",
        "data.split=sample",
        "train.optimizer=sgd",
        "train.lr=0.01",
        "tracking.enabled=false",
        "scaling.launcher=local",
    )
    one = train(_cfg(tmp_path / "a", digits_root, mlflow_uri, *common, "scaling.num_workers=1"))
    two = train(_cfg(tmp_path / "b", digits_root, mlflow_uri, *common, "scaling.num_workers=2"))
    assert two["num_workers"] == 2
    _assert_same_computation_up_to_rounding(tmp_path / "a/run", tmp_path / "b/run", one, two)
    ckpts = sorted(p.name for p in (tmp_path / "b/run/checkpoints").iterdir())
    assert ckpts == ["epoch=0000", "epoch=0001"]


def test_elr_beats_ce_where_ce_memorizes(long_ce_run, long_elr_run):
    # The direction of the README's headline result on shorter (25 epochs), single-process
    # runs (tests/conftest.py).
    ce, elr = long_ce_run.summary, long_elr_run.summary
    assert ce["memorized"] > 0.5
    assert elr["memorized"] < ce["memorized"] - 0.2
    assert elr["test_acc"] > ce["test_acc"] + 0.05
    assert elr["label_issue_auroc"] > 0.85


def test_resume_continues_exactly(tmp_path, digits_root, mlflow_uri):
    # The first run trains all 3 epochs uninterrupted: its results are what the resumed run
    # must reproduce (tests/test_resume.py checks every method's state; this, the MLflow run).
    args = ("train.epochs=3", "scaling.launcher=local", "scaling.num_workers=1")
    run_dir = tmp_path / "r" / "run"
    first = train(_cfg(tmp_path / "r", digits_root, mlflow_uri, *args))
    # Lose the last epoch, as if the job had died after epoch 2 was checkpointed.
    ckpts = sorted((run_dir / "checkpoints").glob("epoch=*"))
    assert [p.name for p in ckpts] == ["epoch=0001", "epoch=0002"]  # only the last two kept
    import shutil

    shutil.rmtree(ckpts[-1])
    resumed = train(_cfg(tmp_path / "r", digits_root, mlflow_uri, *args, "resume=true"))
    assert resumed["mlflow_run_id"] == first["mlflow_run_id"]
    for key in ("test_acc", "memorized", "label_issue_auroc"):
        assert resumed[key] == pytest.approx(first[key], abs=1e-9), key
    assert [h["train_loss"] for h in resumed["history"]] == pytest.approx(
        [h["train_loss"] for h in first["history"]], abs=1e-9
    )
    run = MlflowClient(mlflow_uri).get_run(resumed["mlflow_run_id"])
    assert run.info.status == "FINISHED"


def test_validation_split_selects_the_reported_epoch(ce_run, digits_root):
    # The session's CE run with a 10% validation split (tests/conftest.py).
    summary, mlflow_uri = ce_run.summary, ce_run.uri
    val = [h["val_acc"] for h in summary["history"]]
    assert all(0.0 <= v <= 1.0 for v in val)
    best = int(np.argmax(val))
    assert summary["best_val_epoch"] == best and summary["best_val_acc"] == val[best]
    assert summary["test_acc_at_best_val"] == summary["history"][best]["test_acc"]
    assert summary["num_train"] == 1797 - 360 - 144  # the validation images left training
    metrics = MlflowClient(mlflow_uri).get_metric_history(summary["mlflow_run_id"], "val_acc")
    assert [m.value for m in sorted(metrics, key=lambda m: m.step)] == pytest.approx(val)
    # The papers' noisy validation: the same noise process on the validation labels.
    from distnoisy.data.noise import load_label_file

    val_dir = digits_root / "val-0.1" / "val"
    noisy = load_label_file(next((val_dir.parent / "noise").glob("noise-digits-val-*")), 144, 10)
    rate = float((noisy.labels != noisy.clean_labels).mean())
    assert rate == pytest.approx(0.4, abs=0.1)
    last = summary["history"][-1]
    # A model that learned the clean signal agrees with the noisy val labels less often.
    assert 0.0 < last["val_acc_noisy"] < last["val_acc"]


def test_crash_marks_run_failed_and_leaves_no_outputs(
    tmp_path, digits_root, mlflow_uri, monkeypatch
):
    from distnoisy.methods.elr import ELR

    calls = {"n": 0}
    original = ELR.loss

    def failing_loss(self, logits, labels, index):
        calls["n"] += 1
        if calls["n"] > 30:  # crash in the second epoch
            raise RuntimeError("injected worker failure")
        return original(self, logits, labels, index)

    monkeypatch.setattr(ELR, "loss", failing_loss)
    cfg = _cfg(
        tmp_path,
        digits_root,
        mlflow_uri,
        "train.epochs=3",
        "scaling.launcher=local",
        "scaling.num_workers=1",
    )
    with pytest.raises(RuntimeError, match="injected"):
        train(cfg)
    run_dir = tmp_path / "run"
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    assert MlflowClient(mlflow_uri).get_run(run_id).info.status == "FAILED"
    assert not (run_dir / "summary.json").exists()
    assert not (run_dir / "label_issues.parquet").exists()
    ckpts = [p.name for p in (run_dir / "checkpoints").iterdir()]
    assert ckpts == ["epoch=0000"]  # the finished epoch only, whole; no temp leftovers


def _error_line(capsys, argv: list[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    return err


def test_bad_input_is_one_line_and_writes_nothing(tmp_path, digits_root, capsys):
    out = tmp_path / "out"
    base = [f"data.root={digits_root}", f"output_dir={out}", "tracking.enabled=false"]
    labels = tmp_path / "labels.csv"
    n = 1437
    rows = [f"{i},{i % 10}" for i in range(n)]
    rows[57] = "57,12"
    labels.write_text("index,label\n" + "\n".join(rows) + "\n")
    err = _error_line(capsys, [*base, "noise.kind=file", f"noise.file={labels}"])
    assert "12" in err and "57" in err and "0..9" in err
    err = _error_line(capsys, [*base, "data.name=shards", f"data.urls={tmp_path / 'missing'}"])
    assert str(tmp_path / "missing") in err
    err = _error_line(capsys, [*base, "method.name=elrr"])
    assert "unknown method 'elrr'" in err and "elr" in err
    assert not out.exists()


def _run_cli(args: list[str], env: dict[str, str]) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "distnoisy.train", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def test_ray_run_resumes_after_its_driver_is_killed(
    tmp_path, digits_root, mlflow_uri, ray_cluster, ray_run
):
    import signal
    import time

    # The same run as the module's uninterrupted ray_run, through the CLI, killed mid-run.
    args = [f"data.root={digits_root}", f"tracking.uri={mlflow_uri}", f"train.epochs={RAY_EPOCHS}"]
    args.append("scaling.num_workers=2")
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    straight = ray_run[2]

    run_dir = tmp_path / "killed"
    proc = _run_cli([*args, f"output_dir={run_dir}"], env)
    deadline = time.monotonic() + 240
    while not (run_dir / "ray" / "train" / "epoch=0002").exists():
        assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)  # what `ray job stop` or a scheduler sends
    assert proc.wait(timeout=120) != 0
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    client = MlflowClient(mlflow_uri)
    assert client.get_run(run_id).info.status == "KILLED"
    assert not (run_dir / "summary.json").exists()

    # Resumed through the CLI as well: what a user types, and what it prints at the end.
    done = subprocess.run(
        [sys.executable, "-m", "distnoisy.train", *args, f"output_dir={run_dir}", "resume=true"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert "clean test accuracy" in done.stdout and "label-issue AUROC" in done.stdout
    resumed = json.loads((run_dir / "summary.json").read_text())
    assert resumed["epochs"] == RAY_EPOCHS and resumed["mlflow_run_id"] == run_id
    assert client.get_run(run_id).info.status == "FINISHED"
    # Resumed from a checkpoint at epoch >= 3: the tail of training is recomputed identically.
    for key in ("test_acc", "memorized", "label_issue_auroc"):
        assert resumed[key] == pytest.approx(straight[key], abs=1e-6), key
    steps = [m.step for m in client.get_metric_history(run_id, "test_acc")]
    assert set(steps) == set(range(RAY_EPOCHS))
