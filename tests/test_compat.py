"""The internals of Ray, MLflow and torch that distnoisy relies on exist on the installed
versions, in the shape the compat modules expect (``distnoisy/launch/ray_compat.py``,
``distnoisy/tracking/mlflow_compat.py``, ``distnoisy/data/torch_compat.py``).

An upgrade that removes or renames one fails a test here, by name, instead of changing what a
run does. Where a compat function has a fallback, a test takes the internal away and checks
that the fallback is loud (one warning) and cannot hang.
"""

from __future__ import annotations

import inspect
import logging
import signal
import threading
import time

import pytest
import torch
from local_mlflow import sqlite_uri

from distnoisy.config import load_config
from distnoisy.core.errors import DataError, DistnoisyError
from distnoisy.data import torch_compat
from distnoisy.launch import ray_compat
from distnoisy.tracking import mlflow_compat


def _params(fn) -> list[str]:
    return list(inspect.signature(fn).parameters)


def _warnings(caplog) -> list[str]:
    """distnoisy's warnings (the libraries log at INFO into the same capture)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name.startswith("distnoisy") and r.levelno >= logging.WARNING
    ]


@pytest.fixture
def fresh_warnings(monkeypatch):
    """Each test sees the compat modules' warn-once state empty."""
    monkeypatch.setattr(ray_compat, "_warned", set())
    monkeypatch.setattr(torch_compat, "_warned", False)


# -- Ray: the cluster's node object ------------------------------------------------------------
def test_ray_node_internals_exist_on_the_local_cluster(ray_cluster, fresh_warnings, caplog):
    import ray._private.worker as ray_worker

    node = ray_worker._global_node
    assert node is not None, "ray._private.worker._global_node is None in the driver"
    assert callable(node.is_head) and _params(node.is_head) == []
    assert node.is_head() is True
    assert node._ray_params.autoscaling_config is None  # ray.init(): no autoscaler
    with caplog.at_level(logging.WARNING, logger="distnoisy"):
        assert ray_compat.cluster_can_grow() is False
    assert not _warnings(caplog)


def _gpu_config():
    return load_config(["scaling.use_gpu=true", "scaling.num_workers=2"])


def _check_fails_fast(cfg) -> str:
    from distnoisy.launch.cluster import check_ray_resources

    t0 = time.monotonic()
    with pytest.raises(DistnoisyError) as err:
        check_ray_resources(cfg, poll_s=0.1)
    assert time.monotonic() - t0 < 10
    return str(err.value)


def test_gpu_check_fails_fast_on_the_local_cluster(ray_cluster, fresh_warnings, caplog):
    assert not ray_cluster.cluster_resources().get("GPU")
    cfg = _gpu_config()
    assert cfg.scaling.resource_timeout_s == 600  # what a cluster that may grow gets
    with caplog.at_level(logging.WARNING, logger="distnoisy"):
        message = _check_fails_fast(cfg)
    assert "needs 2 GPU, but the Ray cluster has 0 GPU and cannot grow" in message
    assert "\n" not in message
    assert not _warnings(caplog)  # neither a compat warning nor "waiting up to 600 s"


def test_without_the_node_internals_the_gpu_check_still_fails_fast(
    ray_cluster, fresh_warnings, monkeypatch, caplog
):
    """What a Ray that renamed ``_global_node`` does: one warning, then the one-line error at
    once (a guess of "may grow" would be a silent 600 s wait)."""
    import ray._private.worker as ray_worker

    monkeypatch.delattr(ray_worker, "_global_node")
    with caplog.at_level(logging.WARNING, logger="distnoisy"):
        message = _check_fails_fast(_gpu_config())
        assert ray_compat.cluster_can_grow() is False  # warned once only
    assert "cannot grow" in message
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "ray._private.worker._global_node" in warnings[0]
    assert "treating it as fixed" in warnings[0]


