"""Elastic training on a real two-node Ray cluster: a node dies mid-epoch, the run goes on with
one worker from the last mid-epoch checkpoint, a new node joins, the run grows back to two
workers, and it ends where an uninterrupted run ends. And a preemption notice (a drain with a
deadline): the ranks checkpoint mid-epoch at once, Ray Train restarts without the node at the
deadline, charged to its preemption budget.

The cluster is a head and a second node started with ``ray start --address`` (two raylets,
each with its own ``--temp-dir``), one CPU each, so the two Train workers land one per node.
Runs are ``python -m distnoisy.train scaling.address=...`` subprocesses with
``scaling.num_workers=2 scaling.min_workers=1`` and ``train.checkpoint_every_steps``. The
figures measured here (time to continue, time to grow, steps redone, the difference to the
uninterrupted run) are printed with ``-s`` and recorded in docs/cluster.md.
"""

from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from local_mlflow import sqlite_uri
from local_ray import LocalRayCluster
from test_chaos import _log, _mlflow_status, _start, _wait, _wait_for, _workers

from distnoisy.engine.checkpoint import checkpoint_order

pytestmark = [
    pytest.mark.slow,
    # Whether the kill lands after a mid-epoch checkpoint and the group grows back before the
    # last epoch depends on the machine's speed; on a loaded 2-core CI machine it did not
    # (docs/cluster.md states the measured run). Opt in with DISTNOISY_ELASTIC_CHAOS=1.
    pytest.mark.skipif(
        os.environ.get("DISTNOISY_ELASTIC_CHAOS") != "1",
        reason="timing-dependent elastic chaos test; set DISTNOISY_ELASTIC_CHAOS=1 to run it",
    ),
]

# Enough epochs after the kill (in epoch 1) for the new node to join and the group to grow
# back before the run ends: on an idle 2-core machine an epoch takes about 1.5 s on two
# workers, and a restart to grow 20-40 s.
EPOCHS = 60
EVERY = 4  # digits, global batch 64: 22 optimizer steps per epoch, checkpoints at 4, 8, ..., 20
STEPS_PER_EPOCH = 22
ELASTIC = (
    f"train.epochs={EPOCHS}",
    "scaling.min_workers=1",
    "scaling.max_failures=2",
    f"train.checkpoint_every_steps={EVERY}",
    "scaling.resize_interval_s=5",
)
MEASURED: list[str] = []


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    c = LocalRayCluster(tmp_path_factory.mktemp("ray-elastic"), head_cpus=1)
    try:
        c.add_node("node2", cpus=1)
        yield c
    finally:
        c.stop()
        for line in MEASURED:
            print(f"elastic | {line}")


def _checkpoints(run_dir: Path) -> list[str]:
    root = run_dir / "ray" / "train"
    names = [p.name for p in root.glob("epoch=*") if (p / "state.pt").exists()]
    return sorted(names, key=checkpoint_order)


def _recorded(run_dir: Path) -> str | None:
    """The newest checkpoint Ray Train has recorded (what a restart resumes from): its
    controller records a worker's report when it next polls the workers (every 2 s), so a
    checkpoint on disk may not be recorded yet."""
    path = run_dir / "ray" / "train" / "checkpoint_manager_snapshot.json"
    try:
        latest = json.loads(path.read_text())["latest_checkpoint_result"]
    except (OSError, ValueError, KeyError, TypeError):  # not there yet, or being rewritten
        return None
    return latest["checkpoint_dir_name"] if latest else None


def _steps_done(name: str) -> int:
    """Optimizer steps of the run before checkpoint ``name`` (epoch ``e`` ends at ``e + 1``
    epochs' worth; ``epoch=E-step=S`` is S steps into epoch E)."""
    epoch, step = checkpoint_order(name)
    return STEPS_PER_EPOCH * epoch + (STEPS_PER_EPOCH if step == float("inf") else int(step))


def _group_sizes(run_dir: Path) -> list[int]:
    return [
        int(n) for n in re.findall(r"Started training worker group of size (\d+)", _log(run_dir))
    ]


def _resumed_at(run_dir: Path) -> list[str]:
    return re.findall(r"resumed from \S*/(epoch=\S+) at epoch", _log(run_dir))


