"""Synthetic label noise and the saved noisy-label file (docs/methods.md#noise-model).

Noise in distnoisy is not applied on the fly: a noisy label vector, keyed by the global sample
index, is generated once per (dataset, kind, rate, seed) and saved, so that every method trains on
the *same* realisation and ``is_noisy = (label != clean_label)`` is exact
(docs/methods.md#noise-model).

Noise kinds (registered in :data:`NOISE`):

``symmetric``
    With probability ``rate`` a label is replaced by a class drawn uniformly from the *other*
    C - 1 classes (realised rate = ``rate``). ``include_true_class=True`` draws from all C classes
    instead (the ELR/DAL convention; realised rate = ``rate * (C - 1) / C``).
``pair``
    Each class c flips to ``pair_map[c]`` with probability ``rate``; classes missing from the map
    never flip. Default map: c -> (c + 1) mod C. :data:`CIFAR10_PAIR_MAP` is the standard CIFAR-10
    map and :func:`default_pair_map` picks it for ``dataset="cifar10"``.
``instance``
    The part-dependent generator of Xia et al. (2020): each sample flips with its own rate
    q_i ~ N(rate, 0.1) truncated to [0, 1], to a wrong class drawn from the softmax of a random
    per-class projection of its features. ``instance_features="raw"`` (default) projects the
    features as given (0..255 pixels, as the authors' generator does); ``"standardized"``
    z-scores each feature first (distnoisy's law before :data:`GENERATOR_VERSION` 2; flips
    spread over more classes). See :func:`instance_noise`.

The label file (:func:`save_label_file` / :func:`load_label_file`, in
:mod:`distnoisy.data.label_files` and re-exported here) is Parquet with int64 columns ``index``,
``label`` and ``clean_label`` (-1 if unknown) plus JSON metadata; ``.csv`` and ``.npy`` files are
accepted on load for user-supplied labels (``noise.kind=file``).
"""

from __future__ import annotations

import hashlib
import logging
import numbers
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from distnoisy.core.choices import INSTANCE_FEATURES
from distnoisy.core.errors import ConfigError, DataError
from distnoisy.core.registry import Registry
from distnoisy.data.instance_noise import instance_noise
from distnoisy.data.label_files import (
    LabelFile,
    _check_num_classes,
    load_label_file,
    read_label_file,
    save_label_file,
)

__all__ = [
    "CIFAR10_PAIR_MAP",
    "GENERATOR_VERSION",
    "INSTANCE_FEATURES",
    "NOISE",
    "LabelFile",
    "NoiseGenerator",
    "NoiseSpec",
    "cached_noisy_labels",
    "check_noise",
    "default_pair_map",
    "features_digest",
    "instance_noise",
    "load_label_file",
    "make_noisy_labels",
    "measured_noise",
    "noise_file_name",
    "noisy_label_file",
    "pair_noise",
    "realised_rate",
    "save_label_file",
    "symmetric_noise",
    "transition_matrix",
]

logger = logging.getLogger(__name__)

#: Bumped whenever a generator's output for the same inputs changes, so cached files are remade.
#: 2: ``instance`` projects the raw features by default (``instance_features="raw"``).
GENERATOR_VERSION = 2


#: Standard CIFAR-10 pair ("asymmetric") map: truck->automobile, bird->airplane, deer->horse,
#: cat<->dog (ELR and DAL; LIMIT omits dog->cat, see docs/methods.md#noise-model).
#: Treat as read-only.
CIFAR10_PAIR_MAP: dict[int, int] = {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}


class NoiseGenerator(Protocol):
    """Signature of a function registered in :data:`NOISE`.

    Generators receive already-validated inputs (:func:`check_noise` has checked the options
    and that they apply to the kind, :func:`_check_labels` the labels) and must draw all
    randomness from ``rng``. Options that do not concern a generator (``features``,
    ``instance_features`` for the class-conditional kinds) are passed anyway and ignored.
    """

    def __call__(
        self,
        clean: np.ndarray,
        num_classes: int,
        rate: float,
        rng: np.random.Generator,
        *,
        features: np.ndarray | None,
        include_true_class: bool,
        pair_map: Mapping[int, int] | None,
        instance_features: str,
    ) -> np.ndarray: ...


