"""The Ray Train launcher: the training loop on a Ray Train V2 ``TorchTrainer``.

DDP over gloo on CPU, NCCL on GPU; a checkpoint per epoch through ``ray.train.report``, resume
through ``ray.train.get_checkpoint()``; errors a worker raised for the user (bad data) come back
to the driver as the one-line :class:`~distnoisy.core.errors.DistnoisyError` they are.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from distnoisy import tracking
from distnoisy.config import Config
from distnoisy.core.errors import DistnoisyError
from distnoisy.engine import space
from distnoisy.engine.checkpoint import checkpoint_name
from distnoisy.engine.job import Job, WorkerContext
from distnoisy.engine.trainer import run_worker
from distnoisy.launch import ray_compat, worker_errors
from distnoisy.launch.cluster import check_ray_resources
from distnoisy.launch.local import KEEP_CHECKPOINTS

log = logging.getLogger(__name__)


# -- Ray launcher -----------------------------------------------------------------------------
def _ray_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point on each worker (importable: Ray pickles it by reference).

    ``config`` is the ``train_loop_config``: ``{"job": Job, "error_dir": str}`` (Ray Train
    takes a dict).
    """
    import ray.train
    import ray.train.torch

    # Ray Train logs every report and checkpoint at INFO; keep the terminal to our epoch lines.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    ray_compat.quiet_train_report_log()  # one more, named by its file path
    logging.getLogger("distnoisy").setLevel(logging.INFO)
    context = ray.train.get_context()
    rank = context.get_world_rank()

    storage = Path(config["error_dir"])  # run_dir/ray: Ray Train's storage_path

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        # A full disk: every rank raises together before Ray writes a partial checkpoint.
        what = f"the checkpoint of epoch {int(metrics['epoch']) + 1}"
        space.check_room(what, storage, checkpoint_dir, storage.parent)
        checkpoint = (
            ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        )
        ray.train.report(
            metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_name(metrics)
        )

    @contextlib.contextmanager
    def restore() -> Iterator[Path | None]:
        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            yield None
            return
        with checkpoint.as_directory() as d:
            yield Path(d)

    ctx = WorkerContext(
        rank=rank,
        world_size=context.get_world_size(),
        device=ray.train.torch.get_device(),
        report=report,
        restore=restore,
        log_metrics=tracking.rank_logger(config["job"], rank),
        preemption_notice=ray_compat.preemption_notice_reader(),
    )
    try:
        run_worker(config["job"], ctx)
    except DistnoisyError as e:
        # A user error, not a crash: its one line goes to the driver (launch.worker_errors).
        try:
            worker_errors.leave(storage, rank, e)
        except OSError:  # nowhere to leave it (a full disk): Ray reports it, with its traceback
            raise e from None


def launch_ray(job: Job, cfg: Config, run_dir: Path, callbacks: list[Any] | None = None) -> Path:
    """Run the job as a Ray Train run named ``train`` under ``run_dir/ray``.

    ``callbacks`` are Ray Train ``UserCallback``s for the Train ``RunConfig`` (e.g. Tune's
    ``TuneReportCallback``, which forwards every per-epoch report to a Tune trial).
    """
    import ray.train

    check_ray_resources(cfg)
    error_dir = (run_dir / "ray").resolve()
    worker_errors.clear(error_dir)  # an earlier segment's (resume)
    s = cfg.scaling
    low = s.num_workers if s.min_workers is None else s.min_workers
    # (min, max): Ray Train V2's elastic worker group. After a lost node it restarts from the
    # last checkpoint on the workers it can place (at least min); every resize_interval_s it
    # checks for capacity to grow back, and restarts from the last checkpoint to do so.
    workers: int | tuple[int, int] = s.num_workers if low == s.num_workers else (low, s.num_workers)
    if isinstance(workers, tuple):
        log.info("elastic training: %d to %d workers", *workers)
    trainer = ray_compat.sigint_noting_trainer()(
        _ray_worker,
        train_loop_config={"job": job, "error_dir": str(error_dir)},
        scaling_config=ray.train.ScalingConfig(
            num_workers=workers,
            use_gpu=s.use_gpu,
            elastic_resize_monitor_interval_s=s.resize_interval_s,
        ),
        run_config=ray.train.RunConfig(
            # A stable name per run dir: re-running with resume=true continues this Train run.
            name="train",
            storage_path=str((run_dir / "ray").resolve()),
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.scaling.max_failures,
                # A worker group that cannot start (its resources never came back, e.g. a lost
                # node) is a controller failure, retried forever by default: count it too, so
                # such a run fails after max_failures instead of waiting forever.
                controller_failure_limit=_controller_failure_limit(cfg),
            ),
            checkpoint_config=ray.train.CheckpointConfig(num_to_keep=KEEP_CHECKPOINTS),
            callbacks=list(callbacks or []),
        ),
    )
    previous = signal.getsignal(signal.SIGINT)
    try:
        result = trainer.fit()
    except BaseException as exc:  # Ray raises the workers' errors wrapped: unwrap ours
        if trainer.interrupted:  # Ctrl-C: Ray aborted the run (RayActorError, SystemExit)
            raise KeyboardInterrupt("SIGINT") from None
        # A rank's own line explains the others' failures (a peer that left a collective).
        user = worker_errors.left(error_dir) or _user_error(exc)
        if user is exc:
            user = _gave_up_error(exc, cfg, run_dir)
        if user is exc:
            raise
        raise user from None
    finally:
        # Ray Train leaves its handler installed, bound to the finished run's controller.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
    if threading.current_thread() is threading.main_thread():
        ray_compat.check_sigint_hooked(trainer)  # fit() ran its controller: Ray called the hook
    if trainer.interrupted:
        raise KeyboardInterrupt("SIGINT")
    if result.error is not None:
        raise _gave_up_error(_user_error(result.error), cfg, run_dir)
    reported = worker_errors.left(error_dir)
    if reported is not None:
        raise reported
    if result.checkpoint is None:
        raise DistnoisyError("Ray Train finished without a checkpoint")
    return Path(result.checkpoint.path)


