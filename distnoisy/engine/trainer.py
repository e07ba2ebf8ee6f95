"""The training recipe of one rank: :class:`Trainer` (plain torch + torch.distributed, no Ray).

A launcher (Ray Train, or the in-process/multiprocess local launcher) runs
``Trainer(job, ctx).run()`` on every rank. The steps, in order:

- :meth:`Trainer.setup`: seeds, labels, method, networks (DDP on several ranks), store,
  optimizers, schedulers, training and evaluation streams;
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
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from distnoisy.data.device_augment import DeviceAugment, decode_batch, to_device
from distnoisy.data.mixing import distinct_classes
from distnoisy.engine import checkpoint as ckpt
from distnoisy.engine import collectives
from distnoisy.engine.checks import (
    check_bad_samples,
    check_class_mix,
    count_bad_samples,
    gather_bad_samples,
)
from distnoisy.engine.components import (
    make_optimizer,
    make_scheduler,
    network_builder,
    training_labels,
)
from distnoisy.engine.evaluate import accuracies, predict
from distnoisy.engine.job import Job, WorkerContext
from distnoisy.engine.outputs import RunInfo, write_outputs, write_rank_outputs
from distnoisy.engine.precision import (
    input_layout,
    maybe_compile,
    resolve_precision,
    to_channels_last,
)
from distnoisy.engine.step import run_field_specs, train_step
from distnoisy.methods import METHODS, Method
from distnoisy.methods.base import Networks, StepInput
from distnoisy.store import make_store
from distnoisy.store.parts import load_parts, save_part

log = logging.getLogger(__name__)

#: Batch size of the evaluation streams (per rank).
EVAL_BATCH_SIZE = 256


@dataclass
class EvalSet:
    """An evaluation stream with its clean labels and, optionally, noisy ones (validation)."""

    stream: Any
    labels: Tensor
    noisy: Tensor | None = None


@dataclass
class FinalOutputs:
    """What :meth:`Trainer.finalize` gathered for the run's outputs (rank 0 writes them)."""

    num_bad: int
    bad_list: list[dict[str, str]]