NOISE: Registry[NoiseGenerator] = Registry("noise kind")


# --------------------------------------------------------------------------------------------
# Validation helpers
# --------------------------------------------------------------------------------------------


def _check_rate(rate: Any, kind: str) -> float:
    if isinstance(rate, bool) or not isinstance(rate, numbers.Real):
        raise ConfigError(f"noise.rate must be a number, got {rate!r}")
    rate = float(rate)
    # A pair flip rate of 1 is a (useless but well-defined) permutation of the labels; for the
    # other kinds rate 1 is meaningless (symmetric) or out of the generator's domain (instance).
    if kind == "pair":
        if not 0.0 <= rate <= 1.0:
            raise ConfigError(f"noise.rate={rate} is outside the valid range [0, 1] for 'pair'")
    elif not 0.0 <= rate < 1.0:
        raise ConfigError(f"noise.rate={rate} is outside the valid range [0, 1) for {kind!r}")
    return rate


def _check_seed(seed: Any) -> int:
    if isinstance(seed, bool) or not isinstance(seed, numbers.Integral) or seed < 0:
        raise ConfigError(f"noise.seed must be a non-negative integer, got {seed!r}")
    return int(seed)


def _check_labels(labels: Any, num_classes: int, what: str = "clean labels") -> np.ndarray:
    """Return ``labels`` as a 1-D int64 array, or raise :class:`DataError`."""
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DataError(f"{what} must be a 1-D array, got shape {arr.shape}")
    if arr.size == 0:
        raise DataError(f"{what} are empty; need one label per sample")
    if not np.issubdtype(arr.dtype, np.integer):
        raise DataError(f"{what} must have an integer dtype, got {arr.dtype}")
    arr = arr.astype(np.int64, copy=False)
    bad = np.flatnonzero((arr < 0) | (arr >= num_classes))
    if bad.size:
        i = int(bad[0])
        raise DataError(
            f"{what}: label {int(arr[i])} at index {i} is outside the valid range "
            f"0..{num_classes - 1} ({bad.size} labels out of range)"
        )
    return arr


def _check_pair_map(pair_map: Mapping[int, int], num_classes: int) -> dict[int, int]:
    out: dict[int, int] = {}
    for src, dst in pair_map.items():
        for v in (src, dst):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral):
                raise ConfigError(f"pair_map entries must be integers, got {src!r} -> {dst!r}")
            if not 0 <= v < num_classes:
                raise ConfigError(
                    f"pair_map entry {src} -> {dst} has class {v} outside the valid range "
                    f"0..{num_classes - 1}"
                )
        if src == dst:
            raise ConfigError(f"pair_map maps class {src} to itself; a pair flip must change it")
        out[int(src)] = int(dst)
    return out


@dataclass(frozen=True)
class NoiseSpec:
    """A noise request whose every option :func:`check_noise` has checked once.

    The functions that take one (:func:`cached_noisy_labels`, the generators) check none of
    these again.
    """

    kind: str
    num_classes: int
    rate: float
    seed: int
    include_true_class: bool = False
    #: ``"pair"`` only: source class -> target class; None means c -> c + 1 mod C.
    pair_map: dict[int, int] | None = None
    instance_features: str = "raw"