def _controller_failure_limit(cfg: Config) -> int:
    """Start-up failures of the worker group that Ray Train retries: ``max_failures``; for an
    elastic run, that many per worker count it can shrink through. Right after a node dies the
    cluster still counts its CPUs/GPUs for a while (until its heartbeats time out), so the
    elastic policy may first try the old size, or one between, and time out
    (``RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S``) before it starts the group that fits."""
    s = cfg.scaling
    if s.max_failures < 0:
        return -1
    low = s.num_workers if s.min_workers is None else s.min_workers
    return s.max_failures * (s.num_workers - low + 1)


def _user_error(err: BaseException) -> BaseException:
    """The :class:`DistnoisyError` a worker raised (bad data found while training, e.g. past
    ``data.max_bad_fraction``), so the CLI prints its one line; otherwise Ray's error."""
    # WorkerGroupError.worker_failures (public) holds what each worker raised, unwrapped.
    failures = getattr(err, "worker_failures", None) or {}
    for _, failure in sorted(failures.items()):
        if isinstance(failure, DistnoisyError):
            return failure
    return err


def _gave_up_error(err: BaseException, cfg: Config, run_dir: Path) -> BaseException:
    """One line for a run that Ray Train stopped after ``scaling.max_failures`` recoveries.

    Ray's own error is pages of worker reprs; the user needs what failed and how to continue
    (the checkpoints stay in ``run_dir/ray``, so ``resume=true`` picks the run up later).
    Other errors (an exception in the training code itself) are returned as they are, with
    their traceback.
    """
    import ray.train

    if isinstance(err, ray.train.WorkerGroupError):
        # When one rank dies the others fail on their collectives: one death is the cause.
        if not any(map(ray_compat.worker_died, err.worker_failures.values())):
            return err
        reason = "a worker or its node died"
    elif isinstance(err, ray.train.ControllerError):
        timeout = os.environ.get("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", "60")
        reason = (
            f"its {cfg.scaling.num_workers} workers could not be started within "
            f"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S={timeout} s (the cluster lacks the "
            "resources, e.g. a node was lost)"
            if "timed out" in str(err.controller_failure)
            else f"controller error: {str(err.controller_failure).splitlines()[0]}"
        )
    else:
        return err
    fix = "restore the cluster's resources"
    if _OUT_OF_MEMORY in str(err):
        # Ray's memory monitor killed workers: a resume with the same settings would be killed
        # again, so the fix is fewer workers (or smaller batches) on each node.
        reason = f"Ray killed workers because their node ran out of memory ({_memory_use(err)})"
        fix = "give each worker more memory (fewer workers per node, or a smaller data.batch_size)"
    return DistnoisyError(
        f"Ray Train stopped the run after scaling.max_failures={cfg.scaling.max_failures} "
        f"recoveries: {reason}; its checkpoints are kept: {fix}, then "
        f"continue with: python -m distnoisy.train output_dir={run_dir} resume=true"
    )


#: What Ray's error says when its memory monitor killed workers ("... were killed due to the
#: node running low on memory. Memory on the node (IP: ..., ID: ...) was 22.63GB used /
#: 23.54GB limit (0.961329) ...").
_OUT_OF_MEMORY = "running low on memory"


def _memory_use(err: BaseException) -> str:
    """The node's memory use as Ray's error states it ("22.63GB used / 23.54GB limit")."""
    found = re.search(r"[\d.]+\s*GB used / [\d.]+\s*GB limit", str(err))
    return found.group(0) if found else "Ray's memory monitor"
