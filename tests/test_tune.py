"""Sweeps: search-space validation, results, and a real interrupted + resumed ASHA sweep."""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from distnoisy.config import load_config
from distnoisy.core.errors import ConfigError
from distnoisy.tune import (
    Group,
    TrialRow,
    best_of,
    expand_points,
    load_spec,
    plan,
    run_sweep,
)

SPACES = Path(__file__).resolve().parent.parent / "tune_spaces"


def _space(tmp_path: Path, space: dict, **settings) -> Path:
    doc = {
        "overrides": {"method.name": "elr", "data.val_fraction": 0.1, "train.epochs": 4},
        "space": space,
        **settings,
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


# -- bad input: a clear error before any trial starts -----------------------------------------
@pytest.mark.parametrize(
    ("space", "message"),
    [
        ({"method.lamb": [1.0, 3.0]}, "unknown config key 'method.lamb' for method 'elr'"),
        ({"train.lrr": {"loguniform": [1e-4, 1e-2]}}, "unknown config key 'train.lrr'"),
        ({"method.beta": {"uniform": [0.5, 1.0]}}, "method.beta=1.0 must be in [0, 1)"),
        ({"method.lam": [3.0, -1.0]}, "method.lam=-1.0 must be >= 0"),
        ({"method.lam": {"uniform": [3.0, 1.0]}}, "range [3.0, 1.0] needs low < high"),
        ({"train.lr": {"loguniform": [0.0, 0.1]}}, "loguniform needs low > 0"),
        ({"train.epochs": [2, 2.5]}, "invalid value for 'train.epochs'"),
        ({"method.lam": {"normal": [0, 1]}}, "unknown range kind 'normal'"),
    ],
)
def test_bad_space_fails_before_anything_runs(tmp_path, mlflow_uri, space, message) -> None:
    path = _space(tmp_path, space)
    out = tmp_path / "sweep"
    with pytest.raises(ConfigError) as err:
        run_sweep(path, [f"tracking.uri={mlflow_uri}"], out)
    assert message in str(err.value)
    assert "\n" not in str(err.value)
    assert not out.exists()
    # No parent run was created: the store holds only the experiment every store starts with.
    assert [e.name for e in MlflowClient(mlflow_uri).search_experiments()] == ["Default"]


def test_bad_sweep_settings(tmp_path) -> None:
    path = _space(tmp_path, {"method.lam": [1.0]}, scheduler={"name": "hyperband"})
    with pytest.raises(ConfigError, match=r"scheduler\.name='hyperband'; valid: asha, fifo"):
        plan(load_spec(path, []), "x")
    with pytest.raises(ConfigError, match=r"invalid entry 'scheduler\.grace'"):
        load_spec(path, ["scheduler.grace=2"])
    with pytest.raises(ConfigError, match="unknown config key 'num_sample'"):
        plan(load_spec(path, ["num_sample=3", "scheduler.name=asha"]), "x")  # a config key
    typo = tmp_path / "typo.yaml"
    typo.write_text("space: {method.lam: [1.0]}\nseed: [0, 1]\n")
    with pytest.raises(ConfigError, match=r"'seed'.*Did you mean: 'seeds'\? Top-level keys: co"):
        load_spec(typo, [])
    grid_with_range = _space(tmp_path, {"train.lr": {"uniform": [1e-4, 1e-2]}})
    with pytest.raises(ConfigError, match=r"use search\.algorithm=random"):
        plan(load_spec(grid_with_range, []), "x")


def test_val_metric_needs_a_validation_set(tmp_path, digits_root) -> None:
    path = _space(tmp_path, {"method.lam": [1.0]})
    with pytest.raises(ConfigError, match="metric val_acc needs a validation set"):
        plan(load_spec(path, [f"data.root={digits_root}", "data.val_fraction=0"]), "x")
    root = f"data.root={digits_root}"
    noisy = ["metric=val_acc_noisy", root, "data.val_fraction=0.1"]
    assert plan(load_spec(path, noisy), "x").spec.metric == "val_acc_noisy"
    with pytest.raises(ConfigError, match="val_acc_noisy needs synthetic noise"):
        plan(load_spec(path, [*noisy, "noise.kind=none"]), "x")


def test_tpe_without_optuna_is_a_clear_error(tmp_path) -> None:
    pytest.importorskip("ray.tune")
    try:
        import optuna  # noqa: F401

        pytest.skip("optuna is installed")
    except ImportError:
        pass
    path = _space(tmp_path, {"method.lam": {"uniform": [1.0, 7.0]}}, search={"algorithm": "tpe"})
    with pytest.raises(ConfigError, match="needs optuna"):
        plan(load_spec(path, []), "x")


@pytest.mark.parametrize("name", ["elr", "dal_schedule", "limit"])
def test_shipped_spaces_validate(name, digits_root) -> None:
    from distnoisy.methods import METHODS

    spec = load_spec(SPACES / f"{name}.yaml", [f"data.root={digits_root}"])
    assert "docs/methods.md" in (SPACES / f"{name}.yaml").read_text()  # ranges cite their source
    if spec.overrides["method.name"] not in METHODS:
        with pytest.raises(ConfigError, match="unknown method 'limit'"):
            plan(spec, name)
        return
    sweep = plan(spec, name)
    assert sweep.points and sweep.spec.metric == "val_acc"
    assert sweep.spec.scheduler.name == "asha"


def test_random_points_are_reproducible_and_cross_grid_values(tmp_path) -> None:
    path = _space(
        tmp_path,
        {"method.lam": [1.0, 3.0], "train.lr": {"loguniform": [1e-4, 1e-2]}},
        search={"algorithm": "random", "seed": 5},
        num_samples=3,
    )
    sweep = plan(load_spec(path, []), "x")
    assert len(sweep.points) == 6
    assert [p["method.lam"] for p in sweep.points] == [1.0] * 3 + [3.0] * 3
    assert all(1e-4 <= p["train.lr"] <= 1e-2 for p in sweep.points)
    assert len({p["train.lr"] for p in sweep.points}) == 6
    assert expand_points(sweep.dims, sweep.spec) == sweep.points  # same seed, same draws


def test_best_config_is_the_best_mean_over_complete_seeds(tmp_path) -> None:
    def row(lam: float, seed: int, status: str, score: float) -> TrialRow:
        return TrialRow(f"t{lam}{seed}", {"lam": lam}, seed, status, 4, score, tmp_path, None)

    groups = [
        Group({"lam": 1.0}, [row(1.0, 0, "completed", 0.90), row(1.0, 1, "completed", 0.80)]),
        Group({"lam": 3.0}, [row(3.0, 0, "completed", 0.88), row(3.0, 1, "completed", 0.86)]),
        # The highest single score, but its other seed was stopped early: not comparable.
        Group({"lam": 7.0}, [row(7.0, 0, "completed", 0.95), row(7.0, 1, "stopped", 0.10)]),
    ]
    group, trial = best_of(groups, "max")
    assert group.point == {"lam": 3.0} and trial.seed == 0
    assert group.mean() == pytest.approx(0.87) and group.std() == pytest.approx(0.01414, abs=1e-4)
    group, _ = best_of(groups, "min")
    assert group.point == {"lam": 1.0}


# -- a real sweep on digits -------------------------------------------------------------------
def _completed(out: Path) -> set[str]:
    """Trials Tune recorded as complete (returned, or stopped by the scheduler)."""
    record = out / "completions.jsonl"
    lines = record.read_text().splitlines() if record.exists() else []
    return {json.loads(line)["trial_id"] for line in lines if line.endswith("}")}


def _finished_trials(out: Path) -> set[str]:
    """Completed trials whose run wrote its summary (ran all epochs)."""
    return {t for t in _completed(out) if (out / "trials" / t / "summary.json").exists()}


@pytest.mark.slow
def test_sweep_asha_mlflow_resume_and_best_config(tmp_path, digits_root, mlflow_uri, ray_cluster):
    """ELR lam in {0.3, 30} x 2 seeds, 4 epochs, ASHA (grace 1, factor 2) on digits with 40%
    symmetric noise (lam=30 learns far slower: ASHA stops it). The sweep driver is interrupted
    (SIGINT, like Ctrl-C) once a trial has finished, then resumed with --resume; finished trials
    must not run again."""
    path = _space(
        tmp_path,
        {"method.lam": [0.3, 30.0]},
        seeds=[0, 1],
        scheduler={"name": "asha", "grace_period": 1, "reduction_factor": 2},
        resources={"workers": 1, "driver_cpu": 0.5, "max_concurrent_trials": 2},
    )
    out = tmp_path / "sweep"
    args = [f"data.root={digits_root}", f"tracking.uri={mlflow_uri}"]
    env = dict(os.environ, RAY_ADDRESS=ray_cluster.get_runtime_context().gcs_address)
    proc = subprocess.Popen(
        [sys.executable, "-m", "distnoisy.tune", str(path), "--out", str(out), *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 400
    # Interrupt once Tune has recorded a trial that ran all its epochs.
    while not _finished_trials(out):
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "no trial finished"
        time.sleep(0.5)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "--resume" in err
    done_before = _completed(out)
    assert done_before and len(done_before) < 4
    tune_results = {t: (out / "tune" / t / "result.json").read_text() for t in done_before}

    report = run_sweep(path, [], out, resume=True)

    trials = report["trials"]
    assert len(trials) == 4
    assert {t["point"]["method.lam"] for t in trials} == {0.3, 30.0}
    # The trials that had finished before the interruption did not run again (Tune appends
    # every report of a trial to its result.json), and some ran only after the resume.
    for trial_id, text in tune_results.items():
        assert (out / "tune" / trial_id / "result.json").read_text() == text
    assert len(_completed(out)) == 4
    # Trials ASHA stopped ran 1-3 epochs, the rest all 4. Whether any was stopped depends on
    # the order of the reports: Ray Tune does not save the scheduler's state, so after --resume
    # ASHA starts with empty rungs, and when both lam=0.3 trials had finished before the
    # interruption the two lam=30 trials are compared only with each other (a CI run saw none
    # stopped; other runs stopped one or both).
    stopped = [t for t in trials if t["status"] == "stopped"]
    completed = [t for t in trials if t["status"] == "completed"]
    assert all(1 <= t["epochs"] < 4 for t in stopped)
    assert completed and all(t["epochs"] == 4 for t in completed)
    assert len(stopped) + len(completed) == 4

    # MLflow: one parent, each trial one nested run (no duplicates after the resume) with the
    # trial's resolved config as params and per-epoch metrics; none left RUNNING.
    client = MlflowClient(mlflow_uri)
    parent = client.get_run(report["parent_run_id"])
    assert parent.info.status == "FINISHED"
    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.md", "results.csv", "plot.png", "best.yaml", "results.json"} <= artifacts
    children = client.search_runs(
        [parent.info.experiment_id],
        filter_string=f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'",
    )
    assert len(children) == 4
    by_id = {c.info.run_id: c for c in children}
    for t in trials:
        run = by_id[t["mlflow_run_id"]]
        assert float(run.data.params["method.lam"]) == t["point"]["method.lam"]
        assert run.data.params["seed"] == str(t["seed"])
        assert run.data.params["train.epochs"] == "4"
        val = client.get_metric_history(run.info.run_id, "val_acc")
        assert sorted({m.step for m in val}) == list(range(t["epochs"]))
        if t["status"] == "completed":
            assert run.info.status == "FINISHED"
            assert val[-1].value == pytest.approx(t["score"])
        else:
            assert run.info.status == "KILLED"
            assert run.data.tags["distnoisy.stopped_early"] == "true"
            assert run.data.metrics["epochs_run"] == t["epochs"]

    # Mean ± std per configuration, and the best config re-runs to the reported score.
    for config in report["configs"]:
        same = [t for t in trials if t["point"] == config["point"]]
        scores = [t["score"] for t in same if t["status"] == "completed"]
        assert config["n"] == len(scores)
        if len(scores) >= 2:
            assert config["mean"] == pytest.approx(statistics.mean(scores))
            assert config["std"] == pytest.approx(statistics.stdev(scores))
    table = (out / "results.md").read_text()
    assert table.count("| 0.3 |") == table.count("| 30 |") == 1
    assert "stopped@" in table
    best = report["best"]
    assert best["mean"] > 0.5 and best["point"]["method.lam"] != 30.0
    rerun = tmp_path / "rerun"
    cfg = load_config(["--config", best["config"], f"output_dir={rerun}"])
    assert cfg.seed == best["seed"] and cfg.method.lam == best["point"]["method.lam"]
    from distnoisy.train import train

    summary = train(cfg)
    # Same seed, data, noise and worker count: the same computation, so the same accuracy (to
    # one of the 144 validation images, should float summation order ever differ).
    assert summary["val_acc"] == pytest.approx(best["score"], abs=1.01 / 144)
    assert json.loads((out / "results.json").read_text())["best"]["score"] == best["score"]