# -- Ray: the cluster `ray start` left on this machine -----------------------------------------
def _bootstrap_file(root, address: str) -> None:
    """What ``ray start`` writes where ``RAY_TMPDIR=root`` points Ray's default directory."""
    (root / "ray").mkdir(exist_ok=True)
    (root / "ray" / "ray_current_cluster").write_text(address)


def test_a_live_cluster_ray_start_named_is_joined_and_local_starts_one(
    ray_cluster, tmp_path, monkeypatch
):
    from distnoisy.launch.cluster import cluster_to_join

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert ray_compat.started_cluster_address() is None  # no file: start a local cluster
    assert cluster_to_join(None) is None
    live = ray_cluster.get_runtime_context().gcs_address  # a GCS serving on this machine
    _bootstrap_file(tmp_path, live)
    assert ray_compat.started_cluster_address() == live
    # Joined as Ray finds it ("auto"), so that Ray sends the token `ray start` wrote.
    assert cluster_to_join(None) == (
        "auto",
        f"the Ray cluster `ray start` started on this machine ({live})",
    )
    assert cluster_to_join("local") is None  # a cluster of the run's own, whatever is running
    assert cluster_to_join("10.0.0.1:6379") == ("10.0.0.1:6379", "scaling.address=10.0.0.1:6379")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.2:6379")
    assert cluster_to_join(None) == ("10.0.0.2:6379", "RAY_ADDRESS=10.0.0.2:6379")


def test_a_file_left_by_a_dead_cluster_names_no_cluster(tmp_path, monkeypatch, fresh_warnings):
    """``ray start``'s address file outlives a cluster killed without ``ray stop``: joining it
    would wait on a dead address."""
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    _bootstrap_file(tmp_path, "127.0.0.1:1")
    assert ray_compat.started_cluster_address() is None


def test_without_the_bootstrap_internals_a_local_cluster_is_started_after_a_warning(
    tmp_path, monkeypatch, fresh_warnings, caplog
):
    import ray._private.services as services

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delattr(services, "find_bootstrap_address")
    with caplog.at_level(logging.WARNING, logger="distnoisy"):
        assert ray_compat.started_cluster_address() is None
        assert ray_compat.started_cluster_address() is None
    warnings = _warnings(caplog)
    assert len(warnings) == 1 and "find_bootstrap_address" in warnings[0], warnings
    assert "give scaling.address" in warnings[0]


# -- Ray Train ---------------------------------------------------------------------------------
def test_train_sigint_hook_exists_and_is_called_by_fit():
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    hook = TorchTrainer._register_sigint_handler
    assert callable(hook) and _params(hook) == ["self", "controller"]
    # fit() installs Ray's handler through it (in the main thread); if Ray stopped calling it,
    # the override would never run and a Ctrl-C would go unnoticed.
    source = inspect.getsource(DataParallelTrainer._initialize_and_run_controller)
    assert "self._register_sigint_handler(controller)" in source
    assert issubclass(ray_compat.sigint_noting_trainer(), TorchTrainer)


def test_sigint_during_fit_is_noted_and_reaches_rays_handler(ray_cluster, fresh_warnings):
    """The override wraps Ray's own handler: Ctrl-C sets ``interrupted`` and Ray's handler
    still aborts the run through the controller (here a small actor with ``abort()``)."""
    import ray
    import ray.train

    @ray.remote(num_cpus=0)
    class Controller:
        def __init__(self) -> None:
            self.aborted = False

        def abort(self) -> None:
            self.aborted = True

        def was_aborted(self) -> bool:
            return self.aborted

    assert threading.current_thread() is threading.main_thread()
    trainer = ray_compat.sigint_noting_trainer()(
        lambda: None, scaling_config=ray.train.ScalingConfig(num_workers=1)
    )
    controller = Controller.remote()
    previous = signal.getsignal(signal.SIGINT)
    try:
        trainer._register_sigint_handler(controller)
        assert trainer.sigint_hooked and not trainer.interrupted
        signal.getsignal(signal.SIGINT)(signal.SIGINT, None)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert trainer.interrupted
    assert ray.get(controller.was_aborted.remote())