class Trainer:
    """Train one rank of ``job``; ``ctx`` connects it to its launcher.

    Parameters
    ----------
    job
        The job description (the same on every rank).
    ctx
        Rank, world size, device, and the launcher's ``report``/``restore``.
    """

    def __init__(self, job: Job, ctx: WorkerContext) -> None:
        self.job, self.ctx = job, ctx
        self.cfg, self.spec = job.config, job.data
        self.rank, self.world, self.device = ctx.rank, ctx.world_size, ctx.device
        # Collectives run on the training device with NCCL, on the CPU with gloo.
        self.comm_device = self.device if self.device.type == "cuda" else torch.device("cpu")
        self.epochs = self.cfg.train.epochs
        self.start_epoch = 0
        self.history: list[dict[str, float]] = []
        # Best validation epoch so far ({"epoch", "val_acc"}) and its weights (rank 0).
        self.best: dict[str, Any] | None = None
        self.best_weights: dict[str, dict[str, Tensor]] | None = None

    # -- the recipe ---------------------------------------------------------------------------
    def run(self) -> None:
        """Set up, restore, then train, evaluate and checkpoint every remaining epoch."""
        self.setup()
        self.restore()
        for epoch in range(self.start_epoch, self.epochs):
            t0 = time.perf_counter()
            metrics = self.train_epoch(epoch)
            metrics.update(self.evaluate(epoch))
            metrics["lr"] = float(next(iter(self.opts.values())).param_groups[0]["lr"])
            metrics["epoch_time_s"] = time.perf_counter() - t0
            metrics["epoch"] = epoch
            self.history.append(metrics)
            self._log_epoch(epoch, metrics)
            self._track_best(epoch, metrics)
            final = self.finalize() if epoch == self.epochs - 1 else None
            self.checkpoint(epoch, metrics, final)
        self.store.close()

    # -- setup --------------------------------------------------------------------------------
    def setup(self) -> None:
        """Build everything a run needs, identically on a fresh start and on resume."""
        cfg = self.cfg
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        np.random.seed(cfg.seed + self.rank)
        self.given_np, self.clean_np, self.keys = training_labels(self.spec)
        self.given = torch.from_numpy(self.given_np)
        # On the device once: a step's labels are gathered there, with no copy per step.
        self.given_dev = self.given.to(self.device)
        self._setup_model()
        self._setup_store_and_optimizers()
        self._setup_train_streams()
        self._setup_eval_sets()

    def _setup_model(self) -> None:
        cfg, spec = self.cfg, self.spec
        self.method: Method = METHODS.get(cfg.method.name)(
            cfg.method,
            num_samples=spec.num_train,
            num_classes=spec.num_classes,
            epochs=self.epochs,
            resources=dict(self.job.resources),
            seed=cfg.seed,
        )
        t = cfg.train
        self.precision = resolve_precision(t.precision, self.device)
        self.method.grad_scaler = self.precision.grad_scaler()
        build = network_builder(cfg, spec.num_classes, spec.in_channels)
        models = self.method.build_networks(build)
        self.models: dict[str, nn.Module] = {
            k: to_channels_last(m.to(self.device), t.channels_last) for k, m in models.items()
        }
        if cfg.train.init_weights:  # before the method's setup (teachers copy the start)
            from distnoisy.engine.init_weights import load_init_weights

            load_init_weights(self.models, cfg.train.init_weights)
        self.method.setup(self.models, self.device)
        self.nets: Networks = dict(self.models)  # what the steps run: DDP on several ranks
        if self.world > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            self.nets = {k: DDP(m, device_ids=ids) for k, m in self.models.items()}
        # Evaluation runs the eager models; training steps the compiled ones (if asked).
        self.nets = {k: maybe_compile(m, t.compile, k) for k, m in self.nets.items()}
        if self.rank == 0 and (self.precision.dtype is not None or t.channels_last or t.compile):
            log.info(
                "hot path: %s autocast on %s, channels_last=%s, compile=%s",
                self.precision.name,
                self.precision.device_type,
                t.channels_last,
                t.compile,
            )

    def _setup_store_and_optimizers(self) -> None:
        n, c = self.spec.num_train, self.spec.num_classes
        specs = {**run_field_specs(self.epochs, c), **self.method.fields()}
        self.store = make_store(
            n,
            specs,
            backend=self.cfg.store.backend,
            dtype=self.cfg.store.dtype,
            comm_device=self.comm_device,
            world_size=self.world,
        )
        self.method.attach(self.store)
        if self.rank == 0:
            per_sample = self.store.bytes_per_sample()
            log.info(
                "per-sample store: %s, %d bytes per sample (%s)",
                self.store.backend,
                sum(per_sample.values()),
                ", ".join(f"{k} {v}" for k, v in per_sample.items()),
            )
        self.opts = self.method.build_optimizers(self.nets, lambda p: make_optimizer(self.cfg, p))
        self.scheds = {k: make_scheduler(self.cfg, opt) for k, opt in self.opts.items()}

    def _train_stream(self, phase: int) -> Any:
        from distnoisy.data.stream import BalancedSubset, TrainStream, make_transform, mix_seed

        cfg, spec = self.cfg, self.spec
        # Each phase (ELR+: each network) has its own shuffling, augmentation draws and, with
        # class-balanced epochs, its own draw: the official ELR+ builds one loader per network.
        seed = cfg.seed if phase == 0 else mix_seed(cfg.seed, phase)
        on_device = cfg.data.augment_on == "device"
        balanced = None
        if cfg.data.exclude_file:  # the same mask on every rank (post-training's fine-tune)
            from distnoisy.data.stream.sampling import KeptSubset, read_index_file

            n = spec.num_train
            balanced = KeptSubset(n, read_index_file(cfg.data.exclude_file, n))
        if cfg.data.balanced_batches > 0:
            balanced = BalancedSubset(
                self.given_np,
                cfg.data.balanced_batches * cfg.train.batch_size,
                seed=seed,
                resample=cfg.data.balanced_resample,
            )
        return TrainStream(
            self.train_manifest,
            rank=self.rank,
            world_size=self.world,
            local_batch_size=self.local_bs,
            seed=seed,
            split=cfg.data.split,
            transform=make_transform(
                spec.train_transform,
                spec.mean,
                spec.std,
                seed=seed,
                size=cfg.data.image_size,
                defer=on_device,
                encoded=self.decode_on is not None,
            ),
            shuffle_buffer=cfg.data.shuffle_buffer,
            open_shards=cfg.data.open_shards,
            num_workers=cfg.data.num_workers,
            balanced=balanced,
        )

    def _setup_train_streams(self) -> None:
        from distnoisy.data.shards import read_manifest

        self.local_bs = self.cfg.train.batch_size // self.world
        self.train_manifest = read_manifest(self.spec.train_dir)
        # The class mix is measured on the data's own labels: synthetic noise would hide a
        # class-ordered stream (40% random labels make any batch look mixed).
        clean, given = self.clean_np, self.given_np
        self.mix_labels = given if clean is None else np.where(clean >= 0, clean, given)
        self.class_counts = np.bincount(self.mix_labels, minlength=self.spec.num_classes)
        phases = self.method.phases()
        self.decode_on = self._decode_device()
        self.train_streams = {ph: self._train_stream(k) for k, ph in enumerate(phases)}
        self.device_augment = None
        if self.cfg.data.augment_on == "device":
            spec = self.spec
            self.device_augment = DeviceAugment(
                spec.train_transform, spec.mean, spec.std, self.cfg.data.image_size
            )
        # Every phase reads the same data: the first one's bad samples are the data's.
        self.first_stream = self.train_streams[phases[0]]

    def _decode_device(self) -> torch.device | None:
        """The device that decodes training JPEGs with ``data.decode=gpu``; None = the loader
        (the setting's fallback, with a logged notice saying why)."""
        if self.cfg.data.decode != "gpu":
            return None
        from distnoisy.data.stream.decode import jpeg_decode_device

        where, reason = jpeg_decode_device(self.device)
        kind, ext = self.spec.train_transform, self.train_manifest.image_ext
        if reason is None and (kind != "imagenet_train" or ext != "jpg"):
            reason = f"it reads JPEG shards with ImageNet-style transforms only (not {kind}, {ext})"
        if reason is not None:
            if self.rank == 0:
                log.warning("data.decode=gpu: %s; decoding on the CPU", reason)
            return None
        return where

    def _eval_set(self, directory: str | None, noisy_file: str | None = None) -> EvalSet | None:
        from distnoisy.data.shards import read_labels, read_manifest
        from distnoisy.data.stream import EvalStream

        if directory is None:
            return None
        manifest = read_manifest(directory)
        labels = torch.from_numpy(np.asarray(read_labels(manifest)[0], dtype=np.int64))
        stream = EvalStream(
            manifest,
            rank=self.rank,
            world_size=self.world,
            batch_size=EVAL_BATCH_SIZE,
            transform=self.eval_tf,
        )
        noisy = None
        if noisy_file is not None:
            from distnoisy.data.noise import load_label_file

            given = load_label_file(noisy_file, len(labels), self.spec.num_classes).labels
            noisy = torch.from_numpy(np.asarray(given, dtype=np.int64))
        return EvalSet(stream, labels, noisy)

    def _setup_eval_sets(self) -> None:
        from distnoisy.data.stream import make_transform

        spec = self.spec
        self.eval_tf = make_transform(
            spec.eval_transform, spec.mean, spec.std, size=self.cfg.data.image_size
        )
        self.test_set = self._eval_set(spec.test_dir)
        self.val_set = self._eval_set(spec.val_dir, spec.val_label_file)
        clean, given = self.clean_np, self.given_np
        self.corrupted = (
            torch.from_numpy((clean != given) & (clean >= 0)) if clean is not None else None
        )

    # -- restore ------------------------------------------------------------------------------
    def restore(self) -> None:
        """Continue from the launcher's latest checkpoint, if any (every rank reads it)."""
        with self.ctx.restore() as ckpt_dir:
            if ckpt_dir is None:
                return
            state = ckpt.load_state(Path(ckpt_dir) / ckpt.STATE_FILE)
            for name, m in self.models.items():
                m.load_state_dict(state["networks"][name])
            for name, opt in self.opts.items():
                opt.load_state_dict(state["optimizers"][name])
                self.scheds[name].load_state_dict(state["schedulers"][name])
            if state.get("store_parts"):  # one file per rank of a partitioned store
                load_parts(self.store, Path(ckpt_dir), int(state["store_parts"]))
            else:
                self.store.load_state_dict(state["store"])
            self.method.load_state_dict(state["method"])
            scaler = self.method.grad_scaler
            if scaler is not None and state.get("grad_scaler"):
                scaler.load_state_dict(state["grad_scaler"])  # fp16: the loss scale reached
            self.start_epoch, self.history = int(state["epoch"]) + 1, list(state["history"])
            self.best = state["best"]
            best_file = Path(ckpt_dir) / ckpt.BEST_WEIGHTS_FILE
            if self.rank == 0 and best_file.exists():
                self.best_weights = torch.load(best_file, map_location="cpu", weights_only=True)
            # Last: everything above may draw random numbers that the uninterrupted run drew
            # before its checkpoint was taken.
            ckpt.restore_rank_rng(state["rng"], self.device, self.method)
            if self.rank == 0:
                log.info("resumed from %s at epoch %d", ckpt_dir, self.start_epoch)

    # -- one epoch ----------------------------------------------------------------------------
    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass per method phase, then the schedulers; the epoch's training metrics."""
        metrics: dict[str, float] = dict(self.method.on_epoch_start(epoch))
        for m in self.models.values():
            m.train()
        # On the device, read once per epoch (no host synchronisation per step): loss*b and
        # correct on given labels. On the host: b, distinct labels per batch (summed), batches.
        # Each term is rounded to float32 before the float64 sum, as it always was.
        dev_sums = torch.zeros(2, dtype=torch.float64, device=self.device)
        host_sums = torch.zeros(3, dtype=torch.float64)
        autocast = self.precision.autocast()
        for phase, stream in self.train_streams.items():
            steps = stream.steps_per_epoch
            for step, batch in enumerate(stream.epoch_batches(epoch)):
                index = batch["index"]
                x = self._input(batch)
                y = self.given_dev[to_device(index, self.device)]
                inp = StepInput(x, y, index, epoch, step, steps, phase)
                self.store.prefetch(index)  # the batch's rows arrive during the forward pass
                loss, correct = train_step(
                    self.method, self.nets, self.opts, self.store, inp, autocast
                )
                b = len(index)
                mix = distinct_classes(self.mix_labels[index.numpy()])
                dev_sums += torch.stack([(loss.double() * b).float(), correct.float()]).double()
                host_sums += torch.tensor([b, mix, 1], dtype=torch.float32)
        for sched in self.scheds.values():
            sched.step()
        metrics["bad_samples"] = check_bad_samples(self.first_stream, self.spec.num_train, self.cfg)
        sums = torch.cat([dev_sums.cpu(), host_sums])
        totals = collectives.all_reduce_sum(sums.to(self.comm_device)).cpu()
        metrics["train_loss"] = float(totals[0] / totals[2])
        metrics["train_acc_given"] = float(totals[1] / totals[2])
        metrics["batch_class_mix"] = check_class_mix(
            float(totals[3] / totals[4]),
            self.class_counts,
            self.local_bs,
            self.cfg,
            warn=self.rank == 0 and epoch == self.start_epoch,
        )
        return metrics

    def _input(self, batch: dict[str, Tensor]) -> Tensor:
        """The batch's network input on the device: augmented there with
        ``data.augment_on=device``, in channels-last layout with ``train.channels_last``."""
        if "jpeg" in batch:  # data.decode=gpu
            side = round(self.cfg.data.image_size * 256 / 224)
            x, bad = decode_batch(batch["jpeg"], batch["jpeg_offsets"], self.decode_on, side)
            if bad:
                keys = batch["index"][bad].tolist()
                log.warning("data.decode=gpu: undecodable images %s replaced in their batch", keys)
        else:
            x = to_device(batch["image"], self.device)
        if self.device_augment is not None:
            x = self.device_augment(x, to_device(batch["augment"], self.device))
        return input_layout(x, self.cfg.train.channels_last)

    def evaluate(self, epoch: int) -> dict[str, float]:
        """Validation and test accuracy, and memorization of the corrupted training labels."""
        metrics: dict[str, float] = {}
        val, test = self.val_set, self.test_set
        if val is not None:
            targets = [val.labels] if val.noisy is None else [val.labels, val.noisy]
            accs = accuracies(self.method, self.models, val.stream, targets, self.device)
            metrics["val_acc"] = accs[0]
            if val.noisy is not None:
                metrics["val_acc_noisy"] = accs[1]
        if test is not None:
            metrics["test_acc"] = accuracies(
                self.method, self.models, test.stream, [test.labels], self.device
            )[0]
        if self.corrupted is not None and self.corrupted.any():
            # Each rank counts its own rows of the store (a partitioned store has no others).
            lo, hi = self.store.owned_range()
            pred = self.store.local("train_pred")
            mask = self.corrupted[lo:hi] & (pred >= 0)
            counts = [float((pred[mask] == self.given[lo:hi][mask]).sum()), float(mask.sum())]
            hits, total = collectives.all_reduce_sum(torch.tensor(counts, device=self.comm_device))
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
            self.epochs,
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
                for name, m in self.models.items()
            }

    # -- end of run, checkpoint ---------------------------------------------------------------
    def finalize(self) -> FinalOutputs:
        """Final predictions on the un-augmented training set, into the store, and the skipped
        samples of every stream (collectives: every rank)."""
        from distnoisy.data.stream import EvalStream

        train_eval = EvalStream(
            self.train_manifest,
            rank=self.rank,
            world_size=self.world,
            batch_size=EVAL_BATCH_SIZE,
            transform=self.eval_tf,
        )
        index, probs = predict(self.method, self.models, train_eval, self.device)
        self.store.set("final_prob", index, probs)
        val = self.val_set.stream if self.val_set is not None else None
        test = self.test_set.stream if self.test_set is not None else None
        bad_list = gather_bad_samples(
            ("train", self.first_stream), ("train", train_eval), ("val", val), ("test", test)
        )
        return FinalOutputs(count_bad_samples(bad_list), bad_list)

    def state(
        self, epoch: int, rng: list[dict[str, Any]], store: dict[str, Tensor]
    ) -> dict[str, Any]:
        """The checkpoint dict after ``epoch`` (layout in :mod:`distnoisy.engine.checkpoint`)."""
        return {
            "format": ckpt.FORMAT_VERSION,
            "epoch": epoch,
            "history": self.history,
            "networks": {name: m.state_dict() for name, m in self.models.items()},
            "optimizers": {name: opt.state_dict() for name, opt in self.opts.items()},
            "schedulers": {name: sch.state_dict() for name, sch in self.scheds.items()},
            "store": store,
            "method": self.method.state_dict(),
            "rng": rng,
            "best": self.best,
            "grad_scaler": scaler.state_dict() if (scaler := self.method.grad_scaler) else None,
        }

    def checkpoint(self, epoch: int, metrics: dict[str, float], final: FinalOutputs | None) -> None:
        """Report the epoch to the launcher with a checkpoint; after the last epoch the
        checkpoint also holds the run's ``outputs/``.

        Rank 0 writes ``state.pt``. A partitioned store is saved as one part per rank, each
        written by its owner into the rank's own checkpoint directory (the launcher merges
        them), as are its outputs; a replicated store is saved whole in ``state.pt``.
        """
        rng = ckpt.gather_rng(self.device, self.method)  # a collective: before the rank test
        parted = self.store.backend == "partitioned"
        store = {} if parted else self.store.state_dict()
        ckpt_dir = None
        if self.rank == 0 or parted:
            ckpt_dir = Path(tempfile.mkdtemp(prefix="distnoisy-ckpt-"))
        try:
            if parted:
                assert ckpt_dir is not None
                save_part(self.store, ckpt_dir, self.rank)
            networks = None
            if self.rank == 0:
                assert ckpt_dir is not None
                state = self.state(epoch, rng, store)
                if parted:
                    state["store_parts"] = self.world
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
        info = RunInfo(
            self.method,
            self.given_np,
            self.clean_np,
            self.keys,
            self.history,
            self.spec,
            self.cfg,
            bad_samples=final.num_bad,
            bad_sample_list=final.bad_list,
        )
        out = ckpt_dir / ckpt.OUTPUTS_DIR if ckpt_dir is not None else None
        if out is not None:
            out.mkdir()
        if self.store.backend == "partitioned":
            assert out is not None
            write_rank_outputs(out, self.store, info, self.comm_device)
        elif self.rank == 0:
            assert out is not None
            write_outputs(out, self.store, info)
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
