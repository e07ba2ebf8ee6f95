"""Driver-side data preparation: shards and the noisy-label file, made once, before workers start.

Everything here runs in the driver (a single writer), so workers only ever read finished,
atomically written files. All input validation happens here, before a run directory exists.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from distnoisy.config import Config
from distnoisy.core.errors import ConfigError, DataError
from distnoisy.core.registry import Registry
from distnoisy.data import fs

if TYPE_CHECKING:
    from distnoisy.data.shards import Manifest

log = logging.getLogger(__name__)


@dataclass
class DataSpec:
    """What a worker needs to read the data (plain values: it travels to Ray workers).

    Set directories and label files are absolute local paths or URLs.
    """

    dataset: str
    train_dir: str
    test_dir: str | None
    num_train: int
    num_classes: int
    classes: list[str]
    in_channels: int
    train_transform: str
    eval_transform: str
    mean: list[float]
    std: list[float]
    # Parquet label file with the given (possibly noisy) labels; None = the shards' own labels.
    label_file: str | None
    has_clean_labels: bool
    noise_rate: float | None
    transition: list[list[float]] | None
    # Validation shards (model selection, sweeps); their own ``cls`` labels are the val labels.
    val_dir: str | None = None
    # With synthetic noise: the validation labels corrupted the same way (val_acc_noisy).
    val_label_file: str | None = None
    # Training samples with a known clean label (noise_rate/transition are measured on them);
    # None = none known. Clothing1M: the ~25k noisy-train images that also have a clean label.
    num_clean_known: int | None = None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def default_root(name: str) -> Path:
    return Path.home() / ".cache" / "distnoisy" / name


def _image_info(manifest_dir: str | os.PathLike[str]) -> tuple[int, str]:
    """(channels, transform family) of a shard set, from its first decoded image."""
    from distnoisy.data.shards import read_manifest
    from distnoisy.data.stream import EvalStream, make_transform

    manifest = read_manifest(manifest_dir)
    stream = EvalStream(
        manifest, rank=0, world_size=1, batch_size=1, transform=make_transform("raw", None, None)
    )
    first = next(iter(stream.batches()))["image"]
    channels, height = int(first.shape[1]), int(first.shape[2])
    family = "cifar" if height <= 64 else "imagenet"
    return channels, family


def _train_features(manifest_dir: str | os.PathLike[str]) -> np.ndarray:
    """Flattened raw pixels of every training image, in index order (instance noise input).

    The values are the decoded uint8 pixels (0..255, C x H x W order) as float32, which holds
    them exactly: the scale the official instance generator projects. Digits shards store the
    sklearn images quantised to 0..255, so they are on that scale too.
    """
    from distnoisy.data.shards import read_manifest
    from distnoisy.data.stream import EvalStream, make_transform

    manifest = read_manifest(manifest_dir)
    stream = EvalStream(
        manifest, rank=0, world_size=1, batch_size=256, transform=make_transform("raw", None, None)
    )
    rows: dict[int, np.ndarray] = {}
    for batch in stream.batches():
        flat = batch["image"].reshape(len(batch["index"]), -1).float().numpy()
        for i, f in zip(batch["index"].tolist(), flat, strict=True):
            rows[i] = f
    return np.stack([rows[i] for i in range(manifest.num_samples)])


@dataclass
class _Sets:
    """Where a dataset's shard sets are and how its images are transformed."""

    train_dir: str | Path
    test_dir: str | Path | None
    val_dir: str | Path | None
    in_channels: int
    train_tf: str
    eval_tf: str
    mean: list[float]
    std: list[float]


#: ``data.name`` -> the function that makes (or finds) its shard sets; the source of truth of
#: :data:`distnoisy.core.choices.DATASETS` (``tests/test_shape.py`` checks that they agree).
DATASET_LOADERS: Registry[Callable[[Config], _Sets]] = Registry("dataset")