def check_noise(
    kind: str,
    num_classes: int,
    rate: float,
    seed: int,
    *,
    include_true_class: bool = False,
    pair_map: Mapping[int, int] | None = None,
    instance_features: str = "raw",
    dataset: str | None = None,
) -> NoiseSpec:
    """Check a noise request once: the kind, the ranges, and that each option applies to it.

    Parameters
    ----------
    kind, num_classes, rate, seed, include_true_class, pair_map, instance_features
        As for :func:`make_noisy_labels`.
    dataset
        With ``kind="pair"`` and no ``pair_map``: the map :func:`default_pair_map` gives for
        this dataset name (the CIFAR-10 map for ``"cifar10..."``); None = c -> c + 1 mod C.

    Raises
    ------
    ConfigError
        Unknown kind or ``instance_features``; rate, seed, num_classes or pair_map out of
        range; an option that does not apply to ``kind``.
    """
    NOISE.get(kind)  # unknown kind -> ConfigError listing the valid ones
    num_classes = _check_num_classes(num_classes)
    rate = _check_rate(rate, kind)
    seed = _check_seed(seed)
    instance_features = _check_instance_features(instance_features)
    if include_true_class and kind != "symmetric":
        raise ConfigError(
            f"include_true_class only applies to noise.kind='symmetric', not {kind!r}"
        )
    if pair_map is not None and kind != "pair":
        raise ConfigError(f"pair_map only applies to noise.kind='pair', not {kind!r}")
    if kind == "pair" and pair_map is None and dataset is not None:
        pair_map = default_pair_map(dataset, num_classes)
    return NoiseSpec(
        kind=kind,
        num_classes=num_classes,
        rate=rate,
        seed=seed,
        include_true_class=bool(include_true_class),
        pair_map=_check_pair_map(pair_map, num_classes) if pair_map is not None else None,
        instance_features=instance_features,
    )


# --------------------------------------------------------------------------------------------
# Generators
# --------------------------------------------------------------------------------------------


@NOISE.register("symmetric")
def symmetric_noise(
    clean: np.ndarray,
    num_classes: int,
    rate: float,
    rng: np.random.Generator,
    *,
    features: np.ndarray | None = None,
    include_true_class: bool = False,
    pair_map: Mapping[int, int] | None = None,
    instance_features: str = "raw",
) -> np.ndarray:
    """Symmetric (uniform) noise.

    Each sample is selected independently with probability ``rate``; a selected sample gets a
    label drawn uniformly from the other C - 1 classes (or from all C classes when
    ``include_true_class``). ``features`` and ``instance_features`` are ignored.

    Notes
    -----
    The selection uniforms and the class offsets are drawn for *every* sample, not only for the
    selected ones, so with a fixed seed the flipped set at a lower rate is a subset of the flipped
    set at a higher rate and shares its noisy labels: sweeps over the rate are nested.
    """
    n = clean.shape[0]
    selected = rng.random(n) < rate
    # Adding an offset in 1..C-1 (mod C) is a uniform draw over the other classes; 0..C-1 is a
    # uniform draw over all classes.
    low = 0 if include_true_class else 1
    offset = rng.integers(low, num_classes, size=n, dtype=np.int64)
    return np.where(selected, (clean + offset) % num_classes, clean)


@NOISE.register("pair")
def pair_noise(
    clean: np.ndarray,
    num_classes: int,
    rate: float,
    rng: np.random.Generator,
    *,
    features: np.ndarray | None = None,
    include_true_class: bool = False,
    pair_map: Mapping[int, int] | None = None,
    instance_features: str = "raw",
) -> np.ndarray:
    """Pair (asymmetric, class-conditional) noise.

    A sample of class c flips to ``pair_map[c]`` with probability ``rate``; classes that are not
    keys of ``pair_map`` never flip. ``pair_map=None`` means c -> (c + 1) mod C.
    ``features`` and ``instance_features`` are ignored.
    """
    if pair_map is None:
        pair_map = {c: (c + 1) % num_classes for c in range(num_classes)}
    target = np.arange(num_classes, dtype=np.int64)  # identity for classes that never flip
    for src, dst in pair_map.items():
        target[src] = dst
    selected = rng.random(clean.shape[0]) < rate
    return np.where(selected, target[clean], clean)


#: The part-dependent generator of Xia et al. (2020), in its own module.
NOISE.register("instance")(instance_noise)


def _check_instance_features(instance_features: Any) -> str:
    """Return ``instance_features`` if it names a feature map, else raise :class:`ConfigError`."""
    if instance_features not in INSTANCE_FEATURES:
        raise ConfigError(
            f"invalid noise.instance_features={instance_features!r}; valid choices: "
            f"{', '.join(INSTANCE_FEATURES)}"
        )
    return str(instance_features)


