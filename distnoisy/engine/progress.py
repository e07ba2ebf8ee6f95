"""Progress inside an epoch: every ``train.log_every_steps`` steps, rank 0 logs one line (step,
images/s, the epoch's running loss, the epoch's and the run's ETA) and the same figures as
MLflow step metrics. Long epochs (Clothing1M: minutes on a GPU, hours on a CPU) are otherwise
silent until they end."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

log = logging.getLogger(__name__)

#: ``train.log_every_steps`` unset: epochs shorter than this are not reported step by step.
AUTO_MIN_STEPS = 100
#: ``train.log_every_steps`` unset: about this many lines per (long) epoch.
AUTO_LINES_PER_EPOCH = 10


def interval(setting: int | None, steps_per_epoch: int) -> int:
    """Steps between progress lines; 0 = none.

    ``setting`` None picks by epoch length: nothing for epochs under :data:`AUTO_MIN_STEPS`
    steps, else about :data:`AUTO_LINES_PER_EPOCH` lines per epoch. ``0`` turns them off.
    """
    if setting is not None:
        return max(0, int(setting))
    if steps_per_epoch < AUTO_MIN_STEPS:
        return 0
    return max(1, steps_per_epoch // AUTO_LINES_PER_EPOCH)


def format_duration(seconds: float) -> str:
    """``1h02m``, ``3m05s``, ``42s``."""
    s = max(0, round(seconds))
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    if s >= 60:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s}s"


class StepProgress:
    """One epoch's progress reporter (a no-op off rank 0 or with a zero interval).

    Parameters
    ----------
    every
        Steps between reports (see :func:`interval`); 0 = none.
    steps_per_epoch
        Steps of the epoch on this rank, over all of the method's phases.
    epoch, epochs
        This epoch (0-based) and the run's number of epochs.
    world_size
        Ranks: each processes the same number of images per step, so the global rate is
        ``world_size`` times this rank's.
    log_metrics
        ``(metrics, step)``: the MLflow logger (rank 0 logs, the others are no-ops).
    enabled
        False off rank 0.
    """

    def __init__(
        self,
        every: int,
        steps_per_epoch: int,
        epoch: int,
        epochs: int,
        world_size: int,
        log_metrics: Callable[[dict[str, float], int], None],
        enabled: bool = True,
    ) -> None:
        self.every = every if enabled else 0
        self.steps = steps_per_epoch
        self.epoch, self.epochs = epoch, epochs
        self.world_size = world_size
        self.log_metrics = log_metrics
        self.done = 0
        self.resumed_at = 0  # steps done before a mid-epoch resume (not timed here)
        self.images = 0
        self.t0 = time.perf_counter()

    def skip(self, steps: int) -> None:
        """Count ``steps`` the epoch did before a mid-epoch checkpoint: step numbers and MLflow
        steps go on from there; the rate and ETA are timed on the steps run since."""
        self.done += steps
        self.resumed_at = self.done

    def update(self, batch_size: int, loss_sum: torch.Tensor, count: float) -> None:
        """Count one step of ``batch_size`` images on this rank; report every ``every`` steps.

        ``loss_sum`` (on the device) and ``count`` are the epoch's running sums of loss*b and b;
        they are read (one host synchronisation) only when a line is due.
        """
        self.done += 1
        self.images += batch_size
        if not self.every or self.done % self.every or self.done >= self.steps:
            return  # the epoch line reports the last step
        elapsed = max(time.perf_counter() - self.t0, 1e-9)
        per_step = elapsed / (self.done - self.resumed_at)
        epoch_left = (self.steps - self.done) * per_step
        run_left = epoch_left + (self.epochs - self.epoch - 1) * self.steps * per_step
        rate = self.images * self.world_size / elapsed
        loss = float(loss_sum) / max(count, 1.0)
        global_step = self.epoch * self.steps + self.done
        self.log_metrics(
            {
                "step_images_per_s": rate,
                "step_loss": loss,
                "step_eta_epoch_s": epoch_left,
                "step_eta_run_s": run_left,
            },
            global_step,
        )
        log.info(
            "epoch %d/%d  step %d/%d  %.1f images/s  loss %.4f  ETA epoch %s, run %s",
            self.epoch + 1,
            self.epochs,
            self.done,
            self.steps,
            rate,
            loss,
            format_duration(epoch_left),
            format_duration(run_left),
        )
