"""Rank-parallel jobs without training (feature extraction, influence scoring): ``fn(payload,
rank, world_size)`` once per rank, on local processes or Ray Train workers."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from distnoisy.launch.cluster import ensure_ray
from distnoisy.launch.local import _free_port
from distnoisy.launch.ray_train import _user_error


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