# --------------------------------------------------------------------------------------------
# Top-level helpers
# --------------------------------------------------------------------------------------------


def default_pair_map(dataset: str, num_classes: int) -> dict[int, int] | None:
    """The pair map docs/methods.md#noise-model prescribes for ``dataset``.

    Returns a copy of :data:`CIFAR10_PAIR_MAP` for CIFAR-10 with 10 classes and ``None``
    (meaning c -> c + 1 mod C) otherwise. The name is matched up to its first ``- _ . +``, so
    ``"cifar10-train"`` (a shard set's ``dataset-split``) counts as CIFAR-10; ``"cifar100"``
    does not.
    """
    base = re.split(r"[-_.+]", dataset, maxsplit=1)[0].lower()
    if base == "cifar10" and num_classes == 10:
        return dict(CIFAR10_PAIR_MAP)
    return None


def make_noisy_labels(
    clean: np.ndarray,
    num_classes: int,
    kind: str,
    rate: float,
    seed: int,
    *,
    features: np.ndarray | None = None,
    include_true_class: bool = False,
    pair_map: Mapping[int, int] | None = None,
    instance_features: str = "raw",
) -> np.ndarray:
    """Generate a synthetic noisy label vector.

    Parameters
    ----------
    clean
        1-D integer array of clean labels, one per global sample index.
    num_classes
        Number of classes C (>= 2); labels must lie in 0..C-1.
    kind
        A name registered in :data:`NOISE`: ``"symmetric"``, ``"pair"`` or ``"instance"``.
    rate
        Flip probability: in [0, 1) for symmetric/instance, [0, 1] for pair.
    seed
        Non-negative integer; the output is a deterministic function of the inputs and seed.
    features
        Required for ``"instance"`` (shape (N, ...)); ignored by the other kinds.
    include_true_class
        ``"symmetric"`` only: draw the replacement from all C classes (ELR/DAL convention).
    pair_map
        ``"pair"`` only: source class -> target class; ``None`` means c -> c + 1 mod C.
    instance_features
        ``"instance"`` only (ignored by the other kinds): ``"raw"`` projects the features as
        given, like the authors' generator; ``"standardized"`` z-scores each feature first (the
        law of distnoisy before :data:`GENERATOR_VERSION` 2). See :func:`instance_noise`.

    Returns
    -------
    numpy.ndarray
        int64 array of the same length as ``clean``.

    Raises
    ------
    ConfigError
        Unknown kind or ``instance_features``, or rate/seed/num_classes/pair_map out of range,
        or an option that does not apply to ``kind``.
    DataError
        Clean labels or features malformed or out of range.

    Notes
    -----
    Randomness comes only from ``np.random.default_rng(seed)`` (PCG64, platform independent).
    The symmetric and pair kinds are integer-exact across machines; the instance kind goes
    through a float matrix product and ``exp``, whose last bits can differ between BLAS/SIMD
    builds, which changes a label only if a uniform lands within ~1e-15 of a CDF boundary.
    """
    spec = check_noise(
        kind,
        num_classes,
        rate,
        seed,
        include_true_class=include_true_class,
        pair_map=pair_map,
        instance_features=instance_features,
    )
    return _draw(spec, _check_labels(clean, spec.num_classes), features)


def _draw(spec: NoiseSpec, clean: np.ndarray, features: np.ndarray | None) -> np.ndarray:
    """The noisy labels of checked inputs (``spec`` from :func:`check_noise`, ``clean`` as
    :func:`_check_labels` returns them)."""
    noisy = NOISE.get(spec.kind)(
        clean,
        spec.num_classes,
        spec.rate,
        np.random.default_rng(spec.seed),
        features=features,
        include_true_class=spec.include_true_class,
        pair_map=spec.pair_map,
        instance_features=spec.instance_features,
    )
    return np.asarray(noisy, dtype=np.int64)


