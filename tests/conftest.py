"""Shared fixtures: one local Ray cluster per test session, one digits shard cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# A loaded 2-core CI machine can take longer than Ray Train's 60 s to start a worker group.
os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "300")


@pytest.fixture(scope="session")
def ray_cluster():
    """A local Ray cluster (4 logical CPUs on a 2-core machine), started once (~20-30 s)."""
    import ray

    from distnoisy.launch.cluster import ray_runtime_env

    ray.init(num_cpus=4, dashboard_host="127.0.0.1", runtime_env=ray_runtime_env())
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
    return f"sqlite:///{tmp_path / 'mlflow.db'}"