def test_missing_sigint_hook_is_a_warning_not_a_silent_change(fresh_warnings, monkeypatch, caplog):
    from ray.train.torch import TorchTrainer
    from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

    class NotHooked:  # a fit() during which Ray never called the hook
        sigint_hooked = False

    with caplog.at_level(logging.WARNING, logger="distnoisy"):
        ray_compat.check_sigint_hooked(NotHooked())
        monkeypatch.delattr(DataParallelTrainer, "_register_sigint_handler")
        plain = ray_compat.sigint_noting_trainer()
    assert issubclass(plain, TorchTrainer) and plain.interrupted is False
    warnings = _warnings(caplog)
    assert len(warnings) == 2, warnings
    assert all("_register_sigint_handler" in w and "interrupt line" in w for w in warnings)


def test_train_report_logger_is_named_by_its_file_and_gets_quiet(fresh_warnings, caplog):
    from ray.train.v2._internal.execution import context as train_context

    logger = train_context.logger
    assert isinstance(logger, logging.Logger)
    # Why ray_compat needs it: "ray.train"'s level does not reach a logger named by a path.
    assert not logger.name.startswith("ray.train")
    logger.setLevel(logging.NOTSET)
    with caplog.at_level(logging.WARNING, logger="distnoisy"):
        ray_compat.quiet_train_report_log()
    assert logger.level == logging.WARNING
    assert not _warnings(caplog)


def test_the_cleaner_warning_is_named_as_ray_logs_it_and_shown_once(caplog):
    """The logger name and the message ``quiet_cleaner_repeats`` filters are Ray's own: a
    rename would silently bring back the once-a-second warning, so this fails instead."""
    import inspect

    from ray.train.v2._internal.execution.controller import placement_group_cleaner as pgc

    assert pgc.logger is logging.getLogger(ray_compat.CLEANER_LOGGER)
    assert ray_compat.CLEANER_UNAVAILABLE in inspect.getsource(pgc.PlacementGroupCleaner)
    for f in list(pgc.logger.filters):  # a fresh process's logger
        pgc.logger.removeFilter(f)
    ray_compat.quiet_cleaner_repeats()
    ray_compat.quiet_cleaner_repeats()  # once per process, however often the hook runs
    assert sum(isinstance(f, ray_compat._FirstOnly) for f in pgc.logger.filters) == 1
    with caplog.at_level(logging.WARNING, logger=ray_compat.CLEANER_LOGGER):
        for _ in range(5):
            pgc.logger.warning(
                "Failed to query Ray Train Controller actor state. State API may be temporarily "
                "unavailable. Continuing to monitor."
            )
        pgc.logger.warning("Controller actor died; removing its placement group")
    messages = [r.getMessage() for r in caplog.records if r.name == ray_compat.CLEANER_LOGGER]
    assert len(messages) == 2, messages
    assert messages[0].endswith("(repeats while the State API is unavailable, e.g. no dashboard; "
                                "shown once)")  # fmt: skip
    assert messages[1] == "Controller actor died; removing its placement group"


def test_worker_failures_hold_what_the_worker_raised():
    """Ray Train builds a ``WorkerGroupError`` from its workers' statuses (a worker's
    exception arrives wrapped with its traceback text); ``worker_failures`` (public) must hold
    the exception itself, which is what ``_user_error`` looks for."""
    from ray.train.v2._internal.exceptions import UserExceptionWithTraceback
    from ray.train.v2._internal.execution.worker_group.poll import (
        WorkerGroupPollStatus,
        WorkerStatus,
    )

    from distnoisy.launch.ray_train import _user_error

    bad = DataError("1 unusable training samples, more than data.max_bad_fraction")
    statuses = {
        0: WorkerStatus(running=False, error=UserExceptionWithTraceback(bad, "Traceback ...")),
        1: WorkerStatus(running=False, error=ValueError("a collective failed")),
    }
    err = WorkerGroupPollStatus(worker_statuses=statuses).get_worker_group_error()
    assert err.worker_failures[0] is bad
    assert _user_error(err) is bad
    other = WorkerGroupPollStatus(worker_statuses={1: statuses[1]}).get_worker_group_error()
    assert _user_error(other) is other


