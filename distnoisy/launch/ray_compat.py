"""Every use distnoisy makes of Ray's internals, in one place, written against Ray 2.60.

Each function below says which internal it reads and why no public API does the job. When an
upgrade removes or renames one, ``tests/test_compat.py`` fails naming it; at run time the
function either raises :class:`RayCompatError` or, where a fallback is safe, logs one warning
that names the internal and takes the fallback that cannot hang or hide an error. Nothing here
silently changes what a run does.

Ray is imported inside the functions: importing this module must stay cheap (it is imported by
the driver before Ray is needed).
"""

from __future__ import annotations

import logging
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

from distnoisy.core.errors import DistnoisyError

log = logging.getLogger(__name__)

#: The Ray release these internals were read from.
WRITTEN_FOR = "2.60"

_warned: set[str] = set()


class RayCompatError(DistnoisyError):
    """The installed Ray lacks an internal that distnoisy cannot do without."""


def _ray_version() -> str:
    import ray

    return str(getattr(ray, "__version__", "?"))


def _warn_once(key: str, what: str, consequence: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    log.warning(
        "Ray %s lacks %s (distnoisy is written for Ray %s): %s",
        _ray_version(),
        what,
        WRITTEN_FOR,
        consequence,
    )


# -- the cluster: may it add nodes? ------------------------------------------------------------
def cluster_can_grow() -> bool:
    """Whether the connected Ray cluster may add nodes.

    False for a cluster this process started with ``ray.init()`` without an address and without
    an autoscaling config (a fixed set of local resources); True when this process joined a
    cluster (a non-head node object) or is a Ray client (no node object at all), where an
    autoscaler may add nodes.

    No public API says either thing in Ray 2.60: ``ray.init()``'s return value is not kept by
    whoever started Ray (the tests' shared cluster, a Tune trial), the runtime context has no
    "started here" flag, and Ray Train's own check (``ray._private.state
    .get_max_resources_from_cluster_config``) is private too. So this reads the process's node
    object, ``ray._private.worker._global_node``: ``is_head()`` and
    ``_ray_params.autoscaling_config``.

    Without those internals the cluster is treated as fixed, after one warning: the caller only
    asks when the cluster already lacks the resources, and waiting on a guess is exactly the
    silent ``scaling.resource_timeout_s`` wait (600 s) this check exists to prevent; failing at
    once names the shortfall and the warning names the cause.
    """
    fixed = (
        "cannot tell whether the cluster may add nodes; treating it as fixed, so missing "
        "resources fail now instead of being waited for"
    )
    try:
        import ray._private.worker as ray_worker

        node = ray_worker._global_node
    except (ImportError, AttributeError) as e:
        _warn_once("global_node", f"ray._private.worker._global_node ({e})", fixed)
        return False
    if node is None:  # a Ray client (ray://): the cluster is elsewhere and may grow
        return True
    try:
        if not node.is_head():  # joined an existing cluster
            return True
        return bool(node._ray_params.autoscaling_config)
    except AttributeError as e:
        _warn_once("node_params", f"Node.is_head() or Node._ray_params ({e})", fixed)
        return False


# -- the cluster `ray start` left running on this machine ---------------------------------------
def started_cluster_address() -> str | None:
    """The address of the cluster ``ray start`` last started on this machine, if it still runs.

    ``ray.init()`` without an address joins that cluster, and then refuses the ``num_cpus`` that
    starting a local one needs (a ValueError): a command must know beforehand which of the two it
    does. No public API says. ``ray start`` writes the address to ``ray_current_cluster`` in
    Ray's temporary directory (``$RAY_TMPDIR/ray``, else ``/tmp/ray``); this reads it with
    ``ray._private.services.find_bootstrap_address`` and keeps it only if a GCS process on this
    machine serves it (``find_gcs_addresses``): a cluster killed without ``ray stop`` leaves the
    file behind, and joining it would wait on a dead address.

    Without those internals, after one warning: None. The command then starts a cluster of its
    own (``ray.init(address="local")``) instead of joining: a second cluster, not an error.
    """
    try:
        from ray._private.services import find_bootstrap_address, find_gcs_addresses
    except ImportError as e:
        _warn_once(
            "bootstrap_address",
            f"ray._private.services.find_bootstrap_address or find_gcs_addresses ({e})",
            "a cluster `ray start` started on this machine is not joined; give scaling.address",
        )
        return None
    address = find_bootstrap_address(None)
    if not address:
        return None
    return address if address in find_gcs_addresses() else None


# -- Ray Train: preemption notices ------------------------------------------------------------
def preemption_notice_reader() -> Callable[[], bool]:
    """A cheap, local test of whether Ray Train has a preemption notice for this worker group.

    Reads ``TrainContext.preemption_context.preemption_info``
    (``ray.train.v2._internal.execution.context``), which Ray Train's preemption watcher sets
    on every worker when a node of the group starts draining. The public
    ``ray.train.get_preemption_info()`` reads the same value but is a barrier through Ray's
    controller on every call, too slow to poll between training steps; the trainer agrees
    across ranks with its own all-reduce instead. Without the internal: no notices (a warning),
    the run still recovers from the last periodic checkpoint.
    """
    try:
        from ray.train.v2._internal.execution.context import get_train_context

        holder = get_train_context().preemption_context
        holder.preemption_info  # noqa: B018 (the attribute must exist)
    except (ImportError, AttributeError, RuntimeError) as e:
        _warn_once(
            "preemption_context",
            f"TrainContext.preemption_context ({e})",
            "no checkpoint on a preemption notice; recovery uses the last periodic checkpoint",
        )
        return lambda: False
    return lambda: holder.preemption_info is not None


# -- Ray Train: a quieter worker log -----------------------------------------------------------
def quiet_train_report_log() -> None:
    """Raise the level of the logger that logs every ``ray.train.report`` at INFO to WARNING.

    It is ``logging.getLogger(__file__)`` in ``ray.train.v2._internal.execution.context``: named
    by its file path, so neither ``logging.getLogger("ray.train")`` nor Ray Train's public
    ``LoggingConfig`` (which filters records named ``ray.train*``) reaches it. Without it, one
    warning and the worker's terminal shows Ray's report lines (nothing else changes).
    """
    try:
        from ray.train.v2._internal.execution import context as train_context

        logger = train_context.logger
        if not isinstance(logger, logging.Logger):
            raise AttributeError(f"logger is a {type(logger).__name__}")
    except (ImportError, AttributeError) as e:
        _warn_once(
            "context_logger",
            f"ray.train.v2._internal.execution.context.logger ({e})",
            "Ray Train's per-report INFO lines stay in the worker log",
        )
        return
    logger.setLevel(logging.WARNING)


#: The logger of Ray Train's ``PlacementGroupCleaner`` actor (``logging.getLogger(__name__)`` of
#: its module), and the start of the warning it logs on every check (about once a second) while
#: the State API does not answer, which is the whole run on a cluster without the dashboard.
CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
CLEANER_UNAVAILABLE = "Failed to query Ray Train Controller actor state"


class _FirstOnly(logging.Filter):
    """Pass the first record that starts with ``prefix``, with a note that it repeats; drop the
    rest (other records pass)."""

    def __init__(self, prefix: str, note: str) -> None:
        super().__init__()
        self.prefix, self.note, self.seen = prefix, note, False

    def filter(self, record: logging.LogRecord) -> bool:
        if not str(record.msg).startswith(self.prefix):
            return True
        if self.seen:
            return False
        self.seen = True
        record.msg = f"{record.msg} {self.note}"
        return True


def quiet_cleaner_repeats() -> None:
    """Let Ray Train's ``PlacementGroupCleaner`` say once per process, not once a second, that
    it cannot reach the State API (a cluster started without the dashboard: it then cannot free
    a dead controller's placement group, and says so). Installed by name: the filter is inert
    if Ray renames the logger, which the fast test of this module notices."""
    logger = logging.getLogger(CLEANER_LOGGER)
    if not any(isinstance(f, _FirstOnly) for f in logger.filters):
        note = "(repeats while the State API is unavailable, e.g. no dashboard; shown once)"
        logger.addFilter(_FirstOnly(CLEANER_UNAVAILABLE, note))


# -- Ray Train: knowing that Ctrl-C stopped a run ----------------------------------------------
def sigint_noting_trainer() -> type:
    """``TorchTrainer`` whose ``interrupted`` becomes True when Ctrl-C reaches ``fit()``.

    Ray Train installs its own SIGINT handler inside ``fit()`` (it aborts the run through the
    controller actor, which only ``fit()`` holds), after which ``fit()`` raises a Ray error or
    ``SystemExit`` that says nothing of the interrupt. Ray 2.60 has no public hook to learn of
    it: a handler installed before ``fit()`` is replaced, and one installed after it cannot
    abort the run. So this overrides ``TorchTrainer._register_sigint_handler(self, controller)``
    to wrap Ray's handler. ``sigint_hooked`` records that Ray called the override (see
    :func:`check_sigint_hooked`).

    Without the method: one warning, and a Ctrl-C during a Ray Train run then ends with Ray's
    error (a traceback, the MLflow run FAILED) instead of the interrupt line.
    """
    from ray.train.torch import TorchTrainer

    if not callable(getattr(TorchTrainer, "_register_sigint_handler", None)):
        _warn_once(
            "sigint",
            "TorchTrainer._register_sigint_handler",
            "a Ctrl-C during a Ray Train run ends with Ray's error, not the interrupt line",
        )
        return type("_Trainer", (TorchTrainer,), {"interrupted": False, "sigint_hooked": False})

    class _Trainer(TorchTrainer):
        interrupted = False
        sigint_hooked = False

        def _register_sigint_handler(self, controller: Any) -> None:
            super()._register_sigint_handler(controller)
            self.sigint_hooked = True
            ray_handler = signal.getsignal(signal.SIGINT)

            def note(signum: int, frame: Any) -> None:
                self.interrupted = True
                if callable(ray_handler):
                    ray_handler(signum, frame)

            signal.signal(signal.SIGINT, note)

    return _Trainer


def check_sigint_hooked(trainer: Any) -> None:
    """After ``fit()`` in the main thread: warn once if Ray never called the SIGINT override
    (the method still exists but Ray stopped calling it, so Ctrl-C would go unnoticed)."""
    if not getattr(trainer, "sigint_hooked", True):
        _warn_once(
            "sigint_unused",
            "a call to TorchTrainer._register_sigint_handler from fit()",
            "a Ctrl-C during a Ray Train run ends with Ray's error, not the interrupt line",
        )


# -- Ray Train: what a failed worker raised ----------------------------------------------------
def worker_died(failure: BaseException) -> bool:
    """Whether a worker failure of a ``WorkerGroupError`` is its process or node dying (not an
    exception in the training code).

    Public: ``ray.exceptions.RayActorError``. Ray Train 2.60 wraps a failed health check in
    ``ray.train.v2._internal.exceptions.WorkerHealthCheckFailedError``, whose
    ``health_check_failure`` holds the ``RayActorError``; neither is public. Without that class
    or attribute: one warning and False, so the run fails with Ray's full error instead of the
    one-line "gave up" message (nothing is hidden).
    """
    import ray.exceptions

    if isinstance(failure, ray.exceptions.RayActorError):
        return True
    try:
        from ray.train.v2._internal.exceptions import WorkerHealthCheckFailedError
    except ImportError as e:
        _warn_once(
            "health_check",
            f"ray.train.v2._internal.exceptions.WorkerHealthCheckFailedError ({e})",
            "a dead worker is reported with Ray's own error",
        )
        return False
    if not isinstance(failure, WorkerHealthCheckFailedError):
        return False
    if not hasattr(failure, "health_check_failure"):
        _warn_once(
            "health_check_failure",
            "WorkerHealthCheckFailedError.health_check_failure",
            "a dead worker is reported with Ray's own error",
        )
        return False
    return isinstance(failure.health_check_failure, ray.exceptions.RayActorError)


# -- Ray Tune: the trials of a finished sweep ---------------------------------------------------
def tune_trials(result_grid: Any) -> list[Any]:
    """The trials (``trial_id``, ``status``, ``config``, ``last_result``) of a ``Tuner.fit()``.

    Public API: the ``ResultGrid``'s ``Result`` objects carry neither a trial's status nor, for
    a trial that never reported, its config, so the trials come from
    ``ray.tune.ExperimentAnalysis(result_grid.experiment_path).trials`` (public, documented),
    which reads the experiment state Tune writes when ``fit()`` returns. (It replaces the
    private ``result_grid._experiment_analysis``, the same trials in memory; the saved state
    differs from it only for trials running at an interrupt: PENDING on disk, as a resumed sweep
    sees them.)

    Raises
    ------
    RayCompatError
        The saved state does not hold the trials of ``result_grid`` (Tune failed to save it).
    """
    from ray import tune

    analysis = tune.ExperimentAnalysis(
        result_grid.experiment_path, storage_filesystem=result_grid.filesystem
    )
    trials = list(analysis.trials)
    saved = sorted(Path(t.path).name for t in trials)
    ran = sorted(Path(r.path).name for r in result_grid)
    if saved != ran:
        raise RayCompatError(
            f"Tune's saved experiment state in {result_grid.experiment_path} holds "
            f"{len(saved)} trials, the finished sweep {len(ran)}; the state was not saved "
            "(see Tune's log above)"
        )
    return trials
