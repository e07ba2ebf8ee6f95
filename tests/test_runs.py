"""Finished runs as inputs of later phases: by directory or MLflow id, with clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pyarrow.parquet as pq
import pytest

from distnoisy.config import load_config
from distnoisy.core.errors import ConfigError
from distnoisy.finished.runs import open_run, resolve_run_dir
from distnoisy.train import train


@pytest.fixture(scope="module")
def finished(ce_run):
    """The session's short real run (local launcher, digits) tracked in a SQLite store (see
    tests/conftest.py): ``(run_dir, tracking uri, summary)``."""
    return ce_run.run_dir, ce_run.uri, ce_run.summary


def test_open_by_directory_and_by_mlflow_id_agree(finished):
    run_dir, uri, summary = finished
    by_dir = open_run(str(run_dir))
    by_id = open_run(summary["mlflow_run_id"], tracking_uri=uri)
    assert by_dir.run_dir == by_id.run_dir == run_dir.resolve()
    assert by_id.mlflow_run_id == by_dir.mlflow_run_id == summary["mlflow_run_id"]
    assert by_dir.config.train.epochs == summary["epochs"] == len(summary["history"])
    assert by_dir.summary["test_acc"] == summary["test_acc"]
    assert set(by_dir.weights()) == {"model"}


def test_tables_read_in_batches_equal_the_whole_file(finished):
    run = open_run(str(finished[0]))
    epochs = finished[2]["epochs"]
    cols = ["index", "loss_hist", "pred_hist", "is_corrupted", "given_label"]
    whole = run.read_table(columns=cols)
    parts = list(run.iter_table(columns=cols, batch_rows=100))
    assert len(parts) == -(-len(whole["index"]) // 100)
    for c in cols:
        np.testing.assert_array_equal(np.concatenate([p[c] for p in parts]), whole[c])
    ref = pq.read_table(run.path("sample_stats.parquet")).to_pandas()
    assert whole["loss_hist"].shape == (len(ref), epochs)
    np.testing.assert_array_equal(whole["loss_hist"], np.stack(ref["loss_hist"].to_numpy()))
    # A prediction per epoch exactly where a loss was recorded (the last partial batch of
    # an epoch is dropped, so a few samples miss an epoch).
    visited = whole["pred_hist"] >= 0
    np.testing.assert_array_equal(visited, np.isfinite(whole["loss_hist"]))
    assert visited.mean() > 0.95
    stats = run.read_table(columns=["pred_hist", "final_pred"])
    assert (stats["pred_hist"][:, -1] == stats["final_pred"]).mean() > 0.5
    np.testing.assert_array_equal(whole["is_corrupted"], ref["is_corrupted"].to_numpy(float))


def test_bad_references_are_one_line(finished, tmp_path):
    run_dir, uri, _ = finished
    with pytest.raises(ConfigError, match="no such directory, and not an MLflow run id"):
        resolve_run_dir(str(tmp_path / "nope"))
    with pytest.raises(ConfigError, match="no such MLflow run"):
        resolve_run_dir("0" * 32, uri)
    with pytest.raises(ConfigError, match="no MLflow store"):
        resolve_run_dir("0" * 32, f"sqlite:///{tmp_path / 'absent.db'}")
    assert not (tmp_path / "absent.db").exists()
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="not a distnoisy run directory"):
        open_run(str(tmp_path / "empty"))
    unfinished = tmp_path / "unfinished"
    shutil.copytree(run_dir, unfinished)
    (unfinished / "weights.pt").unlink()
    with pytest.raises(ConfigError, match="has not finished: resume it"):
        open_run(str(unfinished))
    with pytest.raises(ConfigError, match="no column"):
        open_run(str(run_dir)).read_table(columns=["no_such_field"])
    assert json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]


@pytest.mark.slow
def test_a_partitioned_run_reads_like_a_single_file(tmp_path, digits_root):
    cfg = load_config(
        [
            f"data.root={digits_root}",
            f"output_dir={tmp_path / 'run'}",
            "tracking.enabled=false",
            "scaling.launcher=local",
            "scaling.num_workers=2",
            "store.backend=partitioned",
            "train.epochs=2",
        ]
    )
    train(cfg)
    assert not (tmp_path / "run" / "sample_stats.parquet").exists()
    run = open_run(str(tmp_path / "run"))
    stats = run.read_table(columns=["index", "pred_hist", "loss_hist"])
    np.testing.assert_array_equal(stats["index"], np.arange(len(stats["index"])))
    np.testing.assert_array_equal(stats["pred_hist"] >= 0, np.isfinite(stats["loss_hist"]))
    issues = run.read_table("label_issues.parquet", columns=["index", "score", "trained"])
    assert sorted(issues["index"].tolist()) == list(range(len(stats["index"])))