@DATASET_LOADERS.register("digits")
def _digits_sets(cfg: Config) -> _Sets:
    from distnoisy.data.digits import DIGITS_MEAN, DIGITS_STD, prepare_digits

    if cfg.data.root and fs.is_url(cfg.data.root):
        raise ConfigError(
            f"data.root={cfg.data.root}: digits shards are written to a local cache; give a "
            "local directory (or upload them and use data.name=shards data.urls=URL)"
        )
    root = Path(cfg.data.root).expanduser() if cfg.data.root else default_root("digits")
    if cfg.data.val_fraction > 0:  # its own cache: splits with and without val coexist
        root = root / f"val-{cfg.data.val_fraction:g}"
    train_dir, test_dir = prepare_digits(
        root,
        test_fraction=cfg.data.test_fraction,
        seed=0,
        shard_size=cfg.data.shard_size,
        val_fraction=cfg.data.val_fraction,
    )
    val_dir = root / "val" if cfg.data.val_fraction > 0 else None
    return _Sets(train_dir, test_dir, val_dir, 1, "digits", "digits", [DIGITS_MEAN], [DIGITS_STD])


@DATASET_LOADERS.register("fashion_mnist")
def _fashion_mnist(cfg: Config) -> _Sets:
    from distnoisy.data import fashion_mnist

    train_dir, test_dir, val_dir = _fashion_mnist_sets(cfg)
    # 28x28 grey images, no augmentation: the plain scale-and-normalise transform.
    mean, std = [fashion_mnist.MEAN], [fashion_mnist.STD]
    return _Sets(train_dir, test_dir, val_dir, 1, "digits", "digits", mean, std)


@DATASET_LOADERS.register("longtail")
def _longtail_sets(cfg: Config) -> _Sets:
    from distnoisy.data import longtail

    if cfg.data.root and fs.is_url(cfg.data.root):
        raise ConfigError(f"data.root={cfg.data.root}: longtail shards go to a local directory")
    base = Path(cfg.data.root).expanduser() if cfg.data.root else default_root("longtail")
    root = longtail.cache_root(base, cfg.data.longtail)
    train_dir, test_dir = longtail.prepare_longtail(root, cfg.data.longtail, cfg.data.shard_size)
    mean, std = [longtail.MEAN], [longtail.STD]
    return _Sets(train_dir, test_dir, None, 1, "digits", "digits", mean, std)


@DATASET_LOADERS.register("shards")
def _shards_sets(cfg: Config) -> _Sets:
    base, train_dir = _base_and_train(str(cfg.data.urls), "data.urls", "train")
    if not _is_set(train_dir):  # data.urls is the training set itself
        train_dir = base
    test_dir = _optional_set(base, "test")
    val_dir = _optional_set(base, "val")
    in_channels, family = _image_info(train_dir)
    return _Sets(
        train_dir,
        test_dir,
        val_dir,
        in_channels,
        f"{family}_train",
        f"{family}_eval",
        [0.5] * in_channels,
        [0.25] * in_channels,
    )


@DATASET_LOADERS.register("clothing1m")
def _clothing1m_sets(cfg: Config) -> _Sets:
    from distnoisy.data import clothing1m as c1m

    if cfg.noise.kind not in ("none", "file"):
        raise ConfigError(
            f"noise.kind={cfg.noise.kind!r} on Clothing1M: its labels are already noisy (real "
            "noise); set noise.kind=none (or noise.kind=file for your own label file)"
        )
    base, train_dir = _converted_root(
        cfg, "noisy_train", "python -m distnoisy.data.clothing1m --root DIR --out DIR"
    )
    val_dir, test_dir = fs.join(base, "clean_val"), fs.join(base, "clean_test")
    return _Sets(
        train_dir,
        test_dir,
        val_dir,
        3,
        "imagenet_train",
        "imagenet_eval",
        list(c1m.MEAN),
        list(c1m.STD),
    )


@DATASET_LOADERS.register("cifar10")
@DATASET_LOADERS.register("cifar100")
def _cifar_sets(cfg: Config) -> _Sets:
    from distnoisy.data import cifar

    base, train_dir = _converted_root(
        cfg,
        "train",
        f"python -m distnoisy.data.cifar --root DIR --out DIR --name {cfg.data.name}",
    )
    test_dir, val_dir = fs.join(base, "test"), _optional_set(base, "val")
    mean, std = list(cifar.MEAN[cfg.data.name]), list(cifar.STD[cfg.data.name])
    return _Sets(train_dir, test_dir, val_dir, 3, "cifar_train", "cifar_eval", mean, std)