def test_a_dead_worker_is_recognised_through_rays_health_check_wrapper(fresh_warnings, caplog):
    from ray.exceptions import RayActorError
    from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError

    died = WorkerHealthCheckFailedError("health check failed", RayActorError())
    assert isinstance(died.health_check_failure, RayActorError)
    with caplog.at_level(logging.WARNING, logger="distnoisy"):
        assert ray_compat.worker_died(died)
        assert ray_compat.worker_died(RayActorError())
        assert not ray_compat.worker_died(ValueError("in the training code"))
        assert not ray_compat.worker_died(WorkerHealthCheckFailedError("m", ValueError("x")))
    assert not _warnings(caplog)


def test_preemption_context_internal_exists_and_is_what_the_public_api_reads():
    import dataclasses

    from ray.train.v2._internal.execution import context, train_fn_utils
    from ray.train.v2._internal.execution.preemption import PreemptionContext

    assert "preemption_context" in {f.name for f in dataclasses.fields(context.TrainContext)}
    assert PreemptionContext().preemption_info is None  # None until a notice arrives
    # ray.train.get_preemption_info() broadcasts this same attribute from rank 0.
    source = inspect.getsource(train_fn_utils.DistributedTrainFnUtils.get_preemption_info)
    assert "preemption_context.preemption_info" in source


def test_preemption_reader_outside_a_train_worker_warns_and_reads_no_notice(fresh_warnings, caplog):
    with caplog.at_level(logging.WARNING, logger="distnoisy"):
        notice = ray_compat.preemption_notice_reader()
    assert notice() is False
    (line,) = _warnings(caplog)
    assert "TrainContext.preemption_context" in line


# -- Ray Tune ----------------------------------------------------------------------------------
def test_tune_public_api_for_trials_exists():
    from ray import tune
    from ray.tune import ResultGrid

    params = _params(tune.ExperimentAnalysis)
    assert params[0] == "experiment_checkpoint_path" and "storage_filesystem" in params
    assert isinstance(ResultGrid.experiment_path, property)
    assert isinstance(ResultGrid.filesystem, property)


@pytest.mark.slow
def test_tune_trials_have_status_config_and_last_result(ray_cluster, tmp_path):
    from ray import tune

    def trainable(config):
        for i in range(2):
            if config["fail"] and i == 1:
                raise ValueError("trial fails at its second step")
            tune.report({"step": i + 1})

    tuner = tune.Tuner(
        trainable,
        param_space={"fail": tune.grid_search([False, True])},
        run_config=tune.RunConfig(name="compat", storage_path=str(tmp_path), verbose=0),
    )
    grid = tuner.fit()
    trials = ray_compat.tune_trials(grid)
    by_fail = {t.config["fail"]: t for t in trials}
    assert len(trials) == 2 and set(by_fail) == {False, True}
    assert by_fail[False].status == "TERMINATED" and by_fail[False].last_result["step"] == 2
    assert by_fail[True].status == "ERROR" and by_fail[True].last_result["step"] == 1
    assert all(t.trial_id for t in trials)


# -- MLflow ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One SQLite store for this module's MLflow tests (creating one takes seconds)."""
    return sqlite_uri(tmp_path_factory.mktemp("mlflow"))


def test_system_metrics_monitor_internals_exist(store_uri):
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    from distnoisy import tracking

    run_id = tracking.start_run(store_uri, "compat", "compat", {})
    monitor = SystemMetricsMonitor(run_id, tracking_uri=store_uri)
    assert mlflow_compat.missing_internals(monitor) == []
    assert _params(monitor.publish_metrics) == ["metrics"]
    assert _params(monitor.collect_metrics) == [] == _params(monitor.aggregate_metrics)
    assert isinstance(monitor.aggregate_metrics(), dict)
    assert _params(SystemMetricsMonitor)[:1] == ["run_id"]
    assert {"tracking_uri", "resume_logging"} <= set(_params(SystemMetricsMonitor))
    tracking.end_run(store_uri, run_id, "FINISHED")


