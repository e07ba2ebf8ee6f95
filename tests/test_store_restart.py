"""Exactly once across a worker restart: a Ray Train worker SIGKILLed mid-run (partitioned store,
two workers, ``scaling.max_failures=1``) ends with the same per-sample table as an uninterrupted
run: the restarted workers load the last checkpoint's store, nothing lost, nothing applied twice.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest

from distnoisy.config import load_config
from distnoisy.store.export import iter_sample_stats
from distnoisy.train import train

pytestmark = pytest.mark.slow

EPOCHS = 3


def _args(digits_root: Path, run_dir: Path) -> list[str]:
    return [
        f"data.root={digits_root}",
        f"output_dir={run_dir}",
        f"train.epochs={EPOCHS}",
        "method.name=elr",
        "scaling.num_workers=2",
        "scaling.max_failures=1",
        "store.backend=partitioned",
        "tracking.enabled=false",
    ]


def _kill_a_worker_after_first_checkpoint(run_dir: Path, address: str, killed: dict) -> None:
    """SIGKILL one live Ray Train worker once epoch 0 is checkpointed (the run is then in
    epoch 1 or 2), recording its pid and whether the run had not finished yet."""
    from ray.util.state import list_actors

    ckpts = run_dir / "ray" / "train"
    deadline = time.monotonic() + 300
    while not (ckpts / "epoch=0000").exists():
        if time.monotonic() > deadline:
            return
        time.sleep(0.05)
    actors = list_actors(
        address=address,
        filters=[("class_name", "=", "RayTrainWorker"), ("state", "=", "ALIVE")],
    )
    if actors:
        killed["finished_before"] = (ckpts / f"epoch={EPOCHS - 1:04d}").exists()
        os.kill(int(actors[-1].pid), signal.SIGKILL)
        killed["pid"] = int(actors[-1].pid)


def _table(run_dir: Path) -> pa.Table:
    return pa.Table.from_batches(list(iter_sample_stats(run_dir)))


def _column(table: pa.Table, name: str) -> np.ndarray:
    values = table[name].to_numpy(zero_copy_only=False)
    if values.dtype == object and len(values) and isinstance(values[0], np.ndarray):
        return np.stack(values)
    return values


def test_worker_killed_mid_run_restores_the_store_exactly(tmp_path, digits_root, ray_cluster):
    straight = train(load_config(_args(digits_root, tmp_path / "straight")))
    run_dir = tmp_path / "killed"
    killed: dict = {}
    address = ray_cluster.get_runtime_context().gcs_address
    killer = threading.Thread(
        target=_kill_a_worker_after_first_checkpoint, args=(run_dir, address, killed), daemon=True
    )
    killer.start()
    summary = train(load_config(_args(digits_root, run_dir)))
    killer.join(timeout=60)
    assert "pid" in killed and not killed["finished_before"], killed
    assert summary["store"]["backend"] == "partitioned"
    assert (run_dir / "sample_stats" / "index.json").exists()
    a, b = _table(tmp_path / "straight"), _table(run_dir)
    assert a.column_names == b.column_names and a.num_rows == b.num_rows
    for name in a.column_names:
        ca, cb = _column(a, name), _column(b, name)
        if ca.dtype.kind == "f":
            np.testing.assert_array_equal(ca, cb, err_msg=name)  # NaN == NaN here
        else:
            assert np.array_equal(ca, cb), name
    # Nothing applied twice: after k visits an ELR target sums to 1 - beta**k exactly once.
    sums = _column(b, "elr_target").sum(1, keepdims=True)
    visits = np.isfinite(_column(b, "loss_hist")).sum(1, keepdims=True)
    expected = 1 - 0.7 ** np.arange(1, 2 * EPOCHS + 1)
    assert np.abs(sums - expected).min(1).max() < 1e-4
    assert (visits > 0).mean() > 0.95
    for key in ("test_acc", "memorized", "label_issue_auroc"):
        assert summary[key] == straight[key], key