def prepare_data(cfg: Config) -> DataSpec:
    """Make (or find) the shards and the noisy-label file the config asks for.

    Raises
    ------
    ConfigError, DataError
        With a one-line message naming the problem, before anything is written to the run dir.
    """
    from distnoisy.data.shards import read_labels, read_manifest

    for key, value in (
        ("data.urls", cfg.data.urls),
        ("data.root", cfg.data.root),
        ("noise.file", cfg.noise.file),
    ):
        if value:
            fs.check_backend(value, key)
    if cfg.data.name not in DATASET_LOADERS:
        raise ConfigError(
            f"data.name={cfg.data.name!r} has no converter yet; convert your data to shards and "
            "use data.name=shards data.urls=DIR"
        )
    sets = DATASET_LOADERS.get(cfg.data.name)(cfg)
    train_dir, test_dir, val_dir = sets.train_dir, sets.test_dir, sets.val_dir

    manifest = read_manifest(train_dir)
    labels, clean, _keys = read_labels(manifest, partial_clean=True)  # checked: 0..C-1
    num_classes = manifest.num_classes
    val_manifest = read_manifest(val_dir) if val_dir is not None else None
    for what, other, other_manifest in (
        ("test", test_dir, read_manifest(test_dir) if test_dir is not None else None),
        ("validation", val_dir, val_manifest),
    ):
        if other_manifest is not None and other_manifest.num_classes != num_classes:
            raise DataError(
                f"{what} shards in {other} have {other_manifest.num_classes} classes, "
                f"train shards {num_classes}"
            )
    label_file, val_label_file, given, clean = _noisy_labels(
        cfg, manifest, train_dir, (val_dir, val_manifest), labels, clean
    )
    noise_rate, transition, num_known = _measured_noise(cfg, clean, given, num_classes)

    return DataSpec(
        dataset=cfg.data.name,
        train_dir=_absolute(train_dir),
        test_dir=_absolute(test_dir) if test_dir is not None else None,
        num_train=manifest.num_samples,
        num_classes=num_classes,
        classes=list(manifest.classes),
        in_channels=sets.in_channels,
        train_transform=sets.train_tf,
        eval_transform=sets.eval_tf,
        mean=sets.mean,
        std=sets.std,
        label_file=_absolute(label_file) if label_file is not None else None,
        has_clean_labels=clean is not None,
        noise_rate=noise_rate,
        transition=transition,
        val_dir=_absolute(val_dir) if val_dir is not None else None,
        val_label_file=_absolute(val_label_file) if val_label_file is not None else None,
        num_clean_known=num_known or None,
    )