def _stats(run_dir: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(run_dir / "sample_stats.parquet")
    out = {}
    for name in table.column_names:
        values = table[name].to_numpy(zero_copy_only=False)
        out[name] = np.stack(values) if values.dtype == object else values
    return out


def test_node_lost_mid_epoch_shrinks_then_grows_back(cluster, digits_root, tmp_path):
    reference, run_dir = tmp_path / "reference", tmp_path / "elastic"
    uri = sqlite_uri(tmp_path)
    assert _wait(_start(cluster, reference, digits_root, uri, *ELASTIC), 900) == 0, _log(reference)

    proc = _start(cluster, run_dir, digits_root, uri, *ELASTIC)
    _wait_for(lambda: "epoch=0000" in _checkpoints(run_dir), 600, "epoch 0's checkpoint", proc)
    workers = _workers(cluster)
    assert len(workers) == 2 and len({w["node_id"] for w in workers}) == 2  # one per node
    # Kill once Ray Train has recorded a mid-epoch checkpoint (one on disk alone would not be
    # resumed from if the controller had not polled the workers since), in epoch 1 or later:
    # listing the workers takes a second or two, an epoch about as long.
    last = _wait_for(
        lambda: (r := _recorded(run_dir)) and "-step=" in r and checkpoint_order(r)[0] >= 1 and r,
        600, "a recorded mid-epoch checkpoint", proc, 0.02,
    )  # fmt: skip
    t_ckpt = time.monotonic()
    cluster.kill_node("node2")
    t_kill = time.monotonic()
    at_kill = _checkpoints(run_dir)[-1]  # the newest on disk; the next one is not there

    # The run goes on with one worker, from the last checkpoint written before the kill.
    _wait_for(lambda: 1 in _group_sizes(run_dir), 300, "a worker group of size 1", proc)
    _wait_for(lambda: _resumed_at(run_dir), 300, "the resumed run", proc)
    t_shrunk = time.monotonic() - t_kill
    resumed = _resumed_at(run_dir)[0]
    assert "-step=" in resumed
    # From the newest checkpoint Ray Train had recorded: at least the one seen recorded, at
    # most the newest on disk. The steps after it were trained again: those up to the newest
    # on disk (written but not yet recorded) and fewer than EVERY after that.
    steps = {n: _steps_done(n) for n in (last, resumed, at_kill)}
    assert steps[last] <= steps[resumed] <= steps[at_kill], (last, resumed, at_kill)
    unrecorded = steps[at_kill] - steps[resumed]
    redone = f"{unrecorded} + fewer than {EVERY} (from {resumed}; newest on disk {at_kill})"

    # Capacity comes back: the run grows to two workers again (and resumes once more).
    t_add = time.monotonic()
    cluster.add_node("node3", cpus=1)
    _wait_for(lambda: _group_sizes(run_dir)[-1:] == [2], 300, "growing back to 2", proc)
    t_grown = time.monotonic() - t_add
    assert _wait(proc, 900) == 0, _log(run_dir)
    assert _group_sizes(run_dir) == [2, 1, 2], _group_sizes(run_dir)
    assert _mlflow_status(uri, run_dir) == "FINISHED"
    regrown_from = _resumed_at(run_dir)[1]

    # Every sample trained exactly once per epoch: the same visits as the uninterrupted run,
    # one loss-history entry each, and steps * global batch of them per epoch.
    a, b = _stats(reference), _stats(run_dir)
    visited_a, visited_b = np.isfinite(a["loss_hist"]), np.isfinite(b["loss_hist"])
    assert (visited_a == visited_b).all()
    assert (visited_b.sum(axis=0) == STEPS_PER_EPOCH * 64).all()
    assert ((b["pred_hist"] >= 0) == visited_b).all()

    # The figures: equal up to float summation order (DDP over 2 ranks vs 1 for a while).
    sa, sb = (json.loads((d / "summary.json").read_text()) for d in (reference, run_dir))
    diffs = {k: abs(sa[k] - sb[k]) for k in ("test_acc", "memorized", "label_issue_auroc")}
    diffs["train_loss (max over epochs)"] = max(
        abs(ha["train_loss"] - hb["train_loss"])
        for ha, hb in zip(sa["history"], sb["history"], strict=True)
    )
    for name in ("loss_hist", "margin_hist", "final_prob"):
        diffs[f"{name} (max abs)"] = float(np.nanmax(np.abs(a[name] - b[name])))
    flips = int((a["pred_hist"] != b["pred_hist"]).sum())
    MEASURED.extend(
        [
            f"killed node 2 {t_kill - t_ckpt:.2f} s after Ray Train recorded {last}; newest on "
            f"disk then {at_kill}",
            f"continued on 1 worker from {resumed}: {t_shrunk:.1f} s after the kill",
            f"grew back to 2 workers from {regrown_from}: {t_grown:.1f} s after node 3 started",
            f"steps redone after the failure: {redone}",
            "difference to the uninterrupted run: "
            + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items())
            + f", training predictions that differ: {flips} of {b['pred_hist'].size}",
        ]
    )
    # The bound is 2 minutes; on this shared machine (load average 30-40 on 2 cores)
    # Ray's detection of the dead node and a start-up attempt at the old size come first.
    assert t_shrunk < 180, t_shrunk
    # The run's figures agree; per-sample values drift further: a different float summation
    # order for a while (one rank's mean gradient instead of the average of two) is amplified
    # by every later step, as any change of rounding would be (recorded, bounded loosely).
    # Measured on an idle 2-core machine, two runs of 60 epochs (50-55 of them after the
    # resize): test accuracy 0 and 2.8e-3 apart (0 and 1 of 360 images), memorized 3.6e-3 and
    # 7.1e-3, label-issue AUROC 4.6e-4 and 1.3e-3; the training loss (about -16 by the end)
    # 0.6-0.7% of it; 0.33-0.35% of the training predictions differ.
    for key in ("test_acc", "memorized"):  # 2% = 7.2 of the 360 test images
        assert diffs[key] < 2e-2, diffs
    assert diffs["label_issue_auroc"] < 5e-3, diffs
    loss_scale = max(abs(h["train_loss"]) for h in sa["history"])
    assert diffs["train_loss (max over epochs)"] < 0.02 * loss_scale, diffs
    assert flips <= b["pred_hist"].size // 100, flips