def _check_pair(clean: np.ndarray, noisy: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    clean = np.asarray(clean)
    noisy = np.asarray(noisy)
    if clean.ndim != 1 or clean.shape != noisy.shape:
        raise DataError(
            f"clean and noisy labels must be 1-D arrays of the same length, got shapes "
            f"{clean.shape} and {noisy.shape}"
        )
    return clean, noisy


def realised_rate(clean: np.ndarray, noisy: np.ndarray) -> float:
    """Fraction of samples whose noisy label differs from the clean one (0.0 if empty)."""
    clean, noisy = _check_pair(clean, noisy)
    return _flip_rate(clean, noisy)


def _flip_rate(clean: np.ndarray, noisy: np.ndarray) -> float:
    return float(np.mean(clean != noisy)) if clean.size else 0.0


def transition_matrix(clean: np.ndarray, noisy: np.ndarray, num_classes: int) -> np.ndarray:
    """Empirical noise transition matrix.

    Returns
    -------
    numpy.ndarray
        C x C float64 array with ``T[j, k] = P(noisy = k | clean = j)``; every row sums to 1.
        A class with no samples gets the identity row (no evidence of noise).
    """
    num_classes = _check_num_classes(num_classes)
    clean, noisy = _check_pair(clean, noisy)
    clean = _check_labels(clean, num_classes, "clean labels")
    noisy = _check_labels(noisy, num_classes, "noisy labels")
    return _transition(clean, noisy, num_classes)


def measured_noise(
    clean: np.ndarray, given: np.ndarray, num_classes: int
) -> tuple[float, np.ndarray]:
    """(realised rate, transition matrix) of labels that are already checked: int64 arrays of
    one length with values in 0..C-1 (as :func:`~distnoisy.data.shards.read_labels`, a label
    file or a generator gives them); :func:`realised_rate` and :func:`transition_matrix` check
    theirs first."""
    return _flip_rate(clean, given), _transition(clean, given, num_classes)


def _transition(clean: np.ndarray, noisy: np.ndarray, num_classes: int) -> np.ndarray:
    counts = np.bincount(clean * num_classes + noisy, minlength=num_classes * num_classes)
    counts = counts.reshape(num_classes, num_classes).astype(np.float64)
    totals = counts.sum(axis=1, keepdims=True)
    eye = np.eye(num_classes)
    return np.where(totals > 0, counts / np.maximum(totals, 1.0), eye)


# --------------------------------------------------------------------------------------------
# Cached noise files
# --------------------------------------------------------------------------------------------

_DATASET_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")


def noise_file_name(
    dataset: str,
    kind: str,
    rate: float,
    seed: int,
    include_true_class: bool,
    instance_features: str = "raw",
) -> str:
    """File name of a cached noise file: ``noise-{dataset}-{kind}-{rate}-{seed}{suffix}.parquet``.

    The suffix is ``-incl`` with ``include_true_class`` and ``-std`` for instance noise on
    standardised features, so the files of the two instance laws live side by side.
    """
    suffix = "-incl" if include_true_class else ""
    if kind == "instance" and instance_features == "standardized":
        suffix += "-std"
    return f"noise-{dataset}-{kind}-{float(rate)}-{int(seed)}{suffix}.parquet"


def features_digest(features: np.ndarray) -> str:
    """SHA-256 of an array's dtype, shape and bytes (ties a cached instance-noise file to them)."""
    arr = np.ascontiguousarray(features)
    h = hashlib.sha256(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(memoryview(arr.reshape(-1)).cast("B"))
    return h.hexdigest()


def noisy_label_file(
    cache_dir: str | os.PathLike[str],
    dataset: str,
    clean: np.ndarray,
    num_classes: int,
    kind: str,
    rate: float,
    seed: int,
    features: np.ndarray | None = None,
    include_true_class: bool = False,
    *,
    pair_map: Mapping[int, int] | None = None,
    instance_features: str = "raw",
) -> Path:
    """Return the path of the noise file for this setting, generating it on first use.

    The file lives at ``cache_dir / noise_file_name(...)``. If it exists and its metadata and
    clean labels match the request, it is reused untouched; otherwise (stale, corrupt, another
    pair map or other features) it is regenerated and replaced atomically.

    Parameters
    ----------
    cache_dir
        Directory for noise files; created if missing.
    dataset
        Dataset name, used in the file name (letters, digits, ``_ . + -``).
    clean, num_classes, kind, rate, seed, features, include_true_class, instance_features
        As for :func:`make_noisy_labels`. ``instance_features`` is recorded (and is part of the
        file name) for ``"instance"`` only.
    pair_map
        ``"pair"`` only; ``None`` means :func:`default_pair_map` for ``dataset`` (the CIFAR-10
        map for ``"cifar10"``, else c -> c + 1 mod C).

    Notes
    -----
    Call it once (on the driver) before starting workers: concurrent calls are safe (atomic
    replace, deterministic content) but each would generate the labels.
    """
    spec = check_noise(
        kind,
        num_classes,
        rate,
        seed,
        include_true_class=include_true_class,
        pair_map=pair_map,
        instance_features=instance_features,
        dataset=dataset if isinstance(dataset, str) else None,
    )
    clean = _check_labels(clean, spec.num_classes)
    return cached_noisy_labels(cache_dir, dataset, spec, clean, features)[0]


def cached_noisy_labels(
    cache_dir: str | os.PathLike[str],
    dataset: str,
    spec: NoiseSpec,
    clean: np.ndarray,
    features: np.ndarray | None = None,
) -> tuple[Path, np.ndarray]:
    """:func:`noisy_label_file` on checked inputs, also returning the noisy labels.

    ``spec`` comes from :func:`check_noise`; ``clean`` are int64 labels in 0..C-1 (as
    :func:`~distnoisy.data.shards.read_labels` or :func:`_check_labels` give them). Neither is
    checked again; a cached file is (its rows are checked as it is read).

    Returns
    -------
    tuple
        The file's path and its labels (int64, by sample index), so that the caller need not
        read back the file it was just given.
    """
    if not isinstance(dataset, str) or not _DATASET_NAME.match(dataset):
        raise ConfigError(
            f"dataset name {dataset!r} cannot be used in a file name; use letters, digits, _ . + -"
        )
    kind, num_classes, pair_map = spec.kind, spec.num_classes, spec.pair_map
    wanted: dict[str, Any] = {
        "format": "distnoisy-labels",
        "generator_version": GENERATOR_VERSION,
        "dataset": dataset,
        "kind": kind,
        "rate": spec.rate,
        "seed": spec.seed,
        "include_true_class": spec.include_true_class,
        "num_classes": num_classes,
        "num_samples": int(clean.shape[0]),
        # JSON has no int keys; a sorted list of pairs round-trips exactly.
        "pair_map": sorted([k, v] for k, v in pair_map.items()) if pair_map is not None else None,
        "features_sha256": features_digest(features)
        if kind == "instance" and features is not None
        else None,
        # The feature map is part of the instance law; a file of one map never serves the other.
        "instance_features": spec.instance_features if kind == "instance" else None,
    }
    cache = Path(cache_dir)
    name = noise_file_name(
        dataset, kind, spec.rate, spec.seed, spec.include_true_class, spec.instance_features
    )
    path = cache / name
    if path.exists():
        try:
            found = read_label_file(path, clean.shape[0], num_classes)
        except DataError as exc:
            logger.warning("regenerating noise file %s: %s", path, exc)
        else:
            stale = [k for k, v in wanted.items() if found.meta.get(k) != v]
            if found.clean_labels is None or not np.array_equal(found.clean_labels, clean):
                stale.append("clean_label")
            if not stale:
                return path, found.labels
            logger.warning("regenerating noise file %s: %s differ", path, ", ".join(stale))
    noisy = _draw(spec, clean, features)
    meta = dict(wanted, realised_rate=_flip_rate(clean, noisy))
    cache.mkdir(parents=True, exist_ok=True)
    save_label_file(path, noisy, clean, meta)
    return path, noisy
