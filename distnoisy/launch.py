"""Launchers: the one place that knows Ray.

Both launchers run :func:`distnoisy.trainer.run_worker` (a :class:`distnoisy.trainer.Trainer`)
over a :class:`distnoisy.job.Job` on every rank and return the directory of
the final checkpoint (which holds the run's ``outputs/``):

- ``ray``: Ray Train V2 ``TorchTrainer`` (DDP over gloo on CPU, NCCL on GPU), a checkpoint per
  epoch through ``ray.train.report``, resume through ``ray.train.get_checkpoint()``.
- ``local``: the same loop without Ray, in-process for one worker or in spawned processes with a
  gloo/NCCL process group for several (useful on a GPU machine without Ray).
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from distnoisy import dist
from distnoisy.config import Config
from distnoisy.errors import DistnoisyError
from distnoisy.job import Job
from distnoisy.loop import WorkerContext
from distnoisy.trainer import run_worker

log = logging.getLogger(__name__)

KEEP_CHECKPOINTS = 2


# -- local launcher ---------------------------------------------------------------------------
def _local_checkpoints(root: Path) -> list[Path]:
    return sorted(p for p in root.glob("epoch=*") if p.is_dir())


def _local_context(
    rank: int, world: int, device: torch.device, ckpt_root: Path, resume: bool
) -> WorkerContext:
    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        # Every rank calls this (as Ray Train's report, a barrier). The ranks' directories are
        # merged into one (rank 0's state.pt and each rank's own files, e.g. its store part),
        # which appears under its final name whole or not at all.
        final = ckpt_root / f"epoch={int(metrics['epoch']):04d}"
        tmp = ckpt_root / f".{final.name}.tmp"
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        dist.barrier()
        if checkpoint_dir is not None:
            shutil.copytree(checkpoint_dir, tmp, dirs_exist_ok=True)
        dist.barrier()
        if rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in _local_checkpoints(ckpt_root)[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
        dist.barrier()  # no rank goes on before the checkpoint is in place

    @contextlib.contextmanager
    def restore() -> Iterator[Path | None]:
        found = _local_checkpoints(ckpt_root) if resume else []
        yield found[-1] if found else None

    return WorkerContext(rank, world, device, report, restore)


def _local_device(cfg: Config, rank: int) -> torch.device:
    if cfg.scaling.use_gpu:
        if not torch.cuda.is_available():
            raise DistnoisyError("scaling.use_gpu=true but no CUDA device is visible")
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def _spawned_worker(
    rank: int, world: int, port: int, job: Job, ckpt_root: str, resume: bool
) -> None:
    # A spawned process starts without the driver's logging set-up: keep the epoch lines.
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    logging.getLogger("distnoisy").setLevel(logging.INFO)
    device = _local_device(job.config, rank)
    backend = "nccl" if device.type == "cuda" else "gloo"
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.distributed.init_process_group(backend, rank=rank, world_size=world)
    try:
        run_worker(job, _local_context(rank, world, device, Path(ckpt_root), resume))
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn_and_join(world: int, args: tuple[Any, ...]) -> None:
    """Run :func:`_spawned_worker` on ``world`` processes; stop them if this one is stopped.

    A SIGTERM to the driver alone (a scheduler, ``kill``) or a Ctrl-C while it waits would
    otherwise leave the workers training: they are not daemons, so the driver's exit waits for
    them to finish every epoch.
    """
    context = torch.multiprocessing.start_processes(
        _spawned_worker, args=args, nprocs=world, join=False, start_method="spawn"
    )
    try:
        while not context.join():
            pass
    except BaseException:
        for proc in context.processes:
            if proc.is_alive():
                proc.terminate()
        for proc in context.processes:
            proc.join(timeout=30)
        raise


def launch_local(job: Job, cfg: Config, run_dir: Path) -> Path:
    ckpt_root = run_dir / "checkpoints"
    ckpt_root.mkdir(parents=True, exist_ok=True)
    world = cfg.scaling.num_workers
    if world == 1:
        ctx = _local_context(0, 1, _local_device(cfg, 0), ckpt_root, cfg.resume)
        run_worker(job, ctx)
    else:
        _spawn_and_join(world, (world, _free_port(), job, str(ckpt_root), cfg.resume))
    found = _local_checkpoints(ckpt_root)
    if not found:
        raise DistnoisyError(f"training ended without a checkpoint in {ckpt_root}")
    return found[-1]


# -- Ray launcher -----------------------------------------------------------------------------
def _ray_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point on each worker (importable: Ray pickles it by reference).

    ``config`` is the ``train_loop_config``: ``{"job": Job}`` (Ray Train takes a dict).
    """
    import ray.train
    import ray.train.torch

    # Ray Train logs every report and checkpoint at INFO; keep the terminal to our epoch lines.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # this one logs under its file path, not under "ray.train"
        from ray.train.v2._internal.execution import context as train_context

        train_context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):
        pass
    logging.getLogger("distnoisy").setLevel(logging.INFO)
    context = ray.train.get_context()
    rank = context.get_world_rank()

    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        checkpoint = (
            ray.train.Checkpoint.from_directory(str(checkpoint_dir)) if checkpoint_dir else None
        )
        ray.train.report(
            metrics, checkpoint=checkpoint, checkpoint_dir_name=f"epoch={int(metrics['epoch']):04d}"
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
    )
    run_worker(config["job"], ctx)


