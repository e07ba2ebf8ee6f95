"""A controlled long-tail dataset (``data.name=longtail``): subpopulations of Zipf-distributed size.

The data follow the long-tail model of the instance-level noise analysis (docs/analysis.md):
``S`` subpopulations, each with one class and one centre; the ``r``-th largest has
``round(max_size * r ** -zipf)`` training instances (at least one), so a few hold hundreds and
the long tail holds one each. An instance is its centre plus small Gaussian jitter, rendered as
a ``image_size x image_size`` grey-scale PNG. Every subpopulation has at least
``test_per_subpopulation`` test instances, so the test accuracy of rare subpopulations can be
measured at all (plus ``test_share`` of its training size, so frequent buckets have enough).

The truth is in the data: every sample's key is ``longtail/<subpopulation>/<instance>`` (test:
``longtail/<subpopulation>/t<instance>``), and each manifest records the training size of every
subpopulation (``params["subpopulation_sizes"]``); :func:`subpopulations` reads both back.

A centre mixes a class prototype (weight ``class_weight``) with a pattern of its own, so the
classes are learnable but a rare subpopulation's label is mostly known from its own training
instance: the setting in which a network must memorise to fit the tail. Noise is added as for
any dataset (``noise.kind=instance``: the instance-dependent law of docs/methods.md#noise-model).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from distnoisy.config import LongtailConfig
from distnoisy.core.errors import ConfigError, DataError
from distnoisy.data.cache import all_cached, encode_png, write_cached_sets
from distnoisy.data.shards import Manifest, Sample, read_labels, read_manifest

log = logging.getLogger(__name__)

# Bump when the way the shards are made changes, so old caches are rebuilt.
_LONGTAIL_VERSION = 1
#: Pixel mean/std of the rendered images on the 0..1 scale (a logistic of a centred Gaussian
#: field: mean 0.5 by symmetry; the std, 0.21, is measured on the default set).
MEAN = 0.5
STD = 0.21


def check_config(cfg: LongtailConfig) -> None:
    """Raise :class:`ConfigError` for an out-of-range ``data.longtail.*`` value."""
    checks = [
        (cfg.num_classes >= 2, "data.longtail.num_classes must be >= 2"),
        (
            cfg.subpopulations >= cfg.num_classes,
            "data.longtail.subpopulations must be >= data.longtail.num_classes (one at least "
            "per class)",
        ),
        (cfg.zipf >= 0, "data.longtail.zipf must be >= 0 (0 = all subpopulations equal)"),
        (cfg.max_size >= 1, "data.longtail.max_size must be >= 1"),
        (cfg.test_per_subpopulation >= 1, "data.longtail.test_per_subpopulation must be >= 1"),
        (cfg.test_share >= 0, "data.longtail.test_share must be >= 0"),
        (cfg.image_size >= 4, "data.longtail.image_size must be >= 4"),
        (0.0 <= cfg.class_weight <= 1.0, "data.longtail.class_weight must be in [0, 1]"),
        (cfg.jitter >= 0, "data.longtail.jitter must be >= 0"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def subpopulation_sizes(subpopulations: int, zipf: float, max_size: int) -> np.ndarray:
    """Training size of each subpopulation, largest first: ``max(1, round(max_size * r**-zipf))``
    for rank ``r = 1..S`` (Zipf's rank-size law)."""
    ranks = np.arange(1, subpopulations + 1, dtype=np.float64)
    return np.maximum(1, np.rint(max_size * ranks**-zipf)).astype(np.int64)


def held_out_sizes(cfg: LongtailConfig) -> np.ndarray:
    """Test instances per subpopulation: ``test_per_subpopulation + round(test_share * size)``.

    The fixed part gives every tail subpopulation test samples; the proportional part gives
    the frequent buckets (few, large subpopulations) enough of them to measure accuracy.
    """
    sizes = subpopulation_sizes(cfg.subpopulations, cfg.zipf, cfg.max_size)
    return cfg.test_per_subpopulation + np.rint(cfg.test_share * sizes).astype(np.int64)


def _centres(cfg: LongtailConfig, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(class of each subpopulation, (S, H*W) centres of unit variance per pixel).

    Classes are dealt round-robin over the ranks, so every class has frequent and rare
    subpopulations alike.
    """
    d = cfg.image_size * cfg.image_size
    classes = np.arange(cfg.subpopulations) % cfg.num_classes
    prototypes = rng.standard_normal((cfg.num_classes, d))
    own = rng.standard_normal((cfg.subpopulations, d))
    w = cfg.class_weight
    centres = np.sqrt(w) * prototypes[classes] + np.sqrt(1.0 - w) * own
    return classes, centres


def _render(points: np.ndarray, size: int) -> np.ndarray:
    """(n, d) Gaussian points as (n, size, size) uint8 images: a logistic squashing to 0..255."""
    pixels = 255.0 / (1.0 + np.exp(-points))
    return np.rint(pixels).astype(np.uint8).reshape(len(points), size, size)


def _split_samples(
    images: np.ndarray, labels: np.ndarray, subpop: np.ndarray, instance: list[str]
) -> Iterator[Sample]:
    for i, img in enumerate(images):
        label = int(labels[i])
        yield Sample(
            index=i,
            image=encode_png(img),
            label=label,
            clean_label=label,
            key=f"longtail/{int(subpop[i])}/{instance[i]}",
        )


def make_split(
    cfg: LongtailConfig, split: str
) -> tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """(images, labels, subpopulation ids, instance names) of ``split`` ("train" or "test").

    Deterministic in ``cfg`` (the centres come from ``seed``; the train and test jitter from
    two further streams of it). Samples are ordered by subpopulation, then instance.
    """
    check_config(cfg)
    rng = np.random.default_rng(cfg.seed)
    classes, centres = _centres(cfg, rng)
    sizes = subpopulation_sizes(cfg.subpopulations, cfg.zipf, cfg.max_size)
    counts = sizes if split == "train" else held_out_sizes(cfg)
    jitter_rng = np.random.default_rng([cfg.seed, 0 if split == "train" else 1])
    subpop = np.repeat(np.arange(cfg.subpopulations), counts)
    points = centres[subpop] + cfg.jitter * jitter_rng.standard_normal(centres[subpop].shape)
    prefix = "" if split == "train" else "t"
    instance = [f"{prefix}{j}" for n in counts for j in range(int(n))]
    return _render(points, cfg.image_size), classes[subpop], subpop, instance


def prepare_longtail(root: Path, cfg: LongtailConfig, shard_size: int = 256) -> tuple[Path, Path]:
    """Write (or reuse) the long-tail train/test shard sets under ``root``.

    Returns
    -------
    (Path, Path)
        The train and test shard directories.

    Notes
    -----
    Cached like the other built-in sets (:mod:`distnoisy.data.cache`): reused while the
    manifest records the same parameters, written atomically, safe against concurrent callers.
    """
    check_config(cfg)
    if shard_size < 1:
        raise ConfigError(f"data.shard_size must be at least 1, got {shard_size}")
    root = Path(root).expanduser()
    sizes = subpopulation_sizes(cfg.subpopulations, cfg.zipf, cfg.max_size)
    params: dict[str, Any] = {
        "version": _LONGTAIL_VERSION,
        **asdict(cfg),
        "shard_size": int(shard_size),
        "subpopulation_sizes": sizes.tolist(),
    }
    if not all_cached(root, "longtail", ["train", "test"], params):
        parts = {split: _split_samples(*make_split(cfg, split)) for split in ("train", "test")}
        write_cached_sets(
            root,
            parts,
            dataset="longtail",
            classes=[str(c) for c in range(cfg.num_classes)],
            params=params,
            shard_size=shard_size,
        )
        log.info(
            "longtail: %d train / %d test images written to %s",
            sizes.sum(),
            held_out_sizes(cfg).sum(),
            root,
        )
    return root / "train", root / "test"


def cache_root(base: Path, cfg: LongtailConfig) -> Path:
    """One cache directory per parameter set, so runs of different shapes can coexist."""
    import hashlib
    import json

    digest = hashlib.sha256(json.dumps(asdict(cfg), sort_keys=True).encode()).hexdigest()[:12]
    return Path(base).expanduser() / f"set-{digest}"


def parse_keys(keys: np.ndarray | list[str]) -> np.ndarray:
    """Subpopulation id of every ``longtail/<subpopulation>/<instance>`` key."""
    try:
        return np.array([int(str(k).split("/")[1]) for k in keys], dtype=np.int64)
    except (IndexError, ValueError):
        raise DataError(
            "keys are not longtail keys (longtail/<subpopulation>/<instance>); the run did not "
            "train on data.name=longtail"
        ) from None


def subpopulations(manifest_or_dir: Manifest | str | Path) -> tuple[np.ndarray, np.ndarray]:
    """(subpopulation id, its training size) of every sample of a long-tail shard set."""
    manifest = (
        manifest_or_dir if isinstance(manifest_or_dir, Manifest) else read_manifest(manifest_or_dir)
    )
    params = manifest.params or {}
    if manifest.dataset != "longtail" or "subpopulation_sizes" not in params:
        raise DataError(f"{manifest_or_dir} is not a longtail shard set (no subpopulation sizes)")
    ids = parse_keys(read_labels(manifest)[2])
    return ids, np.asarray(params["subpopulation_sizes"], dtype=np.int64)[ids]


def subpopulation_noise(
    cfg: LongtailConfig, rate: float, tail_rate: float, tail_size: int = 1, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(noisy, clean) training labels with a noise rate that depends on the subpopulation.

    The instance-dependent law of docs/methods.md#noise-model (per-sample rate around the mean,
    wrong class from a random projection of the pixels), with mean ``tail_rate`` for the
    samples of subpopulations of at most ``tail_size`` training instances and ``rate`` for the
    others. Each group is drawn with its own stream of ``seed``. Save the result with
    :func:`distnoisy.data.noise.save_label_file` and train with ``noise.kind=file``.
    """
    from distnoisy.data.noise import instance_noise

    images, clean, subpop, _ = make_split(cfg, "train")
    sizes = subpopulation_sizes(cfg.subpopulations, cfg.zipf, cfg.max_size)[subpop]
    pixels = images.reshape(len(images), -1).astype(np.float32)
    noisy = clean.copy()
    for group, (mask, mean) in enumerate(
        ((sizes <= tail_size, tail_rate), (sizes > tail_size, rate))
    ):
        if mask.any():
            rng = np.random.default_rng([seed, group])
            noisy[mask] = instance_noise(
                clean[mask], cfg.num_classes, mean, rng, features=pixels[mask]
            )
    return noisy, clean


def tail_noise_file(
    cache_dir: Path,
    cfg: LongtailConfig,
    num_samples: int,
    *,
    rate: float,
    tail_rate: float,
    tail_size: int,
    seed: int,
) -> tuple[Path, np.ndarray]:
    """The label file of :func:`subpopulation_noise` (``noise.tail_rate``), made on first use
    in ``cache_dir`` (atomically) and reused after; returns it and the clean labels it was
    drawn from."""
    from distnoisy.data.noise import load_label_file, save_label_file

    key = f"{cache_root(Path('.'), cfg).name}-r{rate:g}-t{tail_rate:g}-s{tail_size}-seed{seed}"
    path = Path(cache_dir) / f"noise-longtail-tail-{key}.parquet"
    if path.exists():
        try:
            found = load_label_file(path, num_samples, cfg.num_classes)
        except DataError:  # damaged: made again below
            found = None
        if found is not None and found.clean_labels is not None:
            return path, found.clean_labels
    noisy, clean = subpopulation_noise(cfg, rate, tail_rate, tail_size, seed)
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    meta = {"kind": "longtail-subpopulation", "rate": rate, "tail_rate": tail_rate,
            "tail_size": tail_size, "seed": seed}  # fmt: skip
    save_label_file(path, noisy, clean, meta)
    return path, clean
