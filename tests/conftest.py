"""Shared fixtures: one local Ray cluster per test session, one digits shard cache, and the
finished digits runs that several test modules only read (each trained once per session)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, NamedTuple

import pytest
from local_mlflow import sqlite_uri

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# A loaded 2-core CI machine can take longer than Ray Train's 60 s to start a worker group.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")

#: The per-test timeout of slow tests (pyproject's ``timeout`` is the default for the others):
#: their end-to-end runs take up to a few minutes on a 2-core machine.
SLOW_TIMEOUT_S = 900


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Slow tests get :data:`SLOW_TIMEOUT_S` unless they set their own ``timeout`` marker or
    the command line sets one for every test (``--timeout=0``: none, e.g. on a loaded machine)."""
    if config.getoption("timeout", None) is not None:
        return
    for item in items:
        if item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(SLOW_TIMEOUT_S))


class TrainedRun(NamedTuple):
    """A finished run: its directory, its MLflow tracking URI (None: untracked), its summary."""

    run_dir: Path
    uri: str | None
    summary: dict[str, Any]


def _train(root: Path, *overrides: str, tracked: bool = True) -> TrainedRun:
    from distnoisy.config import load_config
    from distnoisy.train import train

    uri = sqlite_uri(root) if tracked else None
    tracking = [f"tracking.uri={uri}"] if tracked else ["tracking.enabled=false"]
    cfg = load_config([f"output_dir={root / 'run'}", *tracking, *overrides])
    return TrainedRun(root / "run", uri, train(cfg))


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster (4 logical CPUs on a 2-core machine), started once (~20-30 s)."""
    import ray

    from distnoisy.launch.cluster import ray_runtime_env

    # "local": a cluster of the session's own, even beside one `ray start` left running here.
    ray.init(address="local", num_cpus=4, dashboard_host="127.0.0.1", runtime_env=ray_runtime_env())
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def digits_root(tmp_path_factory) -> Path:
    """Digits shards written once per session (the real scikit-learn images)."""
    from distnoisy.data.digits import prepare_digits

    root = tmp_path_factory.mktemp("digits")
    prepare_digits(root, test_fraction=0.2, seed=0, shard_size=256)
    return root


@pytest.fixture
def mlflow_uri(tmp_path) -> str:
    return sqlite_uri(tmp_path)


#: The settings of :func:`ce_run` (tests that check epoch counts read them from here).
CE_RUN_EPOCHS = 3


@pytest.fixture(scope="session")
def ce_run(tmp_path_factory, digits_root) -> TrainedRun:
    """A short real CE run on digits with a noisy validation split (10%), local launcher, one
    process, tracked in SQLite: the finished run that features, post-training, run reading and
    validation-selection tests read. None of them changes what another reads: post-training
    adds feature cache entries (keyed by the weights) and child MLflow runs; copy the run to
    change it."""
    return _train(
        tmp_path_factory.mktemp("ce_run"),
        f"data.root={digits_root}",
        "method.name=ce",
        "data.val_fraction=0.1",
        "scaling.launcher=local",
        "scaling.num_workers=1",
        f"train.epochs={CE_RUN_EPOCHS}",
    )


#: Epochs of the long runs. CE at the default settings (Adam 1e-3, 40% symmetric noise) learns the
#: clean signal first and then memorizes: in three 60-epoch seeds its training-pass memorized
#: share was 0.44-0.52 at epoch 20, 0.74-0.83 at epoch 25 and 0.92-0.96 at epoch 30, while
#: ELR's stayed at 0.01-0.02. 25 epochs show the contrast with a margin.
LONG_EPOCHS = 25


def _long_run(tmp_path_factory, digits_root: Path, method: str) -> TrainedRun:
    return _train(
        tmp_path_factory.mktemp(f"long_{method}"),
        f"data.root={digits_root}",
        f"method.name={method}",
        f"train.epochs={LONG_EPOCHS}",
        "scaling.launcher=local",
        "scaling.num_workers=1",
        tracked=False,
    )


@pytest.fixture(scope="session")
def long_ce_run(tmp_path_factory, digits_root) -> TrainedRun:
    """CE on digits for :data:`LONG_EPOCHS` (one process, untracked): long enough to memorize."""
    return _long_run(tmp_path_factory, digits_root, "ce")


@pytest.fixture(scope="session")
def long_elr_run(tmp_path_factory, digits_root) -> TrainedRun:
    """ELR on digits for :data:`LONG_EPOCHS` (one process, untracked), the same data and noise."""
    return _long_run(tmp_path_factory, digits_root, "elr")