def test_preemption_notice_checkpoints_before_the_node_goes(cluster, digits_root, tmp_path):
    """A drained node (Ray's preemption notice) makes the ranks checkpoint mid-epoch at once,
    though no periodic mid-epoch checkpoint is configured; Ray Train restarts the group at the
    deadline, the cloud takes the node soon after, and the run goes on on one worker from that
    checkpoint or a newer one, the node's loss charged to Ray Train's preemption budget."""
    run_dir = tmp_path / "drained"
    if len(cluster.nodes) < 2:  # the test before lost its node and did not get to add one
        cluster.add_node("node5", cpus=1)
    uri = sqlite_uri(tmp_path)
    proc = _start(
        cluster, run_dir, digits_root, uri, f"train.epochs={EPOCHS}", "scaling.min_workers=1",
        "scaling.max_failures=1", "scaling.resize_interval_s=5",
    )  # fmt: skip
    _wait_for(lambda: "epoch=0000" in _checkpoints(run_dir), 600, "epoch 0's checkpoint", proc)
    head = cluster.head_node_id()
    (other,) = {w["node_id"] for w in _workers(cluster)} - {head}
    (name,) = [n for n in cluster.nodes if n != "head"]  # the one worker node there is
    # The drain's deadline comes before the reclaim, as in docs/cluster.md (110 s of a 120 s
    # notice): Ray Train restarts once the deadline has passed (its controller polls every 2 s);
    # a node that dies before that is an ordinary failure, charged to scaling.max_failures.
    deadline_s, reclaim_s = 20, 28
    t_drain = time.monotonic()
    cluster.drain_node(other, deadline_s)
    # Ray Train's watcher polls the drains every 5 s; the ranks agree on it every 10 steps.
    notice_ckpt = _wait_for(
        lambda: next((n for n in _checkpoints(run_dir) if "-step=" in n), None),
        deadline_s, "a checkpoint on the preemption notice", proc, 0.05,
    )  # fmt: skip
    t_notice = time.monotonic() - t_drain
    assert checkpoint_order(notice_ckpt)[1] % 10 == 0, notice_ckpt
    time.sleep(max(0.0, reclaim_s - (time.monotonic() - t_drain)))
    # The cloud takes the node (Ray may have shut the drained node down already, once the
    # restart had moved its worker away).
    cluster.kill_node(name, gone_ok=True)

    _wait_for(lambda: 1 in _group_sizes(run_dir), 300, "a worker group of size 1", proc)
    assert _wait(proc, 900) == 0, _log(run_dir)
    # Ray Train keeps the group training until the deadline, so the restart resumes from the
    # notice checkpoint or a newer one recorded since (the notice's checkpoint is the floor).
    resumed = _resumed_at(run_dir)[0]
    assert _steps_done(resumed) >= _steps_done(notice_ckpt), (resumed, notice_ckpt)
    assert "preemption notice: checkpointing at optimizer step" in _log(run_dir)
    # Ray Train's restart at the deadline, charged to its preemption budget; a first start-up
    # at the old size may time out before (Ray still counts the drained node's CPUs): that one
    # is the controller failure scaling.max_failures=1 allows.
    assert "Source: preemption" in _log(run_dir)
    assert "Source: worker group" not in _log(run_dir)
    assert _mlflow_status(uri, run_dir) == "FINISHED"
    visited = np.isfinite(_stats(run_dir)["loss_hist"])
    assert (visited.sum(axis=0) == STEPS_PER_EPOCH * 64).all()
    MEASURED.append(
        f"preemption notice (drain with a {deadline_s} s deadline): checkpoint {notice_ckpt} "
        f"{t_notice:.1f} s after the drain; resumed on 1 worker from {resumed}, FINISHED"
    )
