"""The training recipe of one rank: :class:`Trainer` (plain torch + torch.distributed, no Ray).

A launcher (Ray Train, or the in-process/multiprocess local launcher) runs
``Trainer(job, ctx).run()`` on every rank. The steps, in order:

- ``Trainer(job, ctx)``: :func:`~distnoisy.engine.components.build_components` builds
  everything the rank trains with (seeds, labels, method, precision, networks with DDP on several
  ranks, store, optimizers, schedulers, training and evaluation streams, in the order stated
  there), identically on a fresh start and on resume;
- :meth:`Trainer.restore`: the latest checkpoint, if the launcher has one (:mod:`checkpoint`);
- per epoch :meth:`Trainer.train_epoch` (one pass per method phase), :meth:`Trainer.evaluate`
  (validation, test, memorization), :meth:`Trainer.checkpoint` (reported to the launcher);
- after the last epoch :meth:`Trainer.finalize`: final predictions on the training set and the
  skipped-sample list, which the last checkpoint's ``outputs/`` is written from.

Every step but the checkpoint file writing runs on every rank: most hold collectives.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from distnoisy.config import Config
from distnoisy.data.device_augment import decode_batch, to_device
from distnoisy.data.mixing import distinct_classes
from distnoisy.engine import checkpoint as ckpt
from distnoisy.engine import collectives
from distnoisy.engine.checks import (
    check_bad_samples,
    check_class_mix,
    count_bad_samples,
    gather_bad_samples,
)
from distnoisy.engine.components import Components, build_components, eval_stream
from distnoisy.engine.evaluate import accuracies, predict
from distnoisy.engine.job import Job, WorkerContext
from distnoisy.engine.outputs import RunInfo, write_outputs, write_rank_outputs
from distnoisy.engine.precision import input_layout
from distnoisy.engine.progress import StepProgress, interval
from distnoisy.engine.step import train_step
from distnoisy.methods.base import StepInput
from distnoisy.store.parts import load_parts, save_part

log = logging.getLogger(__name__)


#: With preemption notices (the Ray launcher), how often the ranks agree on whether one came
#: (a one-value all-reduce): every this many optimizer steps.
PREEMPTION_POLL_STEPS = 10


@dataclass
class _EpochSums:
    """The running sums of an epoch's training metrics on one rank: ``dev`` (on the device:
    loss*b, correct) and ``host`` (b, distinct labels per batch, batches)."""

    dev: Tensor
    host: Tensor

    def state(self) -> Tensor:
        """All five sums as one float64 CPU tensor (for a mid-epoch checkpoint)."""
        return torch.cat([self.dev.cpu(), self.host])

    def load(self, per_rank: list[Tensor], rank: int, world_size: int) -> None:
        """Continue from a checkpoint's per-rank sums: this rank's own on as many ranks as
        wrote them (bit-exact), otherwise their total on rank 0 and zeros elsewhere (the
        epoch's total is the same; its float64 summation order is not)."""
        if len(per_rank) == world_size:
            mine = per_rank[rank].double()
        elif rank == 0:
            mine = torch.stack([t.double() for t in per_rank]).sum(0)
        else:
            mine = torch.zeros(5, dtype=torch.float64)
        self.dev = mine[:2].to(self.dev.device)
        self.host = mine[2:].clone()


@dataclass
class FinalOutputs:
    """What :meth:`Trainer.finalize` gathered for the run's outputs (rank 0 writes them)."""

    num_bad: int
    bad_list: list[dict[str, str]]


class Trainer:
    """Train one rank of ``job``; ``ctx`` connects it to its launcher.

    Building a Trainer builds its :class:`~distnoisy.engine.components.Components` (``parts``,
    frozen). Beside them and its ``job`` and ``ctx`` it holds only the training state that
    changes as it trains and that a checkpoint restores: the epoch to start at, the history,
    the best validation epoch and its weights.

    Parameters
    ----------
    job
        The job description (the same on every rank).
    ctx
        Rank, world size, device, and the launcher's ``report``/``restore``.
    """

    def __init__(self, job: Job, ctx: WorkerContext) -> None:
        self.job, self.ctx = job, ctx
        self.parts: Components = build_components(job, ctx)
        self._log_setup()
        self.start_epoch = 0
        self.history: list[dict[str, float]] = []
        # Best validation epoch so far ({"epoch", "val_acc"}) and its weights (rank 0).
        self.best: dict[str, Any] | None = None
        self.best_weights: dict[str, dict[str, Tensor]] | None = None
        # Where a mid-epoch checkpoint stopped the epoch it was taken in (the checkpoint's
        # ``position``), until that epoch continues from there.
        self.position: dict[str, Any] | None = None
        self._noticed_preemption = False

    @property
    def cfg(self) -> Config:
        return self.job.config

    @property
    def rank(self) -> int:
        return self.ctx.rank

    @property
    def device(self) -> torch.device:
        return self.ctx.device

    # -- the recipe ---------------------------------------------------------------------------
    def run(self) -> None:
        """Restore, then train, evaluate and checkpoint every remaining epoch."""
        self.restore()
        epochs = self.cfg.train.epochs
        for epoch in range(self.start_epoch, epochs):
            t0 = time.perf_counter()
            metrics = self.train_epoch(epoch)
            metrics.update(self.evaluate(epoch))
            first_opt = next(iter(self.parts.optimizers.values()))
            metrics["lr"] = float(first_opt.param_groups[0]["lr"])
            metrics["epoch_time_s"] = time.perf_counter() - t0
            metrics["epoch"] = epoch
            self.history.append(metrics)
            self._log_epoch(epoch, metrics)
            self._track_best(epoch, metrics)
            final = self.finalize() if epoch == epochs - 1 else None
            self.checkpoint(epoch, metrics, final)
        self.parts.store.close()

    def _log_setup(self) -> None:
        """Rank 0 says what the hot path does (when not the defaults) and what the store holds."""
        if self.rank != 0:
            return
        t, precision, store = self.cfg.train, self.parts.precision, self.parts.store
        if precision.dtype is not None or t.channels_last or t.compile:
            log.info(
                "hot path: %s autocast on %s, channels_last=%s, compile=%s",
                precision.name,
                precision.device_type,
                t.channels_last,
                t.compile,
            )
        per_sample = store.bytes_per_sample()
        log.info(
            "per-sample store: %s, %d bytes per sample (%s)",
            store.backend,
            sum(per_sample.values()),
            ", ".join(f"{k} {v}" for k, v in per_sample.items()),
        )

    # -- restore ------------------------------------------------------------------------------
    def restore(self) -> None:
        """Continue from the launcher's latest checkpoint, if any (every rank reads it)."""
        p = self.parts
        with self.ctx.restore() as ckpt_dir:
            if ckpt_dir is None:
                return
            state = ckpt.load_state(Path(ckpt_dir) / ckpt.STATE_FILE)
            for name, m in p.networks.models.items():
                m.load_state_dict(state["networks"][name])
            for name, opt in p.optimizers.items():
                opt.load_state_dict(state["optimizers"][name])
                p.schedulers[name].load_state_dict(state["schedulers"][name])
            if state.get("store_parts"):  # one file per rank of a partitioned store
                load_parts(p.store, Path(ckpt_dir), int(state["store_parts"]))
            else:
                p.store.load_state_dict(state["store"])
            p.method.load_state_dict(state["method"])
            scaler = p.method.grad_scaler
            if scaler is not None and state.get("grad_scaler"):
                scaler.load_state_dict(state["grad_scaler"])  # fp16: the loss scale reached
            self.start_epoch, self.history = int(state["epoch"]) + 1, list(state["history"])
            self.position = state.get("position")  # mid-epoch: where epoch start_epoch stopped
            self.best = state["best"]
            best_file = Path(ckpt_dir) / ckpt.BEST_WEIGHTS_FILE
            if self.rank == 0 and best_file.exists():
                self.best_weights = torch.load(best_file, map_location="cpu", weights_only=True)
            # Last: everything above may draw random numbers that the uninterrupted run drew
            # before its checkpoint was taken.
            ckpt.restore_rank_rng(state["rng"], self.device, p.method)
            if self.rank == 0:
                at = self.position
                where = f", optimizer step {at['done']} of it" if at else ""
                log.info("resumed from %s at epoch %d%s", ckpt_dir, self.start_epoch, where)

    # -- one epoch ----------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass per method phase, then the schedulers; the epoch's training metrics.

        After a mid-epoch checkpoint (:attr:`position`) the epoch continues at the batch where
        it stopped, with the running sums and the ``on_epoch_start`` values of then.
        """
        p, device = self.parts, self.device
        at, self.position = self.position, None
        metrics: dict[str, float] = dict(p.method.on_epoch_start(epoch))
        for m in p.networks.models.values():
            m.train()
        # On the device, read once per epoch (no host synchronisation per step): loss*b and
        # correct on given labels. On the host: b, distinct labels per batch (summed), batches.
        # Each term is rounded to float32 before the float64 sum, as it always was.
        sums = _EpochSums(
            torch.zeros(2, dtype=torch.float64, device=device), torch.zeros(3, dtype=torch.float64)
        )
        if at is not None:
            metrics = dict(at["epoch_start"])  # the store has moved on since they were read
            sums.load(at["sums"], self.rank, self.ctx.world_size)
        autocast = p.precision.autocast()
        progress = self._progress(epoch)
        total = sum(stream.steps_per_epoch for stream in p.train.by_phase.values())
        done = 0  # optimizer steps of this epoch so far, over the phases
        for phase_no, (phase, stream) in enumerate(p.train.by_phase.items()):
            steps = stream.steps_per_epoch
            first = 0 if at is None or phase_no > at["phase"] else min(at["step"], steps)
            done += first
            if first:
                p.method.seek(phase, first)
                progress.skip(first)
            for step, batch in enumerate(stream.epoch_batches(epoch, first), start=first):
                index = batch["index"]
                x = self._input(batch)
                y = p.labels.given_device[to_device(index, device)]
                inp = StepInput(x, y, index, epoch, step, steps, phase)
                p.store.prefetch(index)  # the batch's rows arrive during the forward pass
                loss, correct = train_step(
                    p.method, p.networks.nets, p.optimizers, p.store, inp, autocast
                )
                b = len(index)
                mix = distinct_classes(p.labels.mix[index.numpy()])
                sums.dev += torch.stack([(loss.double() * b).float(), correct.float()]).double()
                sums.host += torch.tensor([b, mix, 1], dtype=torch.float32)
                progress.update(b, sums.dev[0], float(sums.host[0]))
                done += 1
                if done < total and self._save_now(done):
                    position = {"epoch": epoch, "phase": phase_no, "step": step + 1}
                    self.checkpoint_mid(epoch, {**position, "done": done}, metrics, sums)
        for sched in p.schedulers.values():
            sched.step()
        metrics["bad_samples"] = check_bad_samples(p.train.first, self.job.data.num_train, self.cfg)
        sums_all = torch.cat([sums.dev.cpu(), sums.host])
        totals = collectives.all_reduce_sum(sums_all.to(p.comm_device)).cpu()
        metrics["train_loss"] = float(totals[0] / totals[2])
        metrics["train_acc_given"] = float(totals[1] / totals[2])
        metrics["batch_class_mix"] = check_class_mix(
            float(totals[3] / totals[4]),
            p.labels.class_counts,
            p.train.local_batch_size,
            self.cfg,
            warn=self.rank == 0 and epoch == self.start_epoch,
        )
        return metrics

    def _save_now(self, done: int) -> bool:
        """Whether to checkpoint after the epoch's optimizer step ``done`` (the same answer on
        every rank): every ``train.checkpoint_every_steps`` steps, and once when the launcher
        has a preemption notice for any rank's node (polled every
        :data:`PREEMPTION_POLL_STEPS` steps, a collective)."""
        every = self.cfg.train.checkpoint_every_steps
        if every and done % every == 0:
            return True
        notice = self.ctx.preemption_notice
        if notice is None or self._noticed_preemption or done % PREEMPTION_POLL_STEPS:
            return False
        flag = torch.tensor([1.0 if notice() else 0.0], device=self.parts.comm_device)
        if float(collectives.all_reduce_sum(flag)) == 0:
            return False
        self._noticed_preemption = True
        if self.rank == 0:
            log.warning("preemption notice: checkpointing at optimizer step %d of the epoch", done)
        return True

    def _progress(self, epoch: int) -> StepProgress:
        """The epoch's step-progress reporter (train.log_every_steps; rank 0 only)."""
        steps = sum(s.steps_per_epoch for s in self.parts.train.by_phase.values())
        return StepProgress(
            interval(self.cfg.train.log_every_steps, steps),
            steps,
            epoch,
            self.cfg.train.epochs,
            self.ctx.world_size,
            self.ctx.log_metrics,
            enabled=self.rank == 0,
        )

    def _input(self, batch: dict[str, Tensor]) -> Tensor:
        """The batch's network input on the device: augmented there with
        ``data.augment_on=device``, in channels-last layout with ``train.channels_last``."""
        train = self.parts.train
        if "jpeg" in batch:  # data.decode=gpu
            side = round(self.cfg.data.image_size * 256 / 224)
            x, bad = decode_batch(batch["jpeg"], batch["jpeg_offsets"], train.decode_on, side)
            if bad:
                keys = batch["index"][bad].tolist()
                log.warning("data.decode=gpu: undecodable images %s replaced in their batch", keys)
        else:
            x = to_device(batch["image"], self.device)
        if train.device_augment is not None:
            x = train.device_augment(x, to_device(batch["augment"], self.device))
        return input_layout(x, self.cfg.train.channels_last)

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Validation and test accuracy, and memorization of the corrupted training labels."""
        p = self.parts
        method, models = p.method, p.networks.models
        metrics: dict[str, float] = {}
        val, test = p.eval.val, p.eval.test
        if val is not None:
            targets = [val.labels] if val.noisy is None else [val.labels, val.noisy]
            accs = accuracies(method, models, val.stream, targets, self.device)
            metrics["val_acc"] = accs[0]
            if val.noisy is not None:
                metrics["val_acc_noisy"] = accs[1]
        if test is not None:
            metrics["test_acc"] = accuracies(
                method, models, test.stream, [test.labels], self.device
            )[0]
        corrupted, given = p.labels.corrupted, p.labels.given_cpu
        if corrupted is not None and corrupted.any():
            # Each rank counts its own rows of the store (a partitioned store has no others).
            lo, hi = p.store.owned_range()
            pred = p.store.local("train_pred")
            mask = corrupted[lo:hi] & (pred >= 0)
            counts = [float((pred[mask] == given[lo:hi][mask]).sum()), float(mask.sum())]
            hits, total = collectives.all_reduce_sum(torch.tensor(counts, device=p.comm_device))
            metrics["memorized"] = float(hits / total) if total > 0 else float("nan")
        return metrics

    def _log_epoch(self, epoch: int, metrics: dict[str, float]) -> None:
        self.ctx.log_metrics({k: v for k, v in metrics.items() if k != "epoch"}, epoch)
        if self.rank != 0:
            return
        log.info(
            "epoch %d/%d  loss %.4f  train_acc(given) %.3f  test_acc %s  memorized(training "
            "preds) %s  (%.1fs)",
            epoch + 1,
            self.cfg.train.epochs,
            metrics["train_loss"],
            metrics["train_acc_given"],
            f"{metrics['test_acc']:.3f}" if "test_acc" in metrics else "-",
            f"{metrics['memorized']:.3f}" if "memorized" in metrics else "-",
            metrics["epoch_time_s"],
        )

    def _track_best(self, epoch: int, metrics: dict[str, float]) -> None:
        """Keep the weights of the best validation epoch (the first one on ties, as
        ``best_val_epoch`` in the summary)."""
        val_acc = metrics.get("val_acc")
        if val_acc is None or not np.isfinite(val_acc):
            return
        if self.best is not None and val_acc <= self.best["val_acc"]:
            return
        self.best = {"epoch": epoch, "val_acc": float(val_acc)}
        if self.rank == 0:
            self.best_weights = {
                name: {k: v.detach().cpu().clone() for k, v in m.state_dict().items()}
                for name, m in self.parts.networks.models.items()
            }

    # -- end of run, checkpoint ---------------------------------------------------------------
    def finalize(self) -> FinalOutputs:
        """Final predictions on the un-augmented training set, into the store, and the skipped
        samples of every stream (collectives: every rank)."""
        p = self.parts
        train_eval = eval_stream(p.train.manifest, p.eval.transform, self.ctx)
        index, probs = predict(p.method, p.networks.models, train_eval, self.device)
        p.store.set("final_prob", index, probs)
        val = p.eval.val.stream if p.eval.val is not None else None
        test = p.eval.test.stream if p.eval.test is not None else None
        bad_list = gather_bad_samples(
            ("train", p.train.first), ("train", train_eval), ("val", val), ("test", test)
        )
        return FinalOutputs(count_bad_samples(bad_list), bad_list)

    def state(
        self,
        epoch: int,
        rng: list[dict[str, Any]],
        store: dict[str, Tensor],
        position: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """The checkpoint dict after ``epoch``, or mid-way through the next one at
        ``position`` (layout in :mod:`distnoisy.engine.checkpoint`)."""
        p = self.parts
        scaler = p.method.grad_scaler
        return {
            "format": ckpt.FORMAT_VERSION,
            "position": position,
            "epoch": epoch,
            "history": self.history,
            "networks": {name: m.state_dict() for name, m in p.networks.models.items()},
            "optimizers": {name: opt.state_dict() for name, opt in p.optimizers.items()},
            "schedulers": {name: sch.state_dict() for name, sch in p.schedulers.items()},
            "store": store,
            "method": p.method.state_dict(),
            "rng": rng,
            "best": self.best,
            "grad_scaler": scaler.state_dict() if scaler else None,
        }

    def checkpoint_mid(
        self, epoch: int, position: dict[str, Any], start: dict[str, float], sums: _EpochSums
    ) -> None:
        """A checkpoint in the middle of ``epoch`` at ``position`` (``{"epoch", "phase",
        "step", "done"}``), with ``on_epoch_start``'s values ``start`` and every rank's sums."""
        t0 = time.perf_counter()
        gathered = collectives.all_gather_object(sums.state())  # a collective: every rank
        position = {**position, "epoch_start": start, "sums": list(gathered)}
        report = {"epoch": epoch, ckpt.EPOCH_STEP: position["done"]}
        self.checkpoint(epoch - 1, report, None, position)
        if self.rank == 0:
            log.info(
                "checkpoint at optimizer step %d of epoch %d (%.2fs)",
                position["done"],
                epoch + 1,
                time.perf_counter() - t0,
            )

    def checkpoint(
        self,
        epoch: int,
        metrics: dict[str, float],
        final: FinalOutputs | None,
        position: dict[str, Any] | None = None,
    ) -> None:
        """Report the epoch to the launcher with a checkpoint; after the last epoch the
        checkpoint also holds the run's ``outputs/``. With ``position`` (mid-epoch, see
        :meth:`checkpoint_mid`), ``epoch`` is the last whole one.

        Rank 0 writes ``state.pt``. A partitioned store is saved as one part per rank, each
        written by its owner into the rank's own checkpoint directory (the launcher merges
        them), as are its outputs; a replicated store is saved whole in ``state.pt``.
        """
        store = self.parts.store
        rng = ckpt.gather_rng(self.device, self.parts.method)  # a collective: before the rank test
        parted = store.backend == "partitioned"
        rows = {} if parted else store.state_dict()
        ckpt_dir = None
        if self.rank == 0 or parted:
            ckpt_dir = Path(tempfile.mkdtemp(prefix="distnoisy-ckpt-"))
        try:
            if parted:
                assert ckpt_dir is not None
                save_part(store, ckpt_dir, self.rank)
            networks = None
            if self.rank == 0:
                assert ckpt_dir is not None
                state = self.state(epoch, rng, rows, position)
                if parted:
                    state["store_parts"] = self.ctx.world_size
                ckpt.save_atomic(state, ckpt_dir / ckpt.STATE_FILE)
                if self.best_weights is not None:
                    ckpt.save_atomic(self.best_weights, ckpt_dir / ckpt.BEST_WEIGHTS_FILE)
                networks = state["networks"]
            if final is not None:
                self._write_final(ckpt_dir, networks, final)
            self.ctx.report(metrics, ckpt_dir)
        finally:
            if ckpt_dir is not None:
                shutil.rmtree(ckpt_dir, ignore_errors=True)

    def _write_final(
        self, ckpt_dir: Path | None, networks: dict[str, Any] | None, final: FinalOutputs
    ) -> None:
        """The run's ``outputs/`` in the checkpoint: weights on rank 0; label issues, sample
        stats and summary by rank 0 (replicated store) or by every rank (partitioned)."""
        p = self.parts
        info = RunInfo(
            p.method,
            p.labels.given,
            p.labels.clean,
            p.labels.keys,
            self.history,
            self.job.data,
            self.cfg,
            bad_samples=final.num_bad,
            bad_sample_list=final.bad_list,
        )
        out = ckpt_dir / ckpt.OUTPUTS_DIR if ckpt_dir is not None else None
        if out is not None:
            out.mkdir()
        if p.store.backend == "partitioned":
            assert out is not None
            write_rank_outputs(out, p.store, info, p.comm_device)
        elif self.rank == 0:
            assert out is not None
            write_outputs(out, p.store, info)
        if self.rank == 0:
            assert out is not None and networks is not None
            # Final weights of every network, loadable with weights_only=True (LIMIT's q_init,
            # fine-tuning, analysis); the best-by-validation ones beside them.
            ckpt.save_atomic(networks, out / ckpt.WEIGHTS_FILE)
            if self.best_weights is not None:
                ckpt.save_atomic(self.best_weights, out / ckpt.BEST_WEIGHTS_FILE)


def run_worker(job: Job, ctx: WorkerContext) -> None:
    """Train one rank: ``Trainer(job, ctx).run()`` (what both launchers call on every rank)."""
    Trainer(job, ctx).run()
