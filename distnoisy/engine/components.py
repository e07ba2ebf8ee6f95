"""Everything one rank trains with, built in one place: :func:`build_components`.

:func:`build_components` returns a frozen :class:`Components` (labels, method, precision,
networks, store, optimizers, schedulers, training streams, evaluation sets), constructed in the
order its docstring states: that order is part of a run's result (random draws, the
method's hooks). :class:`distnoisy.engine.trainer.Trainer` holds the components beside its
mutable training state (epoch, history, best validation epoch).

The helpers below it (:func:`training_labels`, :func:`network_builder`, :func:`make_optimizer`,
:func:`make_scheduler`) are also what the driver's checks and post-training use, so they build
the same labels and networks as the run.

Plain torch, no Ray.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel as DDP

from distnoisy.config import Config
from distnoisy.data.device_augment import DeviceAugment
from distnoisy.data.prepare import DataSpec
from distnoisy.engine.job import Job, WorkerContext
from distnoisy.engine.precision import Precision, maybe_compile, resolve_precision, to_channels_last
from distnoisy.engine.step import run_field_specs
from distnoisy.methods import METHODS, Method
from distnoisy.models import build_model
from distnoisy.store import Store, make_store

if TYPE_CHECKING:
    from distnoisy.data.shard_format import Manifest
    from distnoisy.data.stream import EvalStream, TrainStream

log = logging.getLogger(__name__)

#: Batch size of the evaluation streams (per rank).
EVAL_BATCH_SIZE = 256


# -- what a rank trains with --------------------------------------------------------------------
@dataclass(frozen=True)
class Labels:
    """The training set's labels, by global index (no random draws build them).

    Attributes
    ----------
    given
        The labels trained on (noisy), int64.
    clean
        Clean labels where known (-1 elsewhere, e.g. Clothing1M's overlap), or None.
    keys
        The samples' keys.
    given_cpu
        ``given`` as a tensor (shares its memory): the memorization count reads it.
    given_device
        ``given`` on the training device once: a step's labels are gathered there, no copy
        per step.
    corrupted
        Where the given label is known to be wrong (``clean >= 0`` and ``given != clean``), or
        None without clean labels.
    mix
        The labels the class mix of a batch is measured on: the clean ones where known, else the
        given ones (synthetic noise would hide a class-ordered stream: 40% random labels make any
        batch look mixed).
    class_counts
        Samples per class of ``mix``.
    """

    given: np.ndarray
    clean: np.ndarray | None
    keys: list[str]
    given_cpu: Tensor
    given_device: Tensor
    corrupted: Tensor | None
    mix: np.ndarray
    class_counts: np.ndarray


@dataclass(frozen=True)
class Networks:
    """The method's networks, by name.

    Attributes
    ----------
    models
        The eager modules on the device: evaluation, checkpoints and best weights use them.
    nets
        What the training steps and optimizers run: ``models`` wrapped in DDP on several ranks,
        then compiled with ``train.compile`` (the same modules when world size is 1 and
        compile is off).
    """

    models: dict[str, nn.Module]
    nets: dict[str, nn.Module]


@dataclass(frozen=True)
class TrainStreams:
    """The training streams: one per method phase (ELR+: one per network), in phase order.

    Attributes
    ----------
    manifest
        The training set's shard manifest.
    local_batch_size
        ``train.batch_size`` divided by the world size.
    decode_on
        The device decoding JPEGs with ``data.decode=gpu``; None = the loader does.
    by_phase
        The stream of each phase, in the order the phases run.
    device_augment
        The augmentation applied on the device with ``data.augment_on=device``, else None.
    """

    manifest: Manifest
    local_batch_size: int
    decode_on: torch.device | None
    by_phase: dict[str, TrainStream]
    device_augment: DeviceAugment | None

    @property
    def first(self) -> TrainStream:
        """The first phase's stream: every phase reads the same data, so its skipped samples
        are the data's."""
        return next(iter(self.by_phase.values()))


@dataclass(frozen=True)
class EvalSet:
    """An evaluation stream with its clean labels and, optionally, noisy ones (validation)."""

    stream: EvalStream
    labels: Tensor
    noisy: Tensor | None = None


@dataclass(frozen=True)
class EvalSets:
    """The evaluation transform and the validation and test sets (None where the data has none)."""

    transform: Any
    val: EvalSet | None
    test: EvalSet | None


@dataclass(frozen=True)
class Components:
    """Everything one rank trains with, from :func:`build_components`.

    Frozen: no component is replaced during a run (their own state, e.g. weights, the store's
    rows or the method's buffers, changes as it trains and is what a checkpoint holds).

    Attributes
    ----------
    comm_device
        Where collectives run: the training device with NCCL, the CPU with gloo.
    """

    comm_device: torch.device
    labels: Labels
    method: Method
    precision: Precision
    networks: Networks
    store: Store
    optimizers: dict[str, torch.optim.Optimizer]
    schedulers: dict[str, torch.optim.lr_scheduler.LRScheduler]
    train: TrainStreams
    eval: EvalSets


# -- the builder ------------------------------------------------------------------------------
def build_components(job: Job, ctx: WorkerContext) -> Components:
    """Build what rank ``ctx.rank`` trains ``job`` with, identically on a fresh start and on resume.

    The order is part of the run's result (steps drawing random numbers or calling the method's
    hooks must not move):

    1. seeds: torch's global seed ``seed`` (identical initial weights on every rank), numpy's
       ``seed + rank``;
    2. labels: given, clean, keys, corrupted mask, class-mix labels and counts (no draws);
    3. the method (``method.name`` with the driver's resources);
    4. precision, and the method's fp16 gradient scaler;
    5. networks: built by the method (draws from torch's seed), moved to the device, the
       ``train.init_weights`` loaded, the method's ``setup`` (teachers copy those start
       weights), DDP on several ranks, ``torch.compile`` with ``train.compile``;
    6. the store: the run's fields and the method's, attached to the method;
    7. optimizers over the training networks, then one scheduler each;
    8. training streams, one per method phase (with the JPEG decode device and the device
       augmentation);
    9. evaluation sets: the evaluation transform, test, validation.

    Restoring a checkpoint comes after all of it (:meth:`Trainer.restore`), so a resumed run
    builds the same components as the uninterrupted one before loading their state.
    """
    cfg, spec, device = job.config, job.data, ctx.device
    comm_device = device if device.type == "cuda" else torch.device("cpu")
    torch.manual_seed(cfg.seed)  # 1.
    np.random.seed(cfg.seed + ctx.rank)
    labels = build_labels(spec, device)  # 2.
    method: Method = METHODS.get(cfg.method.name)(  # 3.
        cfg.method,
        num_samples=spec.num_train,
        num_classes=spec.num_classes,
        epochs=cfg.train.epochs,
        resources=dict(job.resources),
        seed=cfg.seed,
    )
    precision = resolve_precision(cfg.train.precision, device)  # 4.
    method.grad_scaler = precision.grad_scaler()
    networks = build_networks(cfg, spec, method, ctx)  # 5.
    store = build_store(cfg, spec, method, comm_device, ctx.world_size)  # 6.
    optimizers = method.build_optimizers(networks.nets, lambda p: make_optimizer(cfg, p))  # 7.
    schedulers = {name: make_scheduler(cfg, opt) for name, opt in optimizers.items()}
    train = build_train_streams(cfg, spec, method.phases(), labels, ctx)  # 8.
    evals = build_eval_sets(cfg, spec, ctx)  # 9.
    return Components(
        comm_device=comm_device,
        labels=labels,
        method=method,
        precision=precision,
        networks=networks,
        store=store,
        optimizers=optimizers,
        schedulers=schedulers,
        train=train,
        eval=evals,
    )


def build_labels(spec: DataSpec, device: torch.device) -> Labels:
    """The training set's :class:`Labels` (``given_device`` on ``device``)."""
    given, clean, keys = training_labels(spec)
    given_cpu = torch.from_numpy(given)
    corrupted = torch.from_numpy((clean != given) & (clean >= 0)) if clean is not None else None
    mix = given if clean is None else np.where(clean >= 0, clean, given)
    counts = np.bincount(mix, minlength=spec.num_classes)
    return Labels(given, clean, keys, given_cpu, given_cpu.to(device), corrupted, mix, counts)


def build_networks(cfg: Config, spec: DataSpec, method: Method, ctx: WorkerContext) -> Networks:
    """The method's networks on ``ctx.device`` (step 5 of :func:`build_components`)."""
    t, device = cfg.train, ctx.device
    built = method.build_networks(network_builder(cfg, spec.num_classes, spec.in_channels))
    models = {k: to_channels_last(m.to(device), t.channels_last) for k, m in built.items()}
    if t.init_weights:  # before the method's setup (teachers copy the start)
        from distnoisy.engine.init_weights import load_init_weights

        load_init_weights(models, t.init_weights)
    method.setup(models, device)
    nets: dict[str, nn.Module] = dict(models)
    if ctx.world_size > 1:
        ids = [device.index] if device.type == "cuda" else None
        nets = {k: DDP(m, device_ids=ids) for k, m in models.items()}
    # Evaluation runs the eager models; training steps the compiled ones (if asked).
    nets = {k: maybe_compile(m, t.compile, k) for k, m in nets.items()}
    return Networks(models, nets)


def build_store(
    cfg: Config, spec: DataSpec, method: Method, comm_device: torch.device, world_size: int
) -> Store:
    """The per-sample store with the run's fields and the method's, attached to ``method``."""
    specs = {**run_field_specs(cfg.train.epochs, spec.num_classes), **method.fields()}
    store = make_store(
        spec.num_train,
        specs,
        backend=cfg.store.backend,
        dtype=cfg.store.dtype,
        comm_device=comm_device,
        world_size=world_size,
    )
    method.attach(store)
    return store


def build_train_streams(
    cfg: Config, spec: DataSpec, phases: tuple[str, ...], labels: Labels, ctx: WorkerContext
) -> TrainStreams:
    """One training stream per phase, in phase order (step 8 of :func:`build_components`)."""
    from distnoisy.data.shards import read_manifest

    local_bs = cfg.train.batch_size // ctx.world_size
    manifest = read_manifest(spec.train_dir)
    decode_on = jpeg_decode_device(cfg, spec, manifest, ctx)
    streams = {
        ph: train_stream(cfg, spec, k, labels.given, manifest, local_bs, decode_on, ctx)
        for k, ph in enumerate(phases)
    }
    augment = None
    if cfg.data.augment_on == "device":
        augment = DeviceAugment(spec.train_transform, spec.mean, spec.std, cfg.data.image_size)
    return TrainStreams(manifest, local_bs, decode_on, streams, augment)


def train_stream(
    cfg: Config,
    spec: DataSpec,
    phase: int,
    given: np.ndarray,
    manifest: Manifest,
    local_batch_size: int,
    decode_on: torch.device | None,
    ctx: WorkerContext,
) -> TrainStream:
    """The training stream of phase number ``phase`` (its own seed past the first)."""
    from distnoisy.data.stream import BalancedSubset, TrainStream, make_transform, mix_seed

    # Each phase (ELR+: each network) has its own shuffling, augmentation draws and, with
    # class-balanced epochs, its own draw: the official ELR+ builds one loader per network.
    seed = cfg.seed if phase == 0 else mix_seed(cfg.seed, phase)
    balanced = None
    if cfg.data.exclude_file:  # the same mask on every rank (post-training's fine-tune)
        from distnoisy.data.stream.sampling import KeptSubset, read_index_file

        n = spec.num_train
        balanced = KeptSubset(n, read_index_file(cfg.data.exclude_file, n))
    if cfg.data.balanced_batches > 0:
        balanced = BalancedSubset(
            given,
            cfg.data.balanced_batches * cfg.train.batch_size,
            seed=seed,
            resample=cfg.data.balanced_resample,
        )
    transform = make_transform(
        spec.train_transform,
        spec.mean,
        spec.std,
        seed=seed,
        size=cfg.data.image_size,
        defer=cfg.data.augment_on == "device",
        encoded=decode_on is not None,
    )
    return TrainStream(
        manifest,
        rank=ctx.rank,
        world_size=ctx.world_size,
        local_batch_size=local_batch_size,
        seed=seed,
        split=cfg.data.split,
        transform=transform,
        shuffle_buffer=cfg.data.shuffle_buffer,
        open_shards=cfg.data.open_shards,
        num_workers=cfg.data.num_workers,
        balanced=balanced,
    )


def jpeg_decode_device(
    cfg: Config, spec: DataSpec, manifest: Manifest, ctx: WorkerContext
) -> torch.device | None:
    """The device that decodes training JPEGs with ``data.decode=gpu``; None = the loader
    (the setting's fallback, with a logged notice saying why)."""
    if cfg.data.decode != "gpu":
        return None
    from distnoisy.data.stream.decode import jpeg_decode_device as decode_device

    where, reason = decode_device(ctx.device)
    kind, ext = spec.train_transform, manifest.image_ext
    if reason is None and (kind != "imagenet_train" or ext != "jpg"):
        reason = f"it reads JPEG shards with ImageNet-style transforms only (not {kind}, {ext})"
    if reason is not None:
        if ctx.rank == 0:
            log.warning("data.decode=gpu: %s; decoding on the CPU", reason)
        return None
    return where


def build_eval_sets(cfg: Config, spec: DataSpec, ctx: WorkerContext) -> EvalSets:
    """The evaluation transform, then the test and validation sets (step 9)."""
    from distnoisy.data.stream import make_transform

    transform = make_transform(spec.eval_transform, spec.mean, spec.std, size=cfg.data.image_size)
    test = eval_set(spec, spec.test_dir, transform, ctx)
    val = eval_set(spec, spec.val_dir, transform, ctx, spec.val_label_file)
    return EvalSets(transform, val, test)


def eval_stream(manifest: Manifest, transform: Any, ctx: WorkerContext) -> EvalStream:
    """This rank's share of an un-augmented pass over ``manifest``'s set."""
    from distnoisy.data.stream import EvalStream

    return EvalStream(
        manifest,
        rank=ctx.rank,
        world_size=ctx.world_size,
        batch_size=EVAL_BATCH_SIZE,
        transform=transform,
    )


def eval_set(
    spec: DataSpec,
    directory: str | None,
    transform: Any,
    ctx: WorkerContext,
    noisy_file: str | None = None,
) -> EvalSet | None:
    """The evaluation set in ``directory`` (None for None), with the noisy labels of
    ``noisy_file`` if given."""
    from distnoisy.data.shards import read_labels, read_manifest

    if directory is None:
        return None
    manifest = read_manifest(directory)
    labels = torch.from_numpy(np.asarray(read_labels(manifest)[0], dtype=np.int64))
    stream = eval_stream(manifest, transform, ctx)
    noisy = None
    if noisy_file is not None:
        from distnoisy.data.noise import load_label_file

        given = load_label_file(noisy_file, len(labels), spec.num_classes).labels
        noisy = torch.from_numpy(np.asarray(given, dtype=np.int64))
    return EvalSet(stream, labels, noisy)


# -- the pieces the driver and post-training share ----------------------------------------------
def training_labels(spec: DataSpec) -> tuple[np.ndarray, np.ndarray | None, list[str]]:
    """Given labels, clean labels (or None) and keys of the training set, by global index."""
    from distnoisy.data.noise import load_label_file
    from distnoisy.data.shards import read_labels, read_manifest

    # Clean labels may be known for a subset only (-1 elsewhere), e.g. Clothing1M's overlap.
    labels, clean, keys = read_labels(read_manifest(spec.train_dir), partial_clean=True)
    if spec.label_file is not None:
        lf = load_label_file(spec.label_file, spec.num_train, spec.num_classes)
        labels = lf.labels
        if lf.clean_labels is not None:
            clean = lf.clean_labels
    return np.asarray(labels, dtype=np.int64), clean, list(keys)


def network_builder(cfg: Config, num_classes: int, in_channels: int) -> Callable[..., nn.Module]:
    """``build(name=None, weights=None)``: ``model.name`` with ``model.weights`` by default."""

    def build(name: str | None = None, weights: str | None = None) -> nn.Module:
        if name is None:
            name, weights = cfg.model.name, cfg.model.weights
        return build_model(name, num_classes, in_channels, weights)

    return build


def make_optimizer(cfg: Config, params: Any) -> torch.optim.Optimizer:
    """The ``train.optimizer`` (SGD with momentum, or Adam) over ``params``."""
    t = cfg.train
    if t.optimizer == "sgd":
        return torch.optim.SGD(params, lr=t.lr, momentum=t.momentum, weight_decay=t.weight_decay)
    return torch.optim.Adam(params, lr=t.lr, weight_decay=t.weight_decay)


def make_scheduler(cfg: Config, opt: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The ``train.scheduler`` of ``opt``, stepped once per epoch (constant by default)."""
    t = cfg.train
    if t.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=t.epochs)
    if t.scheduler == "multistep":
        return torch.optim.lr_scheduler.MultiStepLR(
            opt, milestones=list(t.milestones), gamma=t.gamma
        )
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
