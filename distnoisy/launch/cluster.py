"""The Ray cluster a distnoisy command runs on: joined or started locally, and whether it can
hold a worker group; Ray tasks for work that needs no process group."""

from __future__ import annotations

import logging
import os
from typing import Any

from distnoisy.config import Config
from distnoisy.core.errors import DistnoisyError
from distnoisy.core.machine import check_room_for_workers
from distnoisy.launch import ray_compat

log = logging.getLogger(__name__)

#: Whether :func:`ensure_ray` connected this process to Ray (started a local cluster or joined
#: one); not when Ray was initialised before, e.g. by a test session.
_connected_here = False


def ray_runtime_env() -> dict[str, Any]:
    """The job-level runtime environment of distnoisy's Ray jobs (also used by the tests)."""
    return {
        "env_vars": {"MLFLOW_DISABLE_TELEMETRY": "true"},
        # Lets Ray Train clean up placement groups of stopped runs when several Ray clusters
        # share a machine (see distnoisy.launch.worker_setup).
        "worker_process_setup_hook": "distnoisy.launch.worker_setup.pin_ray_address",
    }


#: ``scaling.address`` that starts a cluster of the command's own even where ``RAY_ADDRESS`` is
#: set or ``ray start`` left one running on this machine (Ray's own word for it).
LOCAL = "local"


def cluster_to_join(address: str | None) -> tuple[str, str] | None:
    """The address to join (for ``ray.init``), and how to name the cluster in an error; None:
    start a local one.

    In order: ``scaling.address`` (``local``: none, start one), ``RAY_ADDRESS``, then the cluster
    ``ray start`` last started on this machine if it still runs (what ``ray.init()`` without an
    address joins; a user who typed ``ray start --head`` expects their runs there).
    """
    if address == LOCAL:
        return None
    if address:
        return address, f"scaling.address={address}"
    if env := os.environ.get("RAY_ADDRESS"):
        return env, f"RAY_ADDRESS={env}"
    if started := ray_compat.started_cluster_address():
        where = f"the Ray cluster `ray start` started on this machine ({started})"
        log.info("joining %s; scaling.address=local starts a cluster of this run's own", where)
        # "auto", not its address: Ray sends the token `ray start` wrote (~/.ray/auth_token)
        # only to a cluster it finds itself; given the address, it refused us after ~20 s of
        # retries unless RAY_AUTH_MODE=token was set.
        return "auto", where
    return None


def ensure_ray(address: str | None, num_workers: int, check_memory: bool = False) -> None:
    """Join the Ray cluster :func:`cluster_to_join` names, else start a local one (bound to
    127.0.0.1) with a CPU for every worker and the controller; with ``check_memory``, only when
    this machine's memory can hold ``num_workers`` training workers (else one line, at once)."""
    global _connected_here
    import ray

    # Train V2's controller polls workers every 2 s and a report waits for that poll, which
    # caps a run at one epoch per 2 s (measured: 8 digits epochs 50 s -> 39 s at 0.25 s). A
    # local cluster's processes inherit it from this driver (set before it starts); a user's
    # value wins.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.25")
    if ray.is_initialized():
        return
    env = ray_runtime_env()
    join = cluster_to_join(address)
    if join:
        target, where = join
        try:
            ray.init(address=target, runtime_env=env, log_to_driver=True)
        except ConnectionError as exc:  # Ray's own error comes with a traceback of its internals
            raise DistnoisyError(_cannot_join(where, exc)) from None
        _connected_here = True
        return
    if check_memory:
        check_room_for_workers(num_workers)
    # Logical CPUs may exceed physical ones: every worker needs one, the controller too.
    num_cpus = max(os.cpu_count() or 1, num_workers + 1)
    ray.init(
        # "local": a new cluster, never one Ray would otherwise find and join (it would then
        # refuse num_cpus with a ValueError).
        address=LOCAL,
        num_cpus=num_cpus,
        # The dashboard (State API) lets Ray clean up placement groups of stopped Train runs;
        # it listens on loopback only.
        dashboard_host="127.0.0.1",
        runtime_env=env,
    )
    _connected_here = True
    # Ray's agents outlive a driver killed with SIGKILL; a watcher process stops them.
    from distnoisy.launch import reaper

    reaper.start()


def _cannot_join(where: str, exc: BaseException) -> str:
    """The one line for a cluster that could not be joined: a token it refused, or no answer."""
    import ray.exceptions

    refused = getattr(ray.exceptions, "AuthenticationError", ())
    chain: list[BaseException] = []
    cause: BaseException | None = exc
    while cause is not None and cause not in chain:
        chain.append(cause)
        cause = cause.__cause__ or cause.__context__
    # Ray 2.60 chains the refusal as text: a RuntimeError whose message holds the GCS client's
    # AuthenticationError ("InvalidAuthToken").
    if any(isinstance(c, refused) or "InvalidAuthToken" in str(c) for c in chain):
        return (
            f"{where}: the Ray cluster there refused this process's authentication token; a "
            "cluster started with `ray start` checks one: set RAY_AUTH_MODE=token (the token is "
            "read from ~/.ray/auth_token, RAY_AUTH_TOKEN_PATH or RAY_AUTH_TOKEN)"
        )
    reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"{where}: could not join a Ray cluster there ({reason}); check the address"


def leave_ray() -> None:
    """Leave the Ray cluster :func:`ensure_ray` connected this process to: stop the local one it
    started, disconnect from one it joined (which goes on running).

    A command that ends with its error line calls this first: until the driver leaves, Ray goes
    on printing the cluster's log lines to this terminal (a failed Train controller's traceback,
    deduplicated and flushed seconds later; a loaded machine's teardown messages), after the line
    that must come last. Ray that was initialised before (a test session's) is left alone.
    """
    global _connected_here
    if not _connected_here:
        return
    import ray

    if ray.is_initialized():
        ray.shutdown()
    _connected_here = False


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


def _needed_resources(cfg: Config) -> dict[str, float]:
    """What the Train worker group asks of the cluster: one CPU per worker, one GPU each with
    ``scaling.use_gpu`` (Ray Train's defaults); an elastic run needs its fewest workers."""
    workers = cfg.scaling.min_workers or cfg.scaling.num_workers
    need = {"CPU": float(workers)}
    if cfg.scaling.use_gpu:
        need["GPU"] = float(workers)
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

    ensure_ray(cfg.scaling.address, cfg.scaling.num_workers, check_memory=True)
    need = _needed_resources(cfg)
    missing = _shortfall(need)
    if not missing:
        return
    grows = ray_compat.cluster_can_grow()
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
