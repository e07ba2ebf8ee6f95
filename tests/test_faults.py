"""Faults users meet in practice, against real components: a user error raised on Ray Train
workers, a tracking server that is not there.

Each command runs as ``python -m distnoisy.train`` in a subprocess, so everything it prints
(Ray's worker and controller logs included) is in the output the test reads.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from local_ray import free_ports
from mlflow.tracking import MlflowClient

from distnoisy.data.shards import read_manifest

REPO = Path(__file__).resolve().parents[1]
LOCAL = ["scaling.launcher=local", "scaling.num_workers=1"]


def _env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH")) if p)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_ADDRESS")}
    return dict(env, PYTHONPATH=path, OMP_NUM_THREADS="1", **extra)


def _train(cwd: Path, args: list[str], timeout: float = 600) -> subprocess.CompletedProcess:
    """``python -m distnoisy.train args`` in ``cwd``; stdout and stderr together in ``.stdout``."""
    return subprocess.run(
        [sys.executable, "-m", "distnoisy.train", *args],
        cwd=cwd,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=timeout,
    )


def _one_error_line(done: subprocess.CompletedProcess) -> str:
    """Exit 2, no traceback anywhere, the ``distnoisy: error:`` line last; that line."""
    out = done.stdout
    assert done.returncode == 2, out[-4000:]
    assert "Traceback" not in out, out[-4000:]
    last = out.rstrip().splitlines()[-1]
    assert last.startswith("distnoisy: error: "), out[-4000:]
    return last


def _run_status(uri: str, run_dir: Path) -> str:
    run_id = json.loads((run_dir / "run.json").read_text())["mlflow_run_id"]
    return MlflowClient(tracking_uri=uri).get_run(run_id).info.status


# -- (a) a tracking server that is not there when the run starts --------------------------------
def test_an_unreachable_tracking_server_is_one_line_in_seconds(tmp_path, digits_root) -> None:
    (port,) = free_ports(1)  # nothing listens there
    uri = f"http://127.0.0.1:{port}"
    run = tmp_path / "run"
    args = [f"data.root={digits_root}", f"output_dir={run}", f"tracking.uri={uri}", *LOCAL]
    t0 = time.monotonic()
    done = _train(tmp_path, [*args, "train.epochs=1"], timeout=120)
    took = time.monotonic() - t0
    line = _one_error_line(done)
    assert uri in line and "tracking.enabled=false" in line and "mlflow server" in line, line
    assert took < 60, took  # the interpreter and the data check included; no 252 s of retries
    assert not run.exists()


# -- (e) a user error on Ray Train workers -----------------------------------------------------
@pytest.mark.slow
def test_bad_data_on_two_ray_workers_is_one_line_last_and_the_run_failed(
    tmp_path, digits_root
) -> None:
    root = tmp_path / "digits"
    shutil.copytree(digits_root, root)
    m = read_manifest(root / "train")
    cut = root / "train" / m.shards[1].name
    cut.write_bytes(cut.read_bytes()[: int(cut.stat().st_size * 0.5)])
    run, uri = tmp_path / "run", f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        f"data.root={root}",
        f"output_dir={run}",
        f"tracking.uri={uri}",
        "scaling.launcher=ray",
        "scaling.num_workers=2",
        "train.epochs=2",
    ]
    done = _train(tmp_path, args)
    line = _one_error_line(done)
    assert "unusable training samples, more than data.max_bad_fraction=0.01" in line, line
    assert f"first: {cut.name}: shard yielded" in line, line
    assert line.count("distnoisy: error:") == 1
    assert done.stdout.count("distnoisy: error:") == 1  # not also in a worker's log
    assert "Error in training function" not in done.stdout
    assert _run_status(uri, run) == "FAILED"
    assert not (run / "summary.json").exists()
