"""``ray job submit -- python -m distnoisy.train ...`` end to end against a local Ray head.

The head is started with ``ray start --head`` (dashboard and Jobs API on 127.0.0.1, token
authentication on, as Ray 2.60 has it for local clusters) and the job is submitted with the
``ray`` CLI from the repository root with ``--working-dir .``, exactly as docs/cluster.md says.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from local_mlflow import sqlite_uri
from local_ray import RAY, LocalRayCluster, cluster_env
from mlflow.tracking import MlflowClient

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    c = LocalRayCluster(tmp_path_factory.mktemp("rayhead"), head_cpus=3)
    try:
        yield c
    finally:
        c.stop()


def _ray(*args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        [RAY, *args], cwd=ROOT, env=cluster_env(), capture_output=True, text=True,
        timeout=timeout, check=False,
    )  # fmt: skip


def _submit(head: LocalRayCluster, *train_args: str) -> tuple[str, str, str]:
    """Submit a training job, wait for it; returns (submission id, status line, logs)."""
    job_id = f"distnoisy-{uuid.uuid4().hex[:8]}"
    submitted = _ray(
        "job", "submit", "--address", head.dashboard_url, "--submission-id", job_id,
        "--working-dir", ".", "--", "python", "-m", "distnoisy.train", *train_args,
    )  # fmt: skip
    status = _ray("job", "status", "--address", head.dashboard_url, job_id, timeout=60)
    logs = _ray("job", "logs", "--address", head.dashboard_url, job_id, timeout=60)
    assert logs.returncode == 0, submitted.stdout + submitted.stderr
    return job_id, status.stdout + status.stderr, logs.stdout


def test_job_submit_trains_and_writes_its_outputs(head, tmp_path, digits_root) -> None:
    out = tmp_path / "jobrun"
    uri = sqlite_uri(tmp_path)
    job_id, status, logs = _submit(
        head, f"output_dir={out}", "train.epochs=2", f"data.root={digits_root}",
        f"tracking.uri={uri}",
    )  # fmt: skip
    assert f"Job '{job_id}' succeeded" in status, status + logs
    assert "distnoisy: elr on digits (1437 train samples" in logs
    assert f"outputs in {out}" in logs
    assert "epoch 2/2" in logs
    summary = json.loads((out / "summary.json").read_text())
    assert summary["epochs"] == 2 and summary["num_workers"] == 2
    for name in ("config.yaml", "label_issues.parquet", "sample_stats.parquet", "weights.pt"):
        assert (out / name).is_file(), name
    run = MlflowClient(uri).get_run(summary["mlflow_run_id"])
    assert run.info.status == "FINISHED"


def test_job_with_bad_input_fails_with_one_line(head, tmp_path) -> None:
    out = tmp_path / "never"
    job_id, status, logs = _submit(head, f"output_dir={out}", "train.epochz=2")
    assert f"Job '{job_id}' failed" in status, status + logs
    errors = [line for line in logs.splitlines() if line.startswith("distnoisy: error:")]
    assert len(errors) == 1 and "train.epochz" in errors[0], logs
    assert "Traceback" not in logs
    assert not out.exists()


def test_a_driver_without_the_clusters_token_gets_one_line(head, tmp_path) -> None:
    """``python -m distnoisy.train scaling.address=...`` from a shell that lacks
    ``RAY_AUTH_MODE=token``: Ray refuses the connection (after its own retries, ~20 s); the
    driver says so and how to fix it in one line, instead of a traceback of Ray's internals."""
    env = cluster_env()
    del env["RAY_AUTH_MODE"]
    out = tmp_path / "never"
    args = [f"scaling.address={head.address}", f"output_dir={out}", "tracking.enabled=false"]
    done = subprocess.run(
        [sys.executable, "-m", "distnoisy.train", *args],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr[-3000:]
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith(f"distnoisy: error: scaling.address={head.address}: "), last
    assert "refused this process's authentication token" in last and "RAY_AUTH_MODE=token" in last
    assert "Traceback" not in done.stderr


def test_a_driver_without_an_address_joins_the_cluster_ray_start_started(
    head, tmp_path, digits_root
) -> None:
    """``ray start --head``, then ``python -m distnoisy.train`` with no address: the run goes to
    that cluster, as ``ray.init()`` would (Ray 2.60 then refused the ``num_cpus`` of a local
    start with a ValueError traceback). RAY_TMPDIR points Ray at the head's directory, where
    `ray start` wrote its address, as /tmp/ray does for a user. Without RAY_AUTH_MODE, as a user
    types it: the token `ray start` wrote is sent as ``ray.init()`` sends it (before, the run
    was refused after ~20 s of Ray's retry warnings)."""
    env = cluster_env()
    del env["RAY_AUTH_MODE"]
    env["RAY_TMPDIR"] = str(head.temp_root)
    out = tmp_path / "run"
    args = [f"data.root={digits_root}", f"output_dir={out}", "train.epochs=1"]
    done = subprocess.run(
        [sys.executable, "-m", "distnoisy.train", *args, "tracking.enabled=false"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    # Ray writes the head's address with the machine's IP address for 127.0.0.1: same port.
    port = head.address.rsplit(":", 1)[1]
    joined = rf"joining the Ray cluster `ray start` started on this machine \([\d.]+:{port}\)"
    assert re.search(joined, done.stderr), done.stderr[-3000:]
    assert re.search(
        rf"Connecting to existing Ray cluster at address: [\d.]+:{port}\b", done.stderr
    )
    assert json.loads((out / "summary.json").read_text())["epochs"] == 1
