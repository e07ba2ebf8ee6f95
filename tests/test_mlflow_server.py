"""A real MLflow tracking server: runs, sweeps and their artifacts arrive there, the UI loads.

The server is ``mlflow server`` on 127.0.0.1 (a SQLite backend store, artifacts served by the
server itself with ``--serve-artifacts``), as infra/k8s/mlflow.yaml runs it on a cluster.
Everything is logged through its http URL; artifacts must be uploaded through the server (the
experiment's artifact location is ``mlflow-artifacts:/...``), never written into the server's
directory by the client.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import yaml
from local_mlflow import sqlite_uri
from local_ray import free_ports
from mlflow.tracking import MlflowClient

from distnoisy.config import load_config
from distnoisy.train import train
from distnoisy.tune import run_sweep

pytestmark = pytest.mark.slow


def _get(url: str, data: dict | None = None) -> tuple[int, str]:
    body = json.dumps(data).encode() if data is not None else None
    request = urllib.request.Request(url, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status, response.read().decode(errors="replace")
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")
    except OSError:
        return 0, ""


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """``mlflow server`` on a free port; yields ``(url, artifacts directory)``."""
    root = tmp_path_factory.mktemp("mlflow-server")
    (port,) = free_ports(1)
    mlflow = str(Path(sys.executable).with_name("mlflow"))
    cmd = [
        mlflow, "server", "--backend-store-uri", sqlite_uri(root),
        "--serve-artifacts", "--artifacts-destination", str(root / "artifacts"),
        "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
    ]  # fmt: skip
    log = open(root / "server.log", "w")  # noqa: SIM115
    env = dict(os.environ, MLFLOW_DISABLE_TELEMETRY="true")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while _get(f"{url}/health")[0] != 200:
            assert proc.poll() is None, (root / "server.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "mlflow server did not answer /health"
            time.sleep(0.5)
        yield url, root / "artifacts"
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server's own process group (its workers)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=15)
        log.close()


def _check_ui(url: str, experiment_id: str, run_ids: list[str], metric: str) -> None:
    """The UI's pages for a run and for a comparison of runs load.

    The UI is a JavaScript app: its HTML and script bundle must load, then the JSON endpoints
    the run page (run, metric history, artifact list and content) and the compare page (run
    search, bulk metric history) call must answer with these runs.
    """
    status, html = _get(f"{url}/")
    assert status == 200 and "<title>MLflow</title>" in html
    bundle = re.search(r'src="(static-files/static/js/main\.[0-9a-f]+\.js)"', html)
    assert bundle and _get(f"{url}/{bundle.group(1)}")[0] == 200
    ajax = f"{url}/ajax-api/2.0/mlflow"
    run_id = run_ids[0]
    status, body = _get(f"{ajax}/runs/get?run_id={run_id}")
    assert status == 200 and json.loads(body)["run"]["info"]["run_id"] == run_id
    status, body = _get(f"{ajax}/metrics/get-history?run_id={run_id}&metric_key={metric}")
    assert status == 200 and json.loads(body)["metrics"]
    status, body = _get(f"{ajax}/artifacts/list?run_id={run_id}")
    assert status == 200
    assert "summary.json" in {f["path"] for f in json.loads(body)["files"]}
    status, body = _get(f"{url}/get-artifact?path=summary.json&run_uuid={run_id}")
    assert status == 200 and json.loads(body)["mlflow_run_id"] == run_id
    # the compare page: search for the runs, then their metric histories in one request
    quoted = ", ".join(f"'{r}'" for r in run_ids)
    search = {"experiment_ids": [experiment_id], "filter": f"attributes.run_id IN ({quoted})"}
    status, body = _get(f"{ajax}/runs/search", search)
    assert status == 200 and len(json.loads(body)["runs"]) == len(run_ids)
    ids = "&".join(f"run_id={r}" for r in run_ids)
    status, body = _get(f"{ajax}/metrics/get-history-bulk?{ids}&metric_key={metric}")
    assert status == 200
    assert {m["run_id"] for m in json.loads(body)["metrics"]} == set(run_ids)


def test_two_worker_run_logs_to_the_server(mlflow_server, tmp_path, digits_root, ray_cluster):
    url, artifacts = mlflow_server
    runs = []
    # Two runs for the compare page: 2 Ray Train workers, and 2 processes of the local launcher
    # (each logs from its own ranks: both paths must reach the server).
    for seed, scaling in ((0, "scaling.num_workers=2"), (1, "scaling.launcher=local")):
        out = tmp_path / f"run{seed}"
        cfg = load_config(
            [f"data.root={digits_root}", f"output_dir={out}", "train.epochs=2", scaling,
             f"seed={seed}", f"tracking.uri={url}", "tracking.experiment=server-runs"]
        )  # fmt: skip
        runs.append((out, train(cfg)))
    client = MlflowClient(url)
    experiment = client.get_experiment_by_name("server-runs")
    assert experiment.artifact_location.startswith("mlflow-artifacts:")
    for out, summary in runs:
        run = client.get_run(summary["mlflow_run_id"])
        assert run.info.status == "FINISHED"
        assert run.data.params["scaling.num_workers"] == str(summary["num_workers"])
        history = client.get_metric_history(run.info.run_id, "test_acc")
        assert [m.step for m in history] == [0, 1]
        assert history[-1].value == pytest.approx(summary["test_acc"])
        assert run.data.metrics["final_test_acc"] == pytest.approx(summary["test_acc"])
        listed = {a.path for a in client.list_artifacts(run.info.run_id)}
        assert {"config.yaml", "summary.json", "label_issues.parquet"} <= listed
        # uploaded through the server into its artifact store, byte for byte
        stored = artifacts / experiment.experiment_id / run.info.run_id / "artifacts"
        assert (stored / "label_issues.parquet").read_bytes() == (
            out / "label_issues.parquet"
        ).read_bytes()
    ids = [summary["mlflow_run_id"] for _, summary in runs]
    _check_ui(url, experiment.experiment_id, ids, "test_acc")


def test_sweep_nests_trials_under_its_run_on_the_server(
    mlflow_server, tmp_path, digits_root, ray_cluster
):
    url, artifacts = mlflow_server
    space = tmp_path / "space.yaml"
    space.write_text(
        yaml.safe_dump(
            {
                "overrides": {"method.name": "elr", "data.val_fraction": 0.1, "train.epochs": 2},
                "space": {"method.lam": [0.3, 3.0]},
                "scheduler": {"name": "fifo"},
                "resources": {"workers": 1, "driver_cpu": 0.5, "max_concurrent_trials": 2},
            }
        )
    )
    overrides = [f"data.root={digits_root}", f"tracking.uri={url}", "tracking.experiment=sweep"]
    report = run_sweep(space, overrides, tmp_path / "sweep")
    client = MlflowClient(url)
    parent = client.get_run(report["parent_run_id"])
    assert parent.info.status == "FINISHED"
    listed = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.md", "results.csv", "best.yaml", "plot.png"} <= listed
    stored = artifacts / parent.info.experiment_id / parent.info.run_id / "artifacts"
    assert (stored / "best.yaml").read_text() == (tmp_path / "sweep" / "best.yaml").read_text()
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    assert sorted(float(c.data.params["method.lam"]) for c in children) == [0.3, 3.0]
    for child in children:
        assert child.info.status == "FINISHED"
        assert len(client.get_metric_history(child.info.run_id, "val_acc")) == 2
        assert "summary.json" in {a.path for a in client.list_artifacts(child.info.run_id)}
    ids = [c.info.run_id for c in children]
    _check_ui(url, parent.info.experiment_id, ids, "val_acc")
