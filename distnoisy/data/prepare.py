"""Driver-side data preparation: shards and the noisy-label file, made once, before workers start.

Everything here runs in the driver (a single writer), so workers only ever read finished,
atomically written files. All input validation happens here, before a run directory exists.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distnoisy.config import Config
from distnoisy.errors import ConfigError, DataError

log = logging.getLogger(__name__)


@dataclass
class DataSpec:
    """What a worker needs to read the data (plain values: it travels to Ray workers)."""

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


def _image_info(manifest_dir: Path) -> tuple[int, str]:
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


def _train_features(manifest_dir: Path) -> np.ndarray:
    """Flattened raw pixels of every training image, in index order (instance noise input)."""
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


def prepare_data(cfg: Config) -> DataSpec:
    """Make (or find) the shards and the noisy-label file the config asks for.

    Raises
    ------
    ConfigError, DataError
        With a one-line message naming the problem, before anything is written to the run dir.
    """
    from distnoisy.data import noise as noise_mod
    from distnoisy.data.shards import read_labels, read_manifest

    if cfg.data.name == "digits":
        from distnoisy.data.digits import DIGITS_MEAN, DIGITS_STD, prepare_digits

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
        in_channels, train_tf, eval_tf = 1, "digits", "digits"
        mean, std = [DIGITS_MEAN], [DIGITS_STD]
    elif cfg.data.name == "shards":
        base = Path(str(cfg.data.urls)).expanduser()
        train_dir = base / "train" if (base / "train" / "manifest.json").exists() else base
        test_dir = base / "test" if (base / "test" / "manifest.json").exists() else None
        val_dir = base / "val" if (base / "val" / "manifest.json").exists() else None
        in_channels, family = _image_info(train_dir)
        train_tf, eval_tf = f"{family}_train", f"{family}_eval"
        mean, std = [0.5] * in_channels, [0.25] * in_channels
    elif cfg.data.name == "clothing1m":
        from distnoisy.data import clothing1m as c1m

        if cfg.noise.kind not in ("none", "file"):
            raise ConfigError(
                f"noise.kind={cfg.noise.kind!r} on Clothing1M: its labels are already noisy (real "
                "noise); set noise.kind=none (or noise.kind=file for your own label file)"
            )
        base = _converted_root(cfg, "python -m distnoisy.data.clothing1m --root DIR --out DIR")
        train_dir, val_dir, test_dir = base / "noisy_train", base / "clean_val", base / "clean_test"
        in_channels, train_tf, eval_tf = 3, "imagenet_train", "imagenet_eval"
        mean, std = list(c1m.MEAN), list(c1m.STD)
    elif cfg.data.name in ("cifar10", "cifar100"):
        from distnoisy.data import cifar

        base = _converted_root(
            cfg, f"python -m distnoisy.data.cifar --root DIR --out DIR --name {cfg.data.name}"
        )
        train_dir, test_dir = base / "train", base / "test"
        val_dir = base / "val" if (base / "val" / "manifest.json").exists() else None
        in_channels, train_tf, eval_tf = 3, "cifar_train", "cifar_eval"
        mean, std = list(cifar.MEAN[cfg.data.name]), list(cifar.STD[cfg.data.name])
    else:
        raise ConfigError(
            f"data.name={cfg.data.name!r} has no converter yet; convert your data to shards and "
            "use data.name=shards data.urls=DIR"
        )

    manifest = read_manifest(train_dir)
    labels, clean, _keys = read_labels(manifest, partial_clean=True)
    num_classes = manifest.num_classes
    for what, other in (("test", test_dir), ("validation", val_dir)):
        if other is not None and read_manifest(other).num_classes != num_classes:
            raise DataError(
                f"{what} shards in {other} have {read_manifest(other).num_classes} classes, "
                f"train shards {num_classes}"
            )

    kind = cfg.noise.kind
    label_file: Path | None = None
    val_label_file: Path | None = None
    given = labels
    if kind == "file":
        label_file = Path(str(cfg.noise.file)).expanduser()
        lf = noise_mod.load_label_file(label_file, manifest.num_samples, num_classes)
        given = lf.labels
        if clean is None:
            clean = lf.clean_labels
    elif kind != "none":
        # Synthetic noise corrupts the dataset's own labels, which are then the clean ones.
        clean = labels if clean is None or (clean < 0).any() else clean
        features = _train_features(Path(train_dir)) if kind == "instance" else None
        label_file = noise_mod.noisy_label_file(
            Path(train_dir).parent / "noise",
            f"{manifest.dataset}-{manifest.split}",
            clean,
            num_classes,
            kind,
            cfg.noise.rate,
            cfg.noise.seed,
            features=features,
            include_true_class=cfg.noise.include_true_class,
        )
        given = noise_mod.load_label_file(label_file, manifest.num_samples, num_classes).labels
        if val_dir is not None:
            # The papers' protocol when no clean validation set exists: a validation split
            # corrupted by the same noise process (reported as val_acc_noisy beside val_acc).
            val_manifest = read_manifest(val_dir)
            val_clean = read_labels(val_manifest)[0]
            val_label_file = noise_mod.noisy_label_file(
                Path(val_dir).parent / "noise",
                f"{val_manifest.dataset}-{val_manifest.split}",
                val_clean,
                num_classes,
                kind,
                cfg.noise.rate,
                cfg.noise.seed,
                features=_train_features(Path(val_dir)) if kind == "instance" else None,
                include_true_class=cfg.noise.include_true_class,
            )

    noise_rate = transition = num_known = None
    if clean is not None:
        # Measured where the clean label is known (all samples, or e.g. Clothing1M's overlap).
        known = clean >= 0
        num_known = int(known.sum())
        if num_known:
            noise_rate = float(noise_mod.realised_rate(clean[known], given[known]))
            transition = noise_mod.transition_matrix(
                clean[known], given[known], num_classes
            ).tolist()
        if num_known < len(clean):
            log.info(
                "%s: clean labels known for %d of %d training samples; noise rate %s measured on "
                "them",
                cfg.data.name,
                num_known,
                len(clean),
                f"{noise_rate:.3f}" if noise_rate is not None else "not",
            )

    return DataSpec(
        dataset=cfg.data.name,
        train_dir=str(Path(train_dir).resolve()),
        test_dir=str(Path(test_dir).resolve()) if test_dir is not None else None,
        num_train=manifest.num_samples,
        num_classes=num_classes,
        classes=list(manifest.classes),
        in_channels=in_channels,
        train_transform=train_tf,
        eval_transform=eval_tf,
        mean=mean,
        std=std,
        label_file=str(label_file.resolve()) if label_file is not None else None,
        has_clean_labels=clean is not None,
        noise_rate=noise_rate,
        transition=transition,
        val_dir=str(Path(val_dir).resolve()) if val_dir is not None else None,
        val_label_file=str(val_label_file.resolve()) if val_label_file is not None else None,
        num_clean_known=num_known or None,
    )


def _converted_root(cfg: Config, how: str) -> Path:
    """The converter's output directory: ``data.root``, or ``data.urls`` naming a directory."""
    where = cfg.data.root or cfg.data.urls
    if not where:
        raise ConfigError(f"data.name={cfg.data.name} needs data.root=DIR, the output of `{how}`")
    base = Path(str(where)).expanduser()
    if not base.is_dir():
        raise DataError(f"data.root {base} is not a directory; create it with `{how}`")
    return base