def _noisy_labels(
    cfg: Config,
    manifest: Manifest,
    train_dir: str | Path,
    val: tuple[str | Path | None, Manifest | None],
    labels: np.ndarray,
    clean: np.ndarray | None,
) -> tuple[str | Path | None, Path | None, np.ndarray, np.ndarray | None]:
    """(label file, validation label file, given labels, clean labels) for ``noise.*``.

    Each input is checked once: the shards' labels by ``read_labels``, a label file as it is
    read, the noise request by :func:`~distnoisy.data.noise.check_noise` (once, for both the
    training and the validation set); the generated labels come back with their file.
    """
    from distnoisy.data import noise as noise_mod
    from distnoisy.data.label_files import read_label_file
    from distnoisy.data.shards import read_labels

    num_classes = manifest.num_classes
    kind = cfg.noise.kind
    if kind == "none":
        return None, None, labels, clean
    if kind == "file":
        label_file = _local_or_url(str(cfg.noise.file))
        lf = read_label_file(label_file, manifest.num_samples, num_classes)
        return label_file, None, lf.labels, clean if clean is not None else lf.clean_labels
    # Synthetic noise corrupts the dataset's own labels, which are then the clean ones.
    clean = labels if clean is None or (clean < 0).any() else clean
    if kind == "cifar_n":  # human labels of the CIFAR training images (docs/methods.md)
        from distnoisy.data.cifar_n import label_file as cifar_n_label_file

        label_file, given = cifar_n_label_file(
            _local_or_url(str(cfg.noise.file)),
            cfg.noise.cifar_n,
            manifest.dataset,
            clean,
            num_classes,
            _noise_dir(cfg, train_dir),
        )
        return label_file, None, given, clean
    if cfg.noise.tail_rate is not None:  # a rate by subpopulation size (longtail only)
        tail_file = _tail_label_file(cfg, manifest, train_dir, clean)
        given = read_label_file(tail_file, manifest.num_samples, num_classes).labels
        return tail_file, None, given, clean
    spec = noise_mod.check_noise(
        kind,
        num_classes,
        cfg.noise.rate,
        cfg.noise.seed,
        include_true_class=cfg.noise.include_true_class,
        instance_features=cfg.noise.instance_features,
        dataset=f"{manifest.dataset}-{manifest.split}",  # the pair map of CIFAR-10
    )
    features = _train_features(train_dir) if kind == "instance" else None
    label_file, given = noise_mod.cached_noisy_labels(
        _noise_dir(cfg, train_dir), f"{manifest.dataset}-{manifest.split}", spec, clean, features
    )
    val_dir, val_manifest = val
    val_label_file = None
    if val_dir is not None and val_manifest is not None:
        # The papers' protocol when no clean validation set exists: a validation split
        # corrupted by the same noise process (reported as val_acc_noisy beside val_acc).
        val_label_file, _ = noise_mod.cached_noisy_labels(
            _noise_dir(cfg, val_dir),
            f"{val_manifest.dataset}-{val_manifest.split}",
            spec,
            read_labels(val_manifest)[0],
            _train_features(val_dir) if kind == "instance" else None,
        )
    return label_file, val_label_file, given, clean


def _tail_label_file(
    cfg: Config, manifest: Manifest, train_dir: str | Path, clean: np.ndarray
) -> Path:
    """``noise.tail_rate``: the long-tail set's label file with a rate by subpopulation size."""
    from distnoisy.data import longtail

    assert cfg.noise.tail_rate is not None
    path, drawn_from = longtail.tail_noise_file(
        _noise_dir(cfg, train_dir),
        cfg.data.longtail,
        manifest.num_samples,
        rate=cfg.noise.rate,
        tail_rate=cfg.noise.tail_rate,
        tail_size=cfg.noise.tail_size,
        seed=cfg.noise.seed,
    )
    if not np.array_equal(drawn_from, clean):
        raise DataError(
            f"the long-tail shards in {train_dir} do not match data.longtail.* (their labels "
            "differ from the generator's): delete that directory to have it made again"
        )
    return path


def _measured_noise(
    cfg: Config, clean: np.ndarray | None, given: np.ndarray, num_classes: int
) -> tuple[float | None, list[list[float]] | None, int | None]:
    """(noise rate, transition matrix, number of known clean labels) of the given labels."""
    from distnoisy.data import noise as noise_mod

    noise_rate = transition = num_known = None
    if clean is not None:
        # Measured where the clean label is known (all samples, or e.g. Clothing1M's overlap).
        known = clean >= 0
        num_known = int(known.sum())
        if num_known:  # both label vectors are checked already (shards, label file, generator)
            rate, matrix = noise_mod.measured_noise(clean[known], given[known], num_classes)
            noise_rate, transition = rate, matrix.tolist()
        if num_known < len(clean):
            log.info(
                "%s: clean labels known for %d of %d training samples; noise rate %s measured on "
                "them",
                cfg.data.name,
                num_known,
                len(clean),
                f"{noise_rate:.3f}" if noise_rate is not None else "not",
            )
    return noise_rate, transition, num_known


