"""The local launcher: the training loop without Ray.

One worker runs in-process; several run in spawned processes joined in a gloo (CPU) or NCCL
(GPU) process group, as Ray Train would give them (useful on a GPU machine without Ray).
Checkpoints go to ``run_dir/checkpoints/epoch=NNNN``, the last :data:`KEEP_CHECKPOINTS` kept.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from distnoisy import tracking
from distnoisy.config import Config
from distnoisy.core.errors import DistnoisyError
from distnoisy.core.machine import usable_cpus
from distnoisy.engine import collectives, space
from distnoisy.engine.checkpoint import checkpoint_name, checkpoint_order
from distnoisy.engine.job import Job, WorkerContext
from distnoisy.engine.trainer import run_worker
from distnoisy.launch import worker_errors

KEEP_CHECKPOINTS = 2


# -- local launcher ---------------------------------------------------------------------------
def _local_checkpoints(root: Path) -> list[Path]:
    """The checkpoints in ``root``, oldest first (mid-epoch ones before their epoch's end)."""
    found = [p for p in root.glob("epoch=*") if p.is_dir()]
    return sorted(found, key=lambda p: checkpoint_order(p.name))


def _local_context(
    job: Job, rank: int, world: int, device: torch.device, ckpt_root: Path, resume: bool
) -> WorkerContext:
    def report(metrics: dict[str, float], checkpoint_dir: Path | None) -> None:
        # Every rank calls this (as Ray Train's report, a barrier). The ranks' directories are
        # merged into one (rank 0's state.pt and each rank's own files, e.g. its store part),
        # which appears under its final name whole or not at all.
        final = ckpt_root / checkpoint_name(metrics)
        tmp = ckpt_root / f".{final.name}.tmp"
        what = f"the checkpoint of epoch {int(metrics['epoch']) + 1}"
        # A full disk: every rank raises together, the previous checkpoint untouched.
        space.check_room(what, ckpt_root, checkpoint_dir, ckpt_root.parent)
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        collectives.barrier()
        failed = False
        if checkpoint_dir is not None:
            try:
                shutil.copytree(checkpoint_dir, tmp, dirs_exist_ok=True)
            except OSError as e:  # the disk filled since the check (another writer)
                if not space.is_no_space(e):
                    raise
                failed = True
        if any(collectives.all_gather_object(failed)):
            collectives.barrier()  # every rank stopped writing: no partial checkpoint stays
            space.remove(tmp)
            need = space.tree_bytes(checkpoint_dir)
            raise space.no_space_error(what, ckpt_root, need, ckpt_root.parent)
        if rank == 0:
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in _local_checkpoints(ckpt_root)[:-KEEP_CHECKPOINTS]:
                shutil.rmtree(old, ignore_errors=True)
        collectives.barrier()  # no rank goes on before the checkpoint is in place

    @contextlib.contextmanager
    def restore() -> Iterator[Path | None]:
        found = _local_checkpoints(ckpt_root) if resume else []
        yield found[-1] if found else None

    return WorkerContext(rank, world, device, report, restore, tracking.rank_logger(job, rank))


def _local_device(cfg: Config, rank: int) -> torch.device:
    if cfg.scaling.use_gpu:
        if not torch.cuda.is_available():
            raise DistnoisyError("scaling.use_gpu=true but no CUDA device is visible")
        return torch.device("cuda", rank % torch.cuda.device_count())
    return torch.device("cpu")


def rank_threads(world: int) -> int:
    """CPU threads for each of ``world`` ranks on this machine: its cores shared out, at least
    one each (what Ray Train gives a worker with its CPUs, and torchrun's OMP_NUM_THREADS=1)."""
    return max(1, usable_cpus() // world)


def share_cpu_threads(world: int) -> None:
    """Give this spawned rank :func:`rank_threads` intra-op threads, unless ``OMP_NUM_THREADS``
    says otherwise. torch's default, every core in every rank, oversubscribes the cores: two
    local ranks on 2 cores trained a ResNet-18 2.3x slower than with one thread each, and their
    numbers differed from a Ray run's, whose workers have one thread per CPU."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(rank_threads(world))


def _spawned_worker(
    rank: int, world: int, port: int, job: Job, ckpt_root: str, resume: bool
) -> None:
    share_cpu_threads(world)
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
        run_worker(job, _local_context(job, rank, world, device, Path(ckpt_root), resume))
    except DistnoisyError as e:  # a user error, not a crash: its line goes to the driver
        try:
            worker_errors.leave(Path(ckpt_root).parent, rank, e)
        except OSError:  # nowhere to leave it (a full disk): it ends the process as it is
            raise e from None
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
        ctx = _local_context(job, 0, 1, _local_device(cfg, 0), ckpt_root, cfg.resume)
        run_worker(job, ctx)
    else:
        worker_errors.clear(run_dir)
        _spawn_and_join(world, (world, _free_port(), job, str(ckpt_root), cfg.resume))
        error = worker_errors.left(run_dir)
        if error is not None:
            raise error
    found = _local_checkpoints(ckpt_root)
    if not found:
        raise DistnoisyError(f"training ended without a checkpoint in {ckpt_root}")
    return found[-1]
