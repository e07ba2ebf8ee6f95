"""The typed description of one training job, as the launchers hand it to every rank.

A :class:`Job` is built once in the driver (:func:`distnoisy.train.train`) and travels by pickle:
to Ray Train workers (inside ``train_loop_config``) and to the local launcher's spawned
processes. It holds plain, picklable values only: the resolved config, the data description,
where to track metrics and what the method prepared in the driver.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: keeps this module free of the data and config imports
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