def ray_runtime_env() -> dict[str, Any]:
    """The job-level runtime environment of distnoisy's Ray jobs (also used by the tests)."""
    return {
        "env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true"},
        # Lets Ray Train clean up placement groups of stopped runs when several Ray clusters
        # share a machine (see distnoisy.ray_setup).
        "worker_process_setup_hook": "distnoisy.ray_setup.pin_ray_address",
    }


def ensure_ray(address: str | None, num_workers: int) -> None:
    """Connect to a Ray cluster, starting a local one (bound to 127.0.0.1) when there is none."""
    import ray

    # Train V2's controller polls workers every 2 s and a report waits for that poll, which
    # caps a run at one epoch per 2 s (measured: 8 digits epochs 50 s -> 39 s at 0.25 s). A
    # local cluster's processes inherit it from this driver (set before it starts); a user's
    # value wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    if ray.is_initialized():
        return
    env = ray_runtime_env()
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address or os.environ["RAY_ADDRESS"], runtime_env=env, log_to_driver=True)
        return
    # Logical CPUs may exceed physical ones: every worker needs one, the controller too.
    num_cpus = max(os.cpu_count() or 1, num_workers + 1)
    ray.init(
        num_cpus=num_cpus,
        # The dashboard (State API) lets Ray clean up placement groups of stopped Train runs;
        # it listens on loopback only.
        dashboard_host="127.0.0.1",
        runtime_env=env,
    )
    # Ray's agents outlive a driver killed with SIGKILL; a watcher process stops them.
    from distnoisy import reaper

    reaper.start()


def map_tasks(
    fn: Any, calls: list[tuple[Any, ...]], shared: Any = None, num_cpus: float = 1.0
) -> list[Any]:
    """``[fn(shared, *args) for args in calls]`` as Ray tasks on the cluster training uses
    (joined, or started on this machine as :func:`ensure_ray` does), in order.

    ``shared`` goes to the object store once, not with every call (numpy arrays in it are read
    zero-copy, read-only). ``fn`` must be importable by reference.
    """
    import ray

    ensure_ray(None, len(calls))
    task = ray.remote(num_cpus=num_cpus)(_call_with_shared)
    shared_ref = ray.put(shared)
    return ray.get([task.remote(fn, shared_ref, *args) for args in calls])


def _call_with_shared(fn: Any, shared: Any, *args: Any) -> Any:
    return fn(shared, *args)


def _cluster_can_grow() -> bool:
    """Whether the connected Ray cluster may add nodes: False for a cluster this process
    started (``ray.init()`` without an address: a fixed set of local resources)."""
    import ray

    # ray.init() without an address makes this process's node the head; joining a cluster
    # makes a non-head node object, a Ray client none.
    node = getattr(ray._private.worker, "_global_node", None)
    if node is not None and node.is_head():
        return bool(getattr(node, "_ray_params", None) and node._ray_params.autoscaling_config)
    return True


def _needed_resources(cfg: Config) -> dict[str, float]:
    """What the Train worker group asks of the cluster: one CPU per worker, one GPU each with
    ``scaling.use_gpu`` (Ray Train's defaults)."""
    need = {"CPU": float(cfg.scaling.num_workers)}
    if cfg.scaling.use_gpu:
        need["GPU"] = float(cfg.scaling.num_workers)
    return need