def test_a_short_run_gets_its_last_system_metrics(store_uri, monkeypatch):
    """Stopped before one sampling interval (10 s): the partial interval is still logged."""
    from distnoisy import tracking

    monkeypatch.delenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", raising=False)
    run_id = tracking.start_run(store_uri, "compat", "compat", {})
    monitor = tracking.start_system_metrics(store_uri, run_id)
    assert monitor.sampling_interval >= 10
    tracking.stop_system_metrics(monitor)
    cpu = tracking._client(store_uri).get_metric_history(
        run_id, "system/cpu_utilization_percentage"
    )
    assert [m.step for m in cpu] == [0]
    tracking.end_run(store_uri, run_id, "FINISHED")


def test_a_monitor_without_the_internals_warns_and_does_not_raise(store_uri, monkeypatch, caplog):
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    from distnoisy import tracking

    run_id = tracking.start_run(store_uri, "compat", "compat", {})
    monitor = tracking.start_system_metrics(store_uri, run_id)
    monkeypatch.delattr(SystemMetricsMonitor, "publish_metrics")
    with caplog.at_level(logging.WARNING, logger="distnoisy"):
        tracking.stop_system_metrics(monitor)
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "lacks publish_metrics" in warnings[0]
    tracking.end_run(store_uri, run_id, "FINISHED")


# -- torch -------------------------------------------------------------------------------------
def test_untyped_storage_new_shared_exists():
    new_shared = torch.UntypedStorage._new_shared
    assert callable(new_shared) and _params(new_shared)[:1] == ["size"]
    storage = new_shared(24)
    assert isinstance(storage, torch.UntypedStorage) and storage.nbytes() == 24
    assert storage.is_shared()


class _SharedBatches(torch.utils.data.Dataset):
    def __len__(self) -> int:
        return 2

    def __getitem__(self, i: int):
        t = torch_compat.new_shared_tensor((3, 4, 5), torch.float32)
        t.copy_(torch.arange(60, dtype=torch.float32).view(3, 4, 5) + i)
        return t, t.is_shared()


@pytest.mark.parametrize("dtype", [torch.float32, torch.uint8])
def test_new_shared_tensor_is_shared_and_writable(dtype, fresh_warnings, caplog):
    with caplog.at_level(logging.WARNING, logger="distnoisy"):
        t = torch_compat.new_shared_tensor((4, 3, 2), dtype)
    assert not _warnings(caplog)
    assert t.shape == (4, 3, 2) and t.dtype == dtype and t.is_contiguous()
    assert t.is_shared() and t.untyped_storage().nbytes() == 24 * t.element_size()
    t.copy_(torch.arange(24).view(4, 3, 2).to(dtype))
    assert t[3, 2, 1].item() == 23


def test_a_loader_worker_batch_arrives_from_shared_memory():
    """Filled in a loader process, in shared memory there, equal in the main process."""
    loader = torch.utils.data.DataLoader(_SharedBatches(), batch_size=None, num_workers=1)
    got = list(loader)
    for i, (t, shared_in_worker) in enumerate(got):
        assert shared_in_worker and t.is_shared()
        assert torch.equal(t, torch.arange(60, dtype=torch.float32).view(3, 4, 5) + i)


def test_without_new_shared_a_batch_is_still_shared_after_one_warning(
    fresh_warnings, monkeypatch, caplog
):
    monkeypatch.setattr(torch.UntypedStorage, "_new_shared", None)
    with caplog.at_level(logging.WARNING, logger="distnoisy"):
        a = torch_compat.new_shared_tensor((2, 3), torch.float32)
        b = torch_compat.new_shared_tensor((2, 3), torch.uint8)
    assert a.is_shared() and b.is_shared() and a.shape == b.shape == (2, 3)
    warnings = _warnings(caplog)
    assert len(warnings) == 1, warnings
    assert "torch.UntypedStorage._new_shared" in warnings[0]
