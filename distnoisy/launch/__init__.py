"""Launchers: the one place that knows Ray (besides :mod:`distnoisy.tune`).

Both launchers run :func:`distnoisy.engine.trainer.run_worker` over a
:class:`distnoisy.engine.job.Job` on every rank and return the directory of the final
checkpoint (which holds the run's ``outputs/``):

- ``ray`` (:mod:`.ray_train`): Ray Train V2 ``TorchTrainer`` on the cluster :mod:`.cluster`
  joins or starts;
- ``local`` (:mod:`.local`): the same loop without Ray, in-process or in spawned processes.

:mod:`.ranks` runs rank-parallel jobs that do not train; :mod:`.worker_setup` runs in every Ray
worker process; :mod:`.reaper` stops a local cluster whose driver was killed. Submodules are
imported where used: :mod:`.worker_setup` must load without torch.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from distnoisy.config import Config
    from distnoisy.engine.job import Job


def launch(job: Job, cfg: Config, run_dir: Path, callbacks: list[Any] | None = None) -> Path:
    """Run the job with the configured launcher; ``callbacks`` need the Ray launcher."""
    if cfg.scaling.launcher == "ray":
        from distnoisy.launch.ray_train import launch_ray

        return launch_ray(job, cfg, run_dir, callbacks)
    if callbacks:
        from distnoisy.core.errors import DistnoisyError

        raise DistnoisyError("Ray Train callbacks need scaling.launcher=ray")
    from distnoisy.launch.local import launch_local

    return launch_local(job, cfg, run_dir)