def _shortfall(need: dict[str, float]) -> dict[str, tuple[float, float]]:
    import ray

    have = ray.cluster_resources()
    return {k: (v, have.get(k, 0.0)) for k, v in need.items() if have.get(k, 0.0) < v}


def check_ray_resources(cfg: Config, poll_s: float = 2.0) -> None:
    """Fail in seconds, with one line, when the Ray cluster cannot hold the worker group.

    Without this, Ray Train waits for the resources forever (a GPU recipe on a machine
    without a GPU prints autoscaler errors every ~35 s). A cluster that cannot grow (the local
    one) fails at once; one that may (an autoscaler may add nodes) is given
    ``scaling.resource_timeout_s`` seconds.

    Raises
    ------
    DistnoisyError
        The cluster lacks the resources (after the timeout on a cluster that can grow).
    """
    import time

    ensure_ray(cfg.scaling.address, cfg.scaling.num_workers)
    need = _needed_resources(cfg)
    missing = _shortfall(need)
    if not missing:
        return
    grows = _cluster_can_grow()
    timeout = cfg.scaling.resource_timeout_s if grows else 0.0
    if timeout > 0:
        log.warning("waiting up to %g s for the Ray cluster to provide %s", timeout, need)
        deadline = time.monotonic() + timeout
        while missing and time.monotonic() < deadline:
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
            missing = _shortfall(need)
        if not missing:
            return
    what = ", ".join(f"{v:g} {k}" for k, (v, _) in missing.items())
    has = ", ".join(f"{h:g} {k}" for k, (_, h) in missing.items())
    gpu = " set scaling.use_gpu=false (train on CPUs), or" if "GPU" in missing else ""
    where = (
        f"did not get them within scaling.resource_timeout_s={timeout:g} s"
        if grows
        else "cannot grow (a local cluster)"
    )
    raise DistnoisyError(
        f"scaling.num_workers={cfg.scaling.num_workers} with scaling.use_gpu="
        f"{str(cfg.scaling.use_gpu).lower()} needs {what}, but the Ray cluster has {has} and "
        f"{where}:{gpu} lower scaling.num_workers, or give scaling.address of a cluster that "
        "has them"
    )


def launch_ray(job: Job, cfg: Config, run_dir: Path, callbacks: list[Any] | None = None) -> Path:
    """Run the job as a Ray Train run named ``train`` under ``run_dir/ray``.

    ``callbacks`` are Ray Train ``UserCallback``s for the Train ``RunConfig`` (e.g. Tune's
    ``TuneReportCallback``, which forwards every per-epoch report to a Tune trial).
    """
    import ray.train

    check_ray_resources(cfg)
    trainer = _trainer_class()(
        _ray_worker,
        train_loop_config={"job": job},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.scaling.num_workers, use_gpu=cfg.scaling.use_gpu
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
                controller_failure_limit=cfg.scaling.max_failures,
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
        user = _user_error(exc)
        if user is exc:
            user = _gave_up_error(exc, cfg, run_dir)
        if user is exc:
            raise
        raise user from None
    finally:
        # Ray Train leaves its handler installed, bound to the finished run's controller.
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, previous)
    if trainer.interrupted:
        raise KeyboardInterrupt("SIGINT")
    if result.error is not None:
        raise _gave_up_error(_user_error(result.error), cfg, run_dir)
    if result.checkpoint is None:
        raise DistnoisyError("Ray Train finished without a checkpoint")
    return Path(result.checkpoint.path)


def _trainer_class() -> type:
    """``TorchTrainer`` that notes a Ctrl-C: Ray Train's own SIGINT handler aborts the run,
    after which ``fit`` raises a Ray error (or ``SystemExit``) that says nothing of it."""
    from ray.train.torch import TorchTrainer

    class _Trainer(TorchTrainer):
        interrupted = False

        def _register_sigint_handler(self, controller: Any) -> None:
            super()._register_sigint_handler(controller)
            ray_handler = signal.getsignal(signal.SIGINT)

            def note(signum: int, frame: Any) -> None:
                self.interrupted = True
                if callable(ray_handler):
                    ray_handler(signum, frame)

            signal.signal(signal.SIGINT, note)

    return _Trainer


