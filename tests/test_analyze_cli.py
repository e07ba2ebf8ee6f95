"""``python -m distnoisy.analyze`` end to end on real short runs: outputs, MLflow, bad input."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from local_mlflow import sqlite_uri

from distnoisy.analyze.cli import main
from distnoisy.config import load_config
from distnoisy.train import train

pytestmark = pytest.mark.slow

TINY = ["data.longtail.subpopulations=40", "data.longtail.max_size=30", "data.shard_size=128"]


def _run(tmp, uri, name, *args):
    out = tmp / name
    train(
        load_config(
            [
                f"output_dir={out}",
                f"tracking.uri={uri}",
                "scaling.launcher=local",
                "scaling.num_workers=1",
                "train.epochs=3",
                "method.name=ce",
                *args,
            ]
        )
    )
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory, ce_run):
    """Two long-tail runs (noisy and clean) and, for the bad-input cases, the session's digits
    run (tests/conftest.py)."""
    tmp = tmp_path_factory.mktemp("analyze")
    uri = sqlite_uri(tmp)
    lt = ["data.name=longtail", f"data.root={tmp / 'data'}", *TINY]
    noisy = _run(tmp, uri, "noisy", *lt, "noise.kind=instance", "noise.rate=0.3")
    clean = _run(tmp, uri, "clean", *lt, "noise.kind=none")
    return tmp, uri, noisy, clean, ce_run.run_dir


def test_analysis_outputs_and_mlflow_run(runs, capsys):
    from mlflow.tracking import MlflowClient

    tmp, uri, noisy, clean, _ = runs
    out = tmp / "out"
    args = [f"run=[{noisy}]", f"reference={clean}", f"tracking.uri={uri}", f"output_dir={out}"]
    assert main([*args, "analysis.buckets=3", "analysis.k=5"]) == 0
    rows = list(csv.DictReader((out / "analysis.csv").open()))
    assert [(r["method"], r["bucket"]) for r in rows] == [
        (m, str(b)) for m in ("ce", "reference (clean labels)") for b in range(3)
    ]
    # the buckets split the training set into quantiles: sizes within one of each other
    n_train = [int(r["n_train"]) for r in rows[:3]]
    assert max(n_train) - min(n_train) <= 1
    ce = rows[:3]
    for r, ref in zip(ce, rows[3:], strict=True):
        assert float(r["excess_error"]) == pytest.approx(
            float(ref["test_acc"]) - float(r["test_acc"])
        )
    stats = pq.read_table(noisy / "sample_stats.parquet").to_pandas()
    corrupted = stats.given_label != stats.clean_label
    n_mem = sum(float(r["memorized"]) * int(r["n_corrupted"]) for r in ce)
    assert n_mem == pytest.approx(float((stats.final_pred == stats.given_label)[corrupted].sum()))
    assert (out / "analysis.png").read_bytes()[:4] == b"\x89PNG"
    assert "### Bucket 0 (rarest)" in (out / "analysis.md").read_text()
    client = MlflowClient(tracking_uri=uri)
    found = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        "tags.`distnoisy.kind` = 'analysis'",
    )
    assert len(found) == 1 and found[0].info.status == "FINISHED"
    linked = found[0].data.tags["distnoisy.analyzed_runs"].split(",")
    import json

    ids = {json.loads((d / "run.json").read_text())["mlflow_run_id"] for d in (noisy, clean)}
    assert set(linked) == ids
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"analysis of 1 run(s) written to {out}; MLflow run {found[0].info.run_id}"


def test_truth_buckets_on_longtail(runs, capsys):
    tmp, _, noisy, _, _ = runs
    out = tmp / "truth"
    args = [f"run=[{noisy}]", "analysis.frequency=subpopulation", "analysis.buckets=2"]
    assert main([*args, "tracking.enabled=false", f"output_dir={out}"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last == f"analysis of 1 run(s) written to {out}; not tracked in MLflow"
    rows = list(csv.DictReader((out / "analysis.csv").open()))
    # bucket 0 holds the small subpopulations: its score range ends below bucket 1's start
    assert float(rows[0]["score_hi"]) <= float(rows[1]["score_lo"]) + 1e-9


def _no_history_copy(run, dest):
    shutil.copytree(run, dest)
    table = pq.read_table(dest / "sample_stats.parquet")
    n, e = table.num_rows, len(table.column("pred_hist")[0])
    empty = {
        "pred_hist": pa.FixedSizeListArray.from_arrays(pa.array(np.full(n * e, -1, np.int16)), e),
        "loss_hist": pa.FixedSizeListArray.from_arrays(
            pa.array(np.full(n * e, np.nan, np.float32)), e
        ),
    }
    for name, col in empty.items():
        table = table.set_column(table.schema.get_field_index(name), name, col)
    pq.write_table(table, dest / "sample_stats.parquet")
    return dest


def test_bad_input_is_one_line_and_writes_nothing(runs, capsys):
    tmp, uri, noisy, clean, digits = runs
    empty = _no_history_copy(noisy, tmp / "nohist")
    cases = {
        "runs of different datasets in one comparison": [f"run=[{noisy},{digits}]"],
        "holds no loss/prediction history": [f"run=[{empty}]"],
        "analysis.buckets=10000 but there are": [f"run=[{noisy}]", "analysis.buckets=10000"],
        "trained on noisy labels": [f"run=[{clean}]", f"reference={noisy}"],
        "no such directory": ["run=[/nonexistent/run]"],
        "analysis.k=100000 neighbours": [f"run=[{noisy}]", "analysis.k=100000"],
        "needs runs on data.name=longtail": [f"run=[{digits}]", "analysis.frequency=subpopulation"],
    }
    for i, (message, args) in enumerate(cases.items()):
        out = tmp / f"bad{i}"
        assert main([*args, f"tracking.uri={uri}", f"output_dir={out}"]) == 2
        err = capsys.readouterr().err.strip()
        assert message in err and len(err.splitlines()) == 1, err
        assert not out.exists()
