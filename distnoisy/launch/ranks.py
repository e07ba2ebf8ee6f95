"""Rank-parallel jobs without training (feature extraction, influence scoring): ``fn(payload,
rank, world_size)`` once per rank, on local processes or Ray Train workers; one job
(:func:`run_ranks`) or several in a row on ranks started once (:func:`rank_group`)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from distnoisy.launch.cluster import ensure_ray
from distnoisy.launch.local import _free_port, share_cpu_threads
from distnoisy.launch.ray_train import _user_error


# -- rank-parallel jobs without training (feature extraction) -----------------------------------
def _spawned_rank(rank: int, fn: Any, payload: Any, world: int, port: int) -> None:
    share_cpu_threads(world)
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


def _ranks_trainer(
    entry: Any, config: dict[str, Any], world_size: int, use_gpu: bool, storage_dir: Path
) -> Any:
    """The Ray Train run of ``world_size`` ranks that calls ``entry(config)`` on each."""
    import ray.train
    from ray.train.torch import TorchTrainer

    return TorchTrainer(
        entry,
        train_loop_config=config,
        scaling_config=ray.train.ScalingConfig(num_workers=world_size, use_gpu=use_gpu),
        run_config=ray.train.RunConfig(name="ranks", storage_path=str(Path(storage_dir).resolve())),
    )


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
    ensure_ray(address, world_size)
    trainer = _ranks_trainer(
        _ray_rank, {"fn": fn, "payload": payload}, world_size, use_gpu, storage_dir
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


# -- ranks that stay up for several jobs (post-training's scoring rounds) -----------------------
class _JobBoard:
    """A Ray actor (async) through which the driver hands jobs to a standing worker group: job
    ``seq`` (``[reference to (fn, payload)]``) is posted once, every rank takes it, runs it and
    reports it finished; ``None`` tells the ranks to return (which ends the Ray Train run)."""

    def __init__(self, world_size: int) -> None:
        self._world = world_size
        self._jobs: dict[int, Any] = {}
        self._finished: dict[int, int] = {}
        self._changed = asyncio.Condition()

    async def post(self, seq: int, job: Any) -> None:
        async with self._changed:
            self._jobs[seq] = job
            self._changed.notify_all()

    async def take(self, seq: int) -> Any:
        async with self._changed:
            await self._changed.wait_for(lambda: seq in self._jobs)
            return self._jobs[seq]

    async def finish(self, seq: int) -> None:
        async with self._changed:
            self._finished[seq] = self._finished.get(seq, 0) + 1
            if self._finished[seq] == self._world:
                self._jobs.pop(seq, None)  # the payload is no longer needed
            self._changed.notify_all()

    async def wait_finished(self, seq: int, timeout_s: float) -> bool:
        """Whether every rank finished job ``seq`` within ``timeout_s`` seconds."""
        async with self._changed:
            try:
                await asyncio.wait_for(
                    self._changed.wait_for(lambda: self._finished.get(seq, 0) == self._world),
                    timeout_s,
                )
            except TimeoutError:
                return False
            return True


def _ray_serve(config: dict[str, Any]) -> None:
    """Ray Train entry point of :class:`RankGroup`: run the board's jobs in order until ``None``."""
    import ray
    import ray.train

    board, context = config["board"], ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    seq = 0
    while (job := ray.get(board.take.remote(seq))) is not None:
        fn, payload = ray.get(job[0])
        fn(payload, rank, world)
        ray.get(board.finish.remote(seq))
        seq += 1


class RankGroup:
    """Ranks for several rank-parallel jobs in a row (:func:`rank_group`); :meth:`run` is
    :func:`run_ranks` without starting new ranks each time."""

    def __init__(self, world_size: int, launcher: str, storage_dir: Path, **ray_args: Any) -> None:
        self.world_size, self.launcher = world_size, launcher
        self._storage_dir, self._ray_args = storage_dir, ray_args
        self._seq = 0
        self._board: Any = None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None

    def run(self, fn: Any, payload: Any) -> None:
        """``fn(payload, rank, world_size)`` on every rank; returns when all have finished."""
        if self.launcher == "local":
            size, where = self.world_size, self._storage_dir
            run_ranks(fn, payload, world_size=size, launcher="local", storage_dir=where)
            return
        import ray

        if self._board is None:
            self._start()
        seq, self._seq = self._seq, self._seq + 1
        # In a list, the job's reference reaches the ranks unresolved: the board never
        # deserializes the job (it may need modules only the ranks import).
        ray.get(self._board.post.remote(seq, [ray.put((fn, payload))]))
        # Poll, so that ranks that failed (and ended the Ray Train run) raise here.
        while not ray.get(self._board.wait_finished.remote(seq, 1.0)):
            if not self._thread.is_alive():
                raise self._ended_error()

    def _start(self) -> None:
        import ray

        world, use_gpu = self.world_size, bool(self._ray_args.get("use_gpu"))
        ensure_ray(self._ray_args.get("address"), world)
        self._board = ray.remote(num_cpus=0)(_JobBoard).remote(world)
        config = {"board": self._board}
        trainer = _ranks_trainer(_ray_serve, config, world, use_gpu, self._storage_dir)
        # fit() blocks for the group's life; in a thread it leaves SIGINT to the caller.
        self._thread = threading.Thread(target=self._fit, args=(trainer,), daemon=True)
        self._thread.start()

    def _fit(self, trainer: Any) -> None:
        try:
            trainer.fit()
        except BaseException as exc:  # handed to the caller's thread by run() and close()
            self._error = exc

    def _ended_error(self) -> BaseException:
        if self._error is None:
            return RuntimeError("the ranks ended before their job finished")
        return _user_error(self._error)

    def close(self, wait: bool = True) -> None:
        """Let the ranks return (after the job they run, if any) and, with ``wait``, wait for
        the Ray Train run to end and raise what ended it otherwise."""
        if self._thread is None:
            return
        import ray

        if self._thread.is_alive():
            ray.get(self._board.post.remote(self._seq, None))
            if wait:
                self._thread.join()
        if wait and self._error is not None:
            raise self._ended_error()


@contextlib.contextmanager
def rank_group(
    *,
    world_size: int,
    launcher: str,
    use_gpu: bool = False,
    address: str | None = None,
    storage_dir: Path,
) -> Iterator[RankGroup]:
    """Ranks that run several jobs (``with rank_group(...) as ranks: ranks.run(fn, payload)``).

    On Ray, one worker group (one Ray Train run) serves every job: starting one takes 8-10 s
    on a 2-core machine, which post-training's scoring rounds would otherwise pay each round.
    The local launcher runs each job as :func:`run_ranks` does (its spawned processes start in
    a few seconds). The group starts with its first job.
    """
    group = RankGroup(world_size, launcher, storage_dir, use_gpu=use_gpu, address=address)
    try:
        yield group
    except BaseException:
        # Free the workers' resources without waiting (the caller may go on, e.g. a test or a
        # notebook); a job still running finishes first.
        group.close(wait=False)
        raise
    group.close()