def _user_error(err: BaseException) -> BaseException:
    """The :class:`DistnoisyError` a worker raised (bad data found while training, e.g. past
    ``data.max_bad_fraction``), so the CLI prints its one line; otherwise Ray's error."""
    failures = getattr(err, "worker_failures", None) or {}
    for _, failure in sorted(failures.items()):
        # Ray Train V2 wraps a worker's exception with its traceback text.
        base = getattr(failure, "_base_exc", failure)
        if isinstance(base, DistnoisyError):
            return base
    return err


def _gave_up_error(err: BaseException, cfg: Config, run_dir: Path) -> BaseException:
    """One line for a run that Ray Train stopped after ``scaling.max_failures`` recoveries.

    Ray's own error is pages of worker reprs; the user needs what failed and how to continue
    (the checkpoints stay in ``run_dir/ray``, so ``resume=true`` picks the run up later).
    Other errors (an exception in the training code itself) are returned as they are, with
    their traceback.
    """
    import ray.exceptions
    import ray.train

    def died(failure: BaseException) -> bool:  # the process or its node, not the code
        health = getattr(failure, "health_check_failure", None)  # Ray Train's wrapper
        return isinstance(failure, ray.exceptions.RayActorError) or isinstance(
            health, ray.exceptions.RayActorError
        )

    if isinstance(err, ray.train.WorkerGroupError):
        # When one rank dies the others fail on their collectives: one death is the cause.
        if not any(map(died, err.worker_failures.values())):
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
    return DistnoisyError(
        f"Ray Train stopped the run after scaling.max_failures={cfg.scaling.max_failures} "
        f"recoveries: {reason}; its checkpoints are kept: restore the cluster's resources, then "
        f"continue with: python -m distnoisy.train output_dir={run_dir} resume=true"
    )


def launch(job: Job, cfg: Config, run_dir: Path, callbacks: list[Any] | None = None) -> Path:
    """Run the job with the configured launcher; ``callbacks`` need the Ray launcher."""
    if cfg.scaling.launcher == "ray":
        return launch_ray(job, cfg, run_dir, callbacks)
    if callbacks:
        raise DistnoisyError("Ray Train callbacks need scaling.launcher=ray")
    return launch_local(job, cfg, run_dir)


# -- rank-parallel jobs without training (feature extraction) -----------------------------------
def _spawned_rank(rank: int, fn: Any, payload: Any, world: int, port: int) -> None:
    # A gloo group as Ray Train gives its workers, for jobs that reduce across ranks.
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world)
    )
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(payload, rank, world)
    finally:
        torch.distributed.destroy_process_group()


def _ray_rank(config: dict[str, Any]) -> None:
    """Ray Train entry point of :func:`run_ranks` (importable: Ray pickles it by reference)."""
    import ray.train

    context = ray.train.get_context()
    config["fn"](config["payload"], context.get_world_rank(), context.get_world_size())


def run_ranks(
    fn: Any,
    payload: Any,
    *,
    world_size: int,
    launcher: str,
    use_gpu: bool = False,
    address: str | None = None,
    storage_dir: Path,
    spawn: bool = False,
) -> None:
    """Run ``fn(payload, rank, world_size)`` once per rank on a launcher and wait for all.

    For embarrassingly parallel work that needs no collectives (each rank writes its own rows
    of shared files, or only small all-reduces): ``local`` runs one rank in-process or
    ``world_size`` spawned processes joined in a gloo process group;
    ``ray`` runs them as Ray Train workers (so a Ray cluster's GPUs and nodes are used the way
    training uses them; ``storage_dir`` holds Ray Train's run records). ``fn`` must be
    importable by reference and ``payload`` picklable. ``spawn`` runs even one local rank in its
    own process (benchmarks: per-rank memory without the caller's).
    """
    if launcher == "local":
        if world_size == 1 and not spawn:
            fn(payload, 0, 1)
            return
        torch.multiprocessing.start_processes(
            _spawned_rank,
            args=(fn, payload, world_size, _free_port()),
            nprocs=world_size,
            start_method="spawn",
        )
        return
    import ray.train
    from ray.train.torch import TorchTrainer

    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    ensure_ray(address, world_size)
    trainer = TorchTrainer(
        _ray_rank,
        train_loop_config={"fn": fn, "payload": payload},
        scaling_config=ray.train.ScalingConfig(num_workers=world_size, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(name="ranks", storage_path=str(Path(storage_dir).resolve())),
    )
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray raises the workers' errors wrapped: unwrap ours
        user = _user_error(exc)
        if user is exc:
            raise
        raise user from None
    if result.error is not None:
        raise _user_error(result.error)
