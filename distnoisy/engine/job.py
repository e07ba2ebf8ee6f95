"""What a launcher hands every rank: the :class:`Job` and the rank's :class:`WorkerContext`.

A :class:`Job` is built once in the driver (:func:`distnoisy.driver.run.train`) and travels by
pickle: to Ray Train workers (inside ``train_loop_config``) and to the local launcher's spawned
processes. It holds plain, picklable values only: the resolved config, the data description,
where to track metrics and what the method prepared in the driver.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: keeps this module free of the data and config imports
    import torch

    from distnoisy.config import Config
    from distnoisy.data.prepare import DataSpec


@dataclass(frozen=True)
class Tracking:
    """The MLflow run a job logs to.

    Attributes
    ----------
    uri
        Tracking URI (e.g. ``sqlite:///mlflow.db``).
    run_id
        The run every rank logs its per-epoch metrics to.
    """

    uri: str
    run_id: str


@dataclass(frozen=True)
class Job:
    """What every rank needs to train: config, data, tracking and the method's resources.

    Attributes
    ----------
    config
        The resolved run config.
    data
        Where and what the data is (set directories, label files, sizes, transforms).
    tracking
        The MLflow run to log to, or None (tracking disabled).
    resources
        What the method's ``prepare_resources`` returned in the driver (JSON-able); empty when
        it prepares nothing. Treat as read-only.
    """

    config: Config
    data: DataSpec
    tracking: Tracking | None = None
    resources: Mapping[str, Any] = field(default_factory=dict)


def _no_tracking(metrics: dict[str, float], step: int) -> None:
    del metrics, step


@dataclass
class WorkerContext:
    """What a launcher gives one rank's :class:`distnoisy.engine.trainer.Trainer`.

    ``report(metrics, checkpoint_dir)`` is called by every rank once per epoch (and mid-epoch:
    :func:`distnoisy.engine.checkpoint.checkpoint_name` names the checkpoint), each with its
    own directory or None (rank 0 always passes one); the launcher merges the ranks'
    directories into one checkpoint. ``restore()`` is a context manager yielding the latest
    checkpoint directory (merged) or None. ``log_metrics(metrics, step)`` sends the epoch's
    metrics to the run's tracking (the launcher builds it; a no-op off rank 0 or without
    tracking), so the engine never imports MLflow.
    """

    rank: int
    world_size: int
    device: torch.device
    report: Callable[[dict[str, float], Path | None], None]
    restore: Callable[[], contextlib.AbstractContextManager[Path | None]]
    log_metrics: Callable[[dict[str, float], int], None] = _no_tracking
    #: Whether the launcher has been told that this rank's node is about to go (a preemption
    #: notice; cheap, local, no collective), or None where no notices exist (local launcher).
    preemption_notice: Callable[[], bool] | None = None