def _fashion_mnist_sets(cfg: Config) -> tuple[str | Path, str | Path, str | Path | None]:
    """(train, test, val or None) shard sets of Fashion-MNIST: converted ones from
    ``data.urls``, else a local cache converted on first use from the idx files in
    ``data.root`` (default: where the Debian package puts them)."""
    from distnoisy.data import fashion_mnist

    if cfg.data.urls:
        base, train_dir = _base_and_train(str(cfg.data.urls), "data.urls", "train")
        return train_dir, fs.join(base, "test"), _optional_set(base, "val")
    if cfg.data.root and fs.is_url(cfg.data.root):
        raise ConfigError(
            f"data.root={cfg.data.root}: for fashion_mnist it is the local directory of the idx "
            "files; converted shards at a URL go in data.urls"
        )
    source = Path(cfg.data.root).expanduser() if cfg.data.root else fashion_mnist.DEFAULT_SOURCE
    # One cache directory per choice of subset and validation split, so runs with different
    # choices can run at once without replacing each other's shards.
    variant = f"train-{cfg.data.train_size}" if cfg.data.train_size else "train-all"
    if cfg.data.val_fraction > 0:
        variant += f"-val-{cfg.data.val_fraction:g}"
    root = default_root("fashion_mnist") / variant
    train_dir, test_dir = fashion_mnist.prepare_fashion_mnist(
        root,
        source=source,
        train_size=cfg.data.train_size,
        val_fraction=cfg.data.val_fraction,
        seed=0,  # the data do not change with the run's seed (like the digits split)
        shard_size=cfg.data.shard_size,
    )
    return train_dir, test_dir, root / "val" if cfg.data.val_fraction > 0 else None


def _converted_root(cfg: Config, train: str, how: str) -> tuple[str, str]:
    """(converter output dir, training set dir) from ``data.urls``, else ``data.root``."""
    key = "data.urls" if cfg.data.urls else "data.root"
    where = cfg.data.urls or cfg.data.root
    if not where:
        raise ConfigError(f"data.name={cfg.data.name} needs data.root=DIR, the output of `{how}`")
    base, train_dir = _base_and_train(str(where), key, train)
    if not fs.is_url(base) and not Path(base).is_dir():
        raise DataError(f"{key} {base} is not a directory; create it with `{how}`")
    return base, train_dir


def _base_and_train(where: str, key: str, train: str) -> tuple[str, str]:
    """(converter output dir, training set dir) named by ``where``.

    ``where`` is the output directory (a local path or a URL; the training set is its ``train``
    subdirectory) or the training set's shards as a brace pattern or comma-separated list. Those
    must be the whole set (checked against its manifest), and the other splits are then the
    siblings of their directory, as the converters write them.
    """
    items = fs.expand(where)
    if not items:
        raise ConfigError(f"{key} is empty; give a shard directory or the shards of one set")
    if len(items) == 1 and not items[0].endswith(".tar"):
        base = _local_or_url(items[0])
        return base, fs.join(base, train)
    from distnoisy.data.shards import shard_list_dir

    train_dir = shard_list_dir(items, f"{key}={where}")
    return fs.parent(train_dir), train_dir


def _local_or_url(location: str) -> str:
    return location.rstrip("/") if fs.is_url(location) else str(Path(location).expanduser())


def _absolute(location: str | os.PathLike[str]) -> str:
    return str(location) if fs.is_url(location) else str(Path(location).resolve())


def _is_set(directory: str | os.PathLike[str]) -> bool:
    from distnoisy.data.shards import MANIFEST_NAME

    return fs.is_file(fs.join(directory, MANIFEST_NAME))


def _optional_set(base: str | os.PathLike[str], split: str) -> str | None:
    """``base/split`` when it holds a shard set, else None."""
    directory = fs.join(base, split)
    return directory if _is_set(directory) else None


def _noise_dir(cfg: Config, set_dir: str | os.PathLike[str]) -> Path:
    """Where synthetic noise label files of a shard set go: always a local directory.

    Beside a local set, as always. A remote set is never written to: its files go to
    ``data.root/noise`` when ``data.root`` is a local directory, else to a cache keyed by the
    set's location. Ray workers read them from there, so on a multi-node cluster that directory
    must be on storage every node sees (like ``output_dir``).
    """
    if not fs.is_url(set_dir):
        return Path(set_dir).parent / "noise"
    if cfg.data.root and not fs.is_url(cfg.data.root):
        where = Path(cfg.data.root).expanduser() / "noise"
    else:
        digest = hashlib.sha256(fs.parent(set_dir).encode()).hexdigest()[:12]
        where = default_root("remote") / digest / "noise"
    log.info(
        "%s is remote: its noise label files go to %s (on a multi-node cluster this must be "
        "storage every node sees: data.root=DIR chooses it)",
        set_dir,
        where,
    )
    return where
