"""Run configuration: OmegaConf structured dataclasses, YAML config files, ``key=value`` overrides.

The schema is typed and closed: an unknown key or a value of the wrong type is a
:class:`~distnoisy.core.errors.ConfigError` that names the key and the valid choices. Each method
declares its own parameter dataclass (``method.*`` keys), so ``method.lam`` is valid for ELR and
an error for CE.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import textwrap
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from distnoisy.core.choices import (
    CIFAR_N_SETS,
    DATASETS,
    INSTANCE_FEATURES,
    LAUNCHERS,
    NOISE_KINDS,
    SPLITS,
    STORE_BACKENDS,
    STORE_DTYPES,
)
from distnoisy.core.errors import ConfigError
from distnoisy.core.method_params import MethodParams

OPTIMIZERS = ("sgd", "adam")
PRECISIONS = ("fp32", "bf16", "fp16")
DECODERS = ("cpu", "gpu")
AUGMENT_ON = ("host", "device")
SCHEDULERS = ("none", "cosine", "multistep")


@dataclass
class LongtailConfig:
    """``data.name=longtail``: the controlled long-tail set (distnoisy/data/longtail.py)."""

    # Classes of the generated set.
    num_classes: int = 10
    # Subpopulations (clusters around their own centre) the classes are split into.
    subpopulations: int = 400
    # Zipf exponent of the rank-size law: the r-th subpopulation has round(max_size * r**-zipf)
    # training instances (at least 1).
    zipf: float = 1.0
    # Training instances of the largest subpopulation (rank 1 of the Zipf law).
    max_size: int = 200
    # Test instances of a subpopulation: test_per_subpopulation + round(test_share * its size).
    test_per_subpopulation: int = 3
    test_share: float = 0.25
    # Side of the generated square grey images, in pixels.
    image_size: int = 8
    # Share of a centre's variance that comes from its class prototype (the rest is its own).
    class_weight: float = 0.3
    # Std of an instance around its subpopulation centre (centres have unit variance per pixel).
    jitter: float = 0.3
    # Seed of the generator (the set, not the run: every run seed sees the same images).
    seed: int = 0


@dataclass
class DataConfig:
    # The dataset; "shards" reads any set converted to distnoisy's shard format.
    name: str = "digits"
    # Where prepared shards live (digits: cache written on first use). None = ~/.cache/distnoisy.
    # clothing1m/cifar: the converter's output dir, a local path or a URL (s3://, gs://,
    # http(s)://, any fsspec protocol). With a remote ``urls``, a local ``root`` holds the
    # derived files (noise label files). fashion_mnist: the directory of the four idx files
    # (None = /usr/share/datasets/fashion-mnist); the shards are cached in ~/.cache/distnoisy.
    root: str | None = None
    # Shards for ``name=shards``: a dir (holding train/ [test/ val/], or a manifest.json) or URL;
    # or the training shards of one set, whole, as a brace pattern (.../train-{000000..000199}.tar)
    # or a comma-separated list. For clothing1m/cifar10/cifar100/fashion_mnist the same forms
    # name the converter's output (takes precedence over ``root``).
    urls: str | None = None
    # How shards reach DDP ranks: "sample" = one global order, identical results for any number
    # of workers; "shard" = each rank reads only its own shards (scales to large data).
    split: str = "shard"
    # digits: fraction of the images held out as the clean test set.
    test_fraction: float = 0.2
    # digits: fraction of the non-test images held out as a clean validation split (val_acc,
    # model selection, sweeps); 0 = none. ``shards``: a ``val/`` set beside train/ is used.
    val_fraction: float = 0.0
    # fashion_mnist: train on a class-balanced random subset of this many of the 60,000 training
    # images (seed 0, so every run seed sees the same images; validation comes out of them);
    # 0 = all. For cheap CPU runs; the test set stays whole.
    train_size: int = 0
    # Samples per shard of the sets distnoisy converts on first use (digits, longtail,
    # fashion_mnist).
    shard_size: int = 256
    # Loader processes per rank (0 = read in the training process).
    num_workers: int = 0
    # Samples held in the shuffle buffer each rank draws its batches from.
    shuffle_buffer: int = 1000
    # Shards read at once, their samples interleaved at random before the shuffle buffer: with
    # the shard order shuffled every pass, this mixes sets whose shards each hold few classes.
    open_shards: int = 4
    # Class-balanced epochs (the Clothing1M protocol): each epoch is this many global batches of
    # noisy samples drawn with at most num_batches*batch_size/C per class; 0 = the whole set.
    balanced_batches: int = 0
    # Redraw the balanced subset every epoch (DivideMix), or draw it once (the ELR+ code).
    balanced_resample: bool = True
    # Abort when more than this fraction of the training set turns out unreadable (corrupt
    # images, truncated tar members); they are skipped, counted and named up to that point.
    max_bad_fraction: float = 0.01
    # Crop size of the ImageNet-style transforms (Clothing1M: resize 256 -> crop 224); the
    # resize is image_size * 256 / 224. Lower it for cheap runs.
    image_size: int = 224
    # Where images are decoded: "cpu" (the loader processes) or "gpu" (torchvision's nvJPEG
    # decoder on the training device, for JPEG shards; needs data.augment_on=device). Without
    # a CUDA device, or where torchvision cannot decode on it, the run decodes on the CPU and
    # logs a notice.
    decode: str = "cpu"
    # Where the random crop, flip and normalisation run: "host" (the loader, per sample) or
    # "device" (uint8 batches are copied to the training device, pinned and non-blocking, and
    # augmented there with the same per-sample draws). Identical crops for images whose
    # resized size is square (pre-resized shards, CIFAR, digits); others are first cut to their
    # central square on the host (docs/benchmarks.md#gpu-throughput-to-be-measured).
    augment_on: str = "host"
    # Samples never trained on: a .npy (integer array) or .parquet (an ``index`` column) of
    # global training indices, e.g. post-training's removed set (docs/posttrain.md). Every rank
    # skips the same samples; steps per epoch come from the kept count. None = train on all.
    exclude_file: str | None = None
    longtail: LongtailConfig = field(default_factory=LongtailConfig)


@dataclass
class NoiseConfig:
    # Synthetic noise added to the dataset's labels, a label file of your own, or none
    # (docs/methods.md#noise-model).
    kind: str = "symmetric"
    # Flip probability of the synthetic kinds, in [0, 1) (instance: the mean of the per-sample
    # rates).
    rate: float = 0.4
    # Seed of the noise realisation (independent of the run's seed: every run trains on the
    # same noisy labels).
    seed: int = 0
    # ELR/DAL convention: the replacement label is drawn from all C classes
    # (docs/methods.md#noise-model).
    include_true_class: bool = False
    # Label file for ``kind=file`` (parquet/csv/npy keyed by global sample index), or the
    # CIFAR-N release's CIFAR-10_human.pt / CIFAR-100_human.pt for ``kind=cifar_n``.
    file: str | None = None
    # ``kind=cifar_n``: the human label set (docs/methods.md#noise-model). CIFAR-10N: aggre,
    # random1, random2, random3, worse; CIFAR-100N: noisy_fine, noisy_coarse (20 superclasses).
    cifar_n: str = "aggre"
    # ``kind=instance`` only: what the random projection sees. "raw" = the pixel values as
    # stored (0..255), like the authors' generator; "standardized" = per-feature z-scores (the
    # law of distnoisy's earlier label files; flips spread over more classes).
    instance_features: str = "raw"
    # ``data.name=longtail``, ``kind=instance`` only: a noise rate that depends on the
    # subpopulation. The samples of subpopulations of at most ``tail_size`` training instances
    # get mean rate ``tail_rate``, the others ``rate`` (docs/analysis.md#the-long-tail-dataset).
    tail_rate: float | None = None
    # With noise.tail_rate: the largest subpopulation size (training instances) that counts as
    # the tail.
    tail_size: int = 1


@dataclass
class ModelConfig:
    # The network (distnoisy/models), or timm/<name> for any timm model (the timm extra; list
    # them with --list-models '*pattern*').
    name: str = "small_cnn"
    # Local path to pretrained weights (nothing is downloaded at run time); timm models: a
    # state dict in timm's format.
    weights: str | None = None


@dataclass
class TrainConfig:
    # Passes over the training set.
    epochs: int = 60
    # Global batch size, split evenly over the workers.
    batch_size: int = 64
    # Learning rate (the initial one under a scheduler).
    lr: float = 1e-3
    # The optimizer: sgd or adam.
    optimizer: str = "adam"
    # SGD momentum (unused by Adam).
    momentum: float = 0.9
    # L2 weight decay of the optimizer.
    weight_decay: float = 0.0
    # Learning-rate schedule over the epochs: none, cosine or multistep.
    scheduler: str = "none"
    # scheduler=multistep: the epochs at which the learning rate is multiplied by gamma.
    milestones: list[int] = field(default_factory=list)
    # scheduler=multistep: the factor applied at each milestone.
    gamma: float = 0.1
    # Autocast precision of the forward passes: "fp32" (off), "bf16", or "fp16" (with a
    # gradient scaler). Losses are computed in float32 whatever the setting. Where the device
    # does not support it (fp16 on a CPU) the run falls back to fp32 with a logged notice.
    precision: str = "fp32"
    # Networks and inputs in channels-last memory layout (faster convolutions on tensor-core
    # GPUs; results equal up to float rounding).
    channels_last: bool = False
    # torch.compile the networks used for training steps; if compiling fails the run goes on
    # eagerly with a logged notice.
    compile: bool = False
    # Start every network from a distnoisy weights file (``{network: state_dict}``, as
    # training's or post-training's weights.pt writes it), head included; None = fresh init
    # (model.weights). Ignored when resuming (the checkpoint wins).
    init_weights: str | None = None
    # A checkpoint every K optimizer steps as well, holding the position in the epoch's sample
    # order: a resumed run (failure, resize, resume=true) continues mid-epoch, no sample
    # skipped or repeated (docs/cluster.md#spot-and-preemptible-nodes). 0 = per epoch only.
    checkpoint_every_steps: int = 0
    # Progress inside an epoch: every this many steps rank 0 logs step, images/s, loss and ETA
    # (and the same as MLflow step metrics). None = by epoch length (about 10 lines an epoch
    # for epochs of 100+ steps, none for shorter ones); 0 = never.
    log_every_steps: int | None = None


@dataclass
class ScalingConfig:
    # Ray Train workers on a Ray cluster, or local: ranks without Ray, one in the driver or
    # spawned processes (which share the cores: each gets cores // num_workers threads, at
    # least one, unless OMP_NUM_THREADS is set).
    launcher: str = "ray"
    # Training ranks (DDP processes); the global batch is split evenly over them. With
    # min_workers below it, the most ranks of an elastic run.
    num_workers: int = 2
    # Ray launcher: the fewest ranks an elastic run goes on with after losing nodes (it grows
    # back to num_workers when capacity returns); None = num_workers (a fixed-size run).
    # Needs data.split=sample and a train.batch_size every allowed count divides.
    min_workers: int | None = None
    # Elastic runs: seconds between Ray Train's checks for capacity to grow the worker group.
    resize_interval_s: float = 60.0
    # One GPU per rank.
    use_gpu: bool = False
    # Ray address to join; None joins RAY_ADDRESS, else the cluster `ray start` left running on
    # this machine, else starts a local one; "local" always starts one of the run's own.
    address: str | None = None
    # Ray launcher: how many times the worker group is restarted from the last checkpoint
    # after a worker fails (0 = the run fails with it).
    max_failures: int = 0
    # Seconds to wait for a Ray cluster that may grow (an autoscaler) to provide the workers'
    # CPUs/GPUs; a cluster that cannot grow (the local one) fails at once.
    resource_timeout_s: float = 600.0


@dataclass
class TrackingConfig:
    # Track the run in MLflow (params, per-epoch metrics, outputs); the run directory's
    # outputs are the same either way.
    enabled: bool = True
    # MLflow tracking URI (sqlite:///PATH, http://HOST:PORT); None = sqlite:///<absolute
    # cwd>/mlflow.db.
    uri: str | None = None
    # MLflow experiment the run goes to (created on first use).
    experiment: str = "distnoisy"
    # MLflow run name; None = the run directory's name.
    run_name: str | None = None
    # Extra MLflow run tags, e.g. tracking.tags.team=vision (values are strings).
    tags: dict[str, str] = field(default_factory=dict)
    # Log the driver machine's CPU/GPU/memory use as MLflow system metrics (psutil).
    system_metrics: bool = False
    # Log the final (and best-by-validation) network as MLflow models (mlflow.pytorch.log_model
    # with signature and input example): mlflow.pytorch.load_model("runs:/<id>/model").
    log_model: bool = True
    # Register the final network's MLflow model under this name (a new version per run);
    # None = not registered.
    register_model: str | None = None


@dataclass
class StoreConfig:
    # replicated (every rank holds every row) | partitioned (each rank about N/W rows) | auto
    # (partitioned when one replica would exceed 1 GiB on several workers; docs/benchmarks.md)
    backend: str = "auto"
    # Storage of the float fields that tolerate it (targets, loss/margin histories,
    # probabilities): float32 | float16 | bfloat16 (half the memory; exact fields stay as they are).
    dtype: str = "float32"
    # Rows of label_issues_top.parquet (the most likely label issues, merged over partitions).
    top_k: int = 10000


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    noise: NoiseConfig = field(default_factory=NoiseConfig)
    method: Any = field(default_factory=MethodParams)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    # Seed of model initialisation and data order (the noise has its own: noise.seed).
    seed: int = 0
    # The run directory; None = runs/<name or timestamp-method>.
    output_dir: str | None = None
    # The run's name (its directory under runs/ when output_dir is not given).
    name: str | None = None
    # Continue the run in output_dir from its last checkpoint.
    resume: bool = False


def keys_help(config_files: bool = True, keys_below: bool = False) -> str:
    """How run config keys are given and where they are documented (the commands' ``--help``).

    Parameters
    ----------
    config_files
        Also explain ``--config FILE.yaml`` (the commands that take it).
    keys_below
        The help lists every key after this text (``python -m distnoisy.train --help``).

    Returns
    -------
    str
        A few wrapped paragraphs naming the config sections, read off :class:`Config`.
    """
    defaults = Config()
    names = [f.name for f in dataclasses.fields(Config)]
    sections = [n for n in names if dataclasses.is_dataclass(getattr(defaults, n))]
    top = [n for n in names if n not in sections]
    where = "listed below" if keys_below else "python -m distnoisy.train --help"
    given = "Config keys are given as key=value (e.g. method.name=ce train.epochs=10)"
    files = (
        "; a --config FILE.yaml holds the same keys as YAML (a run's config.yaml is one). Later "
        "sources win: defaults < --config files < key=value."
    )
    paragraphs = (
        given + (files if config_files else "."),
        f"Sections: {', '.join(f'{s}.*' for s in sections)}; top-level keys: {', '.join(top)}. "
        "The method.* keys depend on method.name.",
        f"Every key with its default and meaning, and each method's keys: {where}; also "
        "README.md, section 'Configuration' (defaults in distnoisy/config.py). An unknown key is "
        "an error that lists the valid ones.",
    )
    return "\n\n".join(textwrap.fill(p, width=88) for p in paragraphs)


def split_argv(argv: list[str]) -> tuple[list[str], list[str]]:
    """Separate ``--config FILE`` options from ``key=value`` overrides."""
    files: list[str] = []
    overrides: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg in ("--config", "-c"):
            try:
                files.append(next(it))
            except StopIteration:
                raise ConfigError("--config needs a YAML file path after it") from None
        elif arg.startswith("--config="):
            files.append(arg.split("=", 1)[1])
        elif "=" in arg and not arg.startswith("-"):
            overrides.append(arg)
        else:
            raise ConfigError(
                f"cannot parse argument {arg!r}; use --config FILE.yaml and key=value overrides "
                "(e.g. method.name=ce train.epochs=10)"
            )
    return files, overrides


def _load_yaml(path: str) -> DictConfig:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file {path!r} does not exist")
    try:
        loaded = OmegaConf.load(p)
    except Exception as e:  # yaml errors carry line numbers: keep them
        raise ConfigError(f"config file {path!r} is not valid YAML: {e}") from None
    if not isinstance(loaded, DictConfig):
        raise ConfigError(f"config file {path!r} must hold a mapping of keys, not a list")
    return loaded


def _valid_keys(node: Any, prefix: str) -> list[str]:
    fields = [f.name for f in dataclasses.fields(node)] if dataclasses.is_dataclass(node) else []
    return [f"{prefix}{name}" for name in fields]


def _explain(err: OmegaConfBaseException, schema: Config) -> ConfigError:
    key = getattr(err, "full_key", None) or ""
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    node: Any = schema
    for part in parent.split(".") if parent else []:
        node = getattr(node, part, None)
    if isinstance(err, ConfigKeyError | ConfigAttributeError):
        valid = _valid_keys(node, f"{parent}." if parent else "")
        leaf = key.rsplit(".", 1)[-1]
        close = difflib.get_close_matches(leaf, [v.rsplit(".", 1)[-1] for v in valid], n=1)
        hint = f" Did you mean {(parent + '.' if parent else '') + close[0]!r}?" if close else ""
        where = f" for method {schema.method.name!r}" if parent == "method" else ""
        return ConfigError(
            f"unknown config key {key!r}{where}.{hint} Valid keys: {', '.join(valid)}"
        )
    msg = str(err).splitlines()[0]
    return ConfigError(f"invalid value for {key!r}: {msg}")


def _choose(value: str, choices: tuple[str, ...], key: str) -> None:
    if value not in choices:
        raise ConfigError(f"invalid {key}={value!r}; valid choices: {', '.join(choices)}")


def _tail_noise_checks(cfg: Config) -> list[tuple[bool, str]]:
    """``noise.tail_rate``: a rate in [0, 1), for instance noise on the long-tail set only."""
    n = cfg.noise
    if n.tail_rate is None:
        return []
    return [
        (0.0 <= n.tail_rate < 1.0, "noise.tail_rate must be in [0, 1)"),
        (n.tail_size >= 1, "noise.tail_size must be >= 1 (training instances of a subpopulation)"),
        (
            cfg.data.name == "longtail" and n.kind == "instance",
            "noise.tail_rate applies to data.name=longtail with noise.kind=instance (elsewhere "
            "the subpopulations are unknown): drop it, or make a label file (noise.kind=file)",
        ),
    ]


def validate(cfg: Config) -> None:
    """Check value ranges and choices that the type system cannot express."""
    _choose(cfg.data.name, DATASETS, "data.name")
    _choose(cfg.data.split, SPLITS, "data.split")
    _choose(cfg.noise.kind, NOISE_KINDS, "noise.kind")
    _choose(cfg.noise.instance_features, INSTANCE_FEATURES, "noise.instance_features")
    _choose(cfg.noise.cifar_n, CIFAR_N_SETS, "noise.cifar_n")
    _choose(cfg.scaling.launcher, LAUNCHERS, "scaling.launcher")
    _choose(cfg.train.optimizer, OPTIMIZERS, "train.optimizer")
    _choose(cfg.train.scheduler, SCHEDULERS, "train.scheduler")
    _choose(cfg.store.backend, STORE_BACKENDS, "store.backend")
    _choose(cfg.store.dtype, STORE_DTYPES, "store.dtype")
    _choose(cfg.train.precision, PRECISIONS, "train.precision")
    _choose(cfg.data.decode, DECODERS, "data.decode")
    _choose(cfg.data.augment_on, AUGMENT_ON, "data.augment_on")
    checks = [
        (0.0 <= cfg.noise.rate < 1.0, "noise.rate must be in [0, 1)"),
        (cfg.noise.kind != "file" or cfg.noise.file, "noise.kind=file needs noise.file=PATH"),
        (
            cfg.noise.kind != "cifar_n" or cfg.noise.file,
            "noise.kind=cifar_n needs noise.file=PATH/CIFAR-10_human.pt (or CIFAR-100_human.pt)",
        ),
        *_tail_noise_checks(cfg),
        (cfg.train.epochs >= 1, "train.epochs must be >= 1"),
        (cfg.train.batch_size >= 1, "train.batch_size must be >= 1"),
        (cfg.train.lr > 0, "train.lr must be > 0"),
        (
            cfg.train.log_every_steps is None or cfg.train.log_every_steps >= 0,
            "train.log_every_steps must be >= 0 (0 = no step lines; unset = by epoch length)",
        ),
        (cfg.train.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (cfg.scaling.num_workers >= 1, "scaling.num_workers must be >= 1"),
        (cfg.scaling.resource_timeout_s >= 0, "scaling.resource_timeout_s must be >= 0"),
        (cfg.scaling.resize_interval_s >= 0, "scaling.resize_interval_s must be >= 0"),
        (
            cfg.train.checkpoint_every_steps >= 0,
            "train.checkpoint_every_steps must be >= 0 (0 = a checkpoint per epoch only)",
        ),
        (0.0 < cfg.data.test_fraction < 1.0, "data.test_fraction must be in (0, 1)"),
        (cfg.data.shard_size >= 1, "data.shard_size must be >= 1"),
        (cfg.data.train_size >= 0, "data.train_size must be >= 0 (0 = all training images)"),
        (
            cfg.data.train_size == 0 or (cfg.data.name == "fashion_mnist" and not cfg.data.urls),
            "data.train_size applies to data.name=fashion_mnist converted on first use (no "
            "data.urls; a converted set has the size it was written with: --train-size)",
        ),
        (cfg.data.num_workers >= 0, "data.num_workers must be >= 0"),
        (cfg.data.open_shards >= 1, "data.open_shards must be >= 1 (1 = one shard at a time)"),
        (
            cfg.data.name != "shards" or cfg.data.urls,
            "data.name=shards needs data.urls=DIR (a local path or a URL such as s3://bucket/set)",
        ),
        (cfg.data.balanced_batches >= 0, "data.balanced_batches must be >= 0 (0 = off)"),
        (
            not (cfg.data.exclude_file and cfg.data.balanced_batches > 0),
            "data.exclude_file cannot be combined with data.balanced_batches > 0; drop one",
        ),
        (0.0 <= cfg.data.max_bad_fraction <= 1.0, "data.max_bad_fraction must be in [0, 1]"),
        (cfg.data.image_size >= 8, "data.image_size must be >= 8"),
        (cfg.store.top_k >= 1, "store.top_k must be >= 1"),
        (
            cfg.data.decode != "gpu" or cfg.data.augment_on == "device",
            "data.decode=gpu needs data.augment_on=device (images decoded on the device are "
            "augmented there)",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    # Checks across keys come after the range checks they rely on (num_workers >= 1 above).
    _check_elastic(cfg)


def _check_elastic(cfg: Config) -> None:
    """The worker range of an elastic run, and a global batch every allowed count divides."""
    s = cfg.scaling
    lo = s.num_workers if s.min_workers is None else s.min_workers
    if not 1 <= lo <= s.num_workers:
        raise ConfigError(
            f"scaling.min_workers={s.min_workers} must be in 1..scaling.num_workers="
            f"{s.num_workers} (the elastic range); drop it for a fixed-size run"
        )
    if lo < s.num_workers:
        if s.launcher != "ray":
            raise ConfigError(
                f"scaling.min_workers={lo} < scaling.num_workers={s.num_workers} (elastic "
                f"training) needs scaling.launcher=ray, got {s.launcher!r}; drop min_workers"
            )
        if cfg.data.split != "sample":
            raise ConfigError(
                f"elastic training (scaling.min_workers={lo}) needs data.split=sample, whose "
                f"sample order does not depend on the worker count; got {cfg.data.split!r}"
            )
    bad = [w for w in range(lo, s.num_workers + 1) if cfg.train.batch_size % w]
    if bad:
        allowed = f"{lo}..{s.num_workers}" if lo < s.num_workers else str(s.num_workers)
        whole = math.lcm(*range(lo, s.num_workers + 1))
        raise ConfigError(
            f"train.batch_size={cfg.train.batch_size} (the global batch) is not divisible by "
            f"{bad[0]} workers, which scaling.num_workers/min_workers allow ({allowed}); use a "
            f"multiple of {whole} or change the worker range"
        )


def load_config(argv: list[str] | None = None) -> Config:
    """Build the typed run config from ``--config`` files and ``key=value`` overrides.

    Later sources win: schema defaults < YAML files (in order) < command-line overrides.

    Returns
    -------
    Config
        A plain dataclass instance (``method`` is the chosen method's parameter dataclass).
    """
    files, overrides = split_argv(list(argv or []))
    sources = [_load_yaml(f) for f in files]
    try:
        sources.append(OmegaConf.from_dotlist(overrides))
    except OmegaConfBaseException as e:
        raise ConfigError(f"cannot parse overrides {overrides}: {e}") from None
    return _build(sources)


def _build(sources: list[DictConfig]) -> Config:
    from distnoisy.methods import METHODS  # local: methods import torch

    method_name = MethodParams.name
    for src in sources:
        selected = OmegaConf.select(src, "method.name", default=None)
        if selected is not None:
            method_name = str(selected)
    method_cls = METHODS.get(method_name)
    schema = Config(method=method_cls.Params(name=method_name))
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), *sources)
        cfg: Config = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise _explain(e, schema) from None
    validate(cfg)
    method_cls.validate_params(cfg.method)
    return cfg


#: Keys a resumed run may set differently from its saved ``config.yaml``: where the run is and
#: how it is executed, never what it trains. ``scaling.launcher`` is not one (each launcher keeps
#: its checkpoints in its own directory), nor are the ``tracking.*`` keys (the run reopens the
#: MLflow run recorded in its ``run.json``).
RESUMABLE_KEYS = (
    "output_dir",
    "name",
    "resume",
    "data.num_workers",
    "scaling.num_workers",
    "scaling.min_workers",
    "scaling.resize_interval_s",
    "train.checkpoint_every_steps",
    "scaling.use_gpu",
    "scaling.address",
    "scaling.max_failures",
    # A checkpoint's store (whole in state.pt, or one part file per rank of a partitioned
    # store) restores into either backend on any number of ranks (distnoisy.store.parts).
    "store.backend",
    "scaling.resource_timeout_s",
)


def resume_conflicts(saved: Config, cfg: Config) -> dict[str, tuple[Any, Any]]:
    """Keys outside :data:`RESUMABLE_KEYS` whose value in ``cfg`` differs from ``saved``.

    Parameters
    ----------
    saved
        The config the run was started with (its ``config.yaml``).
    cfg
        The config asked for on resume.

    Returns
    -------
    dict
        ``{key: (saved value, asked value)}``, sorted by key; empty when the resume is safe.
    """
    old, new = flat_params(saved), flat_params(cfg)
    keys = sorted((old.keys() | new.keys()) - set(RESUMABLE_KEYS))
    return {k: (old.get(k), new.get(k)) for k in keys if old.get(k) != new.get(k)}


def to_dict(cfg: Config) -> dict[str, Any]:
    """Plain nested dict (picklable, JSON/YAML-able) of a config."""
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


def from_dict(data: dict[str, Any]) -> Config:
    """Inverse of :func:`to_dict` (used by workers and to re-run a saved ``config.yaml``)."""
    return _build([OmegaConf.create(data)])


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{key}."))
        else:
            out[key] = v
    return out


def flat_params(cfg: Config) -> dict[str, Any]:
    """``{"train.lr": 0.001, ...}``: the flat scalar form MLflow params need."""
    return _flatten(to_dict(cfg))


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def save_config(cfg: Config, path: Path) -> None:
    """Write the resolved config atomically (a re-runnable ``--config`` file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(to_yaml(cfg))
    os.replace(tmp, path)
