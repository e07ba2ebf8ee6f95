"""Tests for synthetic label noise and the label file (distnoisy.data.noise)."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from distnoisy.config import INSTANCE_FEATURES as CONFIG_INSTANCE_FEATURES
from distnoisy.core.errors import ConfigError, DataError
from distnoisy.data.instance_noise import _instance_draws  # the q and W behind a label vector
from distnoisy.data.noise import (
    CIFAR10_PAIR_MAP,
    GENERATOR_VERSION,
    INSTANCE_FEATURES,
    NOISE,
    LabelFile,
    default_pair_map,
    load_label_file,
    make_noisy_labels,
    noise_file_name,
    noisy_label_file,
    realised_rate,
    save_label_file,
    transition_matrix,
)

C = 10


def balanced_labels(n: int, num_classes: int = C, seed: int = 0) -> np.ndarray:
    """n labels, every class equally often, in random order."""
    labels = np.arange(n, dtype=np.int64) % num_classes
    return np.random.default_rng(seed).permutation(labels)


@pytest.fixture(scope="module")
def clean20k() -> np.ndarray:
    return balanced_labels(20_000)


# ------------------------------------------------------------------------------------------------
# Registry and determinism
# ------------------------------------------------------------------------------------------------


def test_registry_kinds() -> None:
    assert NOISE.names() == ["instance", "pair", "symmetric"]
    with pytest.raises(ConfigError, match="Valid choices: instance, pair, symmetric"):
        make_noisy_labels(np.zeros(4, dtype=np.int64), C, "gaussian", 0.2, 0)


@pytest.mark.parametrize("kind", ["symmetric", "pair", "instance"])
def test_same_seed_same_labels_different_seed_different(kind: str) -> None:
    clean = balanced_labels(2_000)
    feats = np.random.default_rng(1).normal(size=(2_000, 16))
    a = make_noisy_labels(clean, C, kind, 0.4, 7, features=feats)
    b = make_noisy_labels(clean, C, kind, 0.4, 7, features=feats)
    c = make_noisy_labels(clean, C, kind, 0.4, 8, features=feats)
    assert a.dtype == np.int64 and a.shape == clean.shape
    np.testing.assert_array_equal(a, b)
    assert np.mean(a != c) > 0.2  # independent realisations differ on many samples
    # The input is never modified.
    np.testing.assert_array_equal(clean, balanced_labels(2_000))


def test_symmetric_pinned_values() -> None:
    # Pins the generator's output for a fixed seed, so that a change to the draw order (which
    # would silently change every saved noise setting) shows up here and bumps GENERATOR_VERSION.
    clean = np.arange(10, dtype=np.int64)
    noisy = make_noisy_labels(clean, C, "symmetric", 0.5, 0)
    rng = np.random.default_rng(0)
    selected = rng.random(10) < 0.5
    offset = rng.integers(1, C, size=10, dtype=np.int64)
    np.testing.assert_array_equal(noisy, np.where(selected, (clean + offset) % C, clean))


# ------------------------------------------------------------------------------------------------
# Symmetric
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_symmetric_rate_and_uniform_targets(clean20k: np.ndarray, rate: float) -> None:
    noisy = make_noisy_labels(clean20k, C, "symmetric", rate, 0)
    assert abs(realised_rate(clean20k, noisy) - rate) < 0.02
    flipped = noisy != clean20k
    # Each class's offset 1..C-1 among flipped samples should be equally likely.
    offsets = (noisy[flipped] - clean20k[flipped]) % C
    counts = np.bincount(offsets, minlength=C)
    assert counts[0] == 0  # by construction: a flipped sample never keeps its class
    expected = flipped.sum() / (C - 1)
    assert np.all(np.abs(counts[1:] - expected) < 0.2 * expected), counts
    # Per source class too: chi-square of the (source, target) counts against uniform targets.
    # 10 classes x 8 degrees of freedom = 80 (mean 80, std ~12.6); 140 is ~4.7 std above.
    pair_counts = np.zeros((C, C))
    np.add.at(pair_counts, (clean20k[flipped], noisy[flipped]), 1)
    off = pair_counts[~np.eye(C, dtype=bool)].reshape(C, C - 1)
    expected_row = off.sum(axis=1, keepdims=True) / (C - 1)
    chi2 = float(((off - expected_row) ** 2 / expected_row).sum())
    assert chi2 < 140, chi2


def test_symmetric_include_true_class(clean20k: np.ndarray) -> None:
    for rate in (0.4, 0.8):
        noisy = make_noisy_labels(clean20k, C, "symmetric", rate, 3, include_true_class=True)
        assert abs(realised_rate(clean20k, noisy) - rate * (C - 1) / C) < 0.02


def test_symmetric_rate_sweep_is_nested(clean20k: np.ndarray) -> None:
    low = make_noisy_labels(clean20k, C, "symmetric", 0.2, 5)
    high = make_noisy_labels(clean20k, C, "symmetric", 0.4, 5)
    flipped_low = low != clean20k
    assert np.all(high[flipped_low] == low[flipped_low])


def test_rate_zero_is_clean(clean20k: np.ndarray) -> None:
    feats = np.random.default_rng(0).normal(size=(clean20k.size, 4))
    for kind in ("symmetric", "pair", "instance"):
        noisy = make_noisy_labels(clean20k, C, kind, 0.0, 1, features=feats)
        np.testing.assert_array_equal(noisy, clean20k)


# ------------------------------------------------------------------------------------------------
# Pair
# ------------------------------------------------------------------------------------------------


def test_pair_default_map_next_class(clean20k: np.ndarray) -> None:
    rate = 0.3
    noisy = make_noisy_labels(clean20k, C, "pair", rate, 0)
    flipped = noisy != clean20k
    np.testing.assert_array_equal(noisy[flipped], (clean20k[flipped] + 1) % C)
    for c in range(C):
        in_c = clean20k == c
        assert abs(flipped[in_c].mean() - rate) < 0.04, (c, flipped[in_c].mean())


def test_cifar10_map_exact(clean20k: np.ndarray) -> None:
    assert CIFAR10_PAIR_MAP == {9: 1, 2: 0, 4: 7, 3: 5, 5: 3}
    assert default_pair_map("cifar10", 10) == CIFAR10_PAIR_MAP
    assert default_pair_map("CIFAR10-train", 10) == CIFAR10_PAIR_MAP  # shard "dataset-split"
    assert default_pair_map("cifar100", 100) is None
    assert default_pair_map("cifar100-train", 100) is None
    rate = 0.4
    noisy = make_noisy_labels(clean20k, C, "pair", rate, 0, pair_map=CIFAR10_PAIR_MAP)
    t = transition_matrix(clean20k, noisy, C)
    expected = np.eye(C)
    for src, dst in CIFAR10_PAIR_MAP.items():
        expected[src, src] = 1 - rate
        expected[src, dst] = rate
    # Exactly the mapped cells are non-zero (unmapped classes 0, 1, 6, 7, 8 never flip) ...
    np.testing.assert_array_equal(t > 0, expected > 0)
    # ... and the per-class flip rates are close to the requested rate.
    np.testing.assert_allclose(t, expected, atol=0.04)
    assert abs(realised_rate(clean20k, noisy) - 0.5 * rate) < 0.02  # 5 of 10 classes flip


def test_pair_rate_one_allowed_and_bad_map_rejected() -> None:
    clean = balanced_labels(100)
    noisy = make_noisy_labels(clean, C, "pair", 1.0, 0)
    np.testing.assert_array_equal(noisy, (clean + 1) % C)
    with pytest.raises(ConfigError, match="maps class 3 to itself"):
        make_noisy_labels(clean, C, "pair", 0.2, 0, pair_map={3: 3})
    with pytest.raises(ConfigError, match=r"class 12 outside the valid range 0\.\.9"):
        make_noisy_labels(clean, C, "pair", 0.2, 0, pair_map={3: 12})


# ------------------------------------------------------------------------------------------------
# Instance
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rate", [0.2, 0.4])
def test_instance_rate(rate: float) -> None:
    clean = balanced_labels(10_000)
    feats = np.random.default_rng(2).normal(size=(10_000, 8, 8)).astype(np.float32)
    noisy = make_noisy_labels(clean, C, "instance", rate, 0, features=feats)
    assert abs(realised_rate(clean, noisy) - rate) < 0.03
    # Noise is spread over several target classes, not a fixed permutation.
    t = transition_matrix(clean, noisy, C)
    assert np.all((t > 0.005).sum(axis=1) >= 3)


def test_instance_true_class_excluded_from_targets() -> None:
    # With 2 classes, a flip can only go to the other class *if* the true class is excluded;
    # were it included in the softmax, about half the flips would be no-ops and the realised
    # rate would be ~0.2 instead of ~0.4.
    clean = balanced_labels(10_000, num_classes=2)
    feats = np.random.default_rng(3).normal(size=(10_000, 32))
    noisy = make_noisy_labels(clean, 2, "instance", 0.4, 0, features=feats)
    assert abs(realised_rate(clean, noisy) - 0.4) < 0.03


def test_instance_depends_on_features() -> None:
    clean = balanced_labels(5_000)
    rng = np.random.default_rng(4)
    feats_a = rng.normal(size=(5_000, 32))
    feats_b = rng.normal(size=(5_000, 32))
    a = make_noisy_labels(clean, C, "instance", 0.4, 0, features=feats_a)
    b = make_noisy_labels(clean, C, "instance", 0.4, 0, features=feats_b)
    # Same seed, so the same samples are selected for flipping; the targets follow the features.
    flipped = (a != clean) & (b != clean)
    assert flipped.sum() > 1_000
    assert np.mean(a[flipped] != b[flipped]) > 0.5
    # Standardisation makes the result invariant to a per-feature affine rescaling; the raw
    # projection (the default) is not: an offset adds the same vector to every score.
    std = {"instance_features": "standardized"}
    a_std = make_noisy_labels(clean, C, "instance", 0.4, 0, features=feats_a, **std)
    c_std = make_noisy_labels(clean, C, "instance", 0.4, 0, features=feats_a * 3.0 + 5.0, **std)
    assert np.mean(a_std != c_std) < 0.001
    c = make_noisy_labels(clean, C, "instance", 0.4, 0, features=feats_a * 3.0 + 5.0)
    assert np.mean(a[flipped] != c[flipped]) > 0.3


def test_instance_needs_features() -> None:
    with pytest.raises(ConfigError, match="needs the training features"):
        make_noisy_labels(balanced_labels(100), C, "instance", 0.2, 0)
    with pytest.raises(DataError, match="N=100"):
        make_noisy_labels(balanced_labels(100), C, "instance", 0.2, 0, features=np.ones((9, 3)))
    nan = np.ones((100, 3))
    nan[7, 1] = np.nan
    # 1e308 is finite, but its raw projection overflows.
    for feats, law in ((nan, "raw"), (nan, "standardized"), (np.full((100, 64), 1e308), "raw")):
        with pytest.raises(DataError, match="needs finite features"):
            make_noisy_labels(
                balanced_labels(100), C, "instance", 0.2, 0, features=feats, instance_features=law
            )


# ------------------------------------------------------------------------------------------------
# Instance noise against the authors' generator (Xia et al. 2020), on real images
# ------------------------------------------------------------------------------------------------

FMNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
# A subset keeps the per-sample reference loop fast; ~600 images per class.
FMNIST_SUBSET = 6_000
RATE = 0.4


@pytest.fixture(scope="module")
def digits_uint8() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's 1,797 digits as (N, 64) uint8 pixels on 0..255, and their labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    # The quantisation of the digits shards (distnoisy.data.digits): 0..16 -> 0..255.
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    return pixels.reshape(len(pixels), -1), digits.target.astype(np.int64)


def _read_idx(path: Path, magic: int, count: int, item_size: int) -> np.ndarray:
    """The first ``count`` items of a gzipped IDX file (big-endian header, then uint8 data)."""
    with gzip.open(path) as fh:
        dims = magic & 0xFF
        header = np.frombuffer(fh.read(4 + 4 * dims), dtype=">u4")
        assert header[0] == magic and header[1] >= count, (path, header)
        return np.frombuffer(fh.read(count * item_size), dtype=np.uint8)


@pytest.fixture(scope="module")
def fmnist_uint8() -> tuple[np.ndarray, np.ndarray]:
    """The first FMNIST_SUBSET Fashion-MNIST training images (N, 784) uint8, and their labels."""
    images = FMNIST_DIR / "train-images-idx3-ubyte.gz"
    labels = FMNIST_DIR / "train-labels-idx1-ubyte.gz"
    if not (images.is_file() and labels.is_file()):
        pytest.skip(f"Fashion-MNIST training files not found in {FMNIST_DIR}")
    x = _read_idx(images, 0x803, FMNIST_SUBSET, 28 * 28).reshape(FMNIST_SUBSET, -1)
    y = _read_idx(labels, 0x801, FMNIST_SUBSET, 1).astype(np.int64)
    return x, y


@pytest.fixture(params=["digits", "fmnist"])
def real_images(request: pytest.FixtureRequest) -> tuple[np.ndarray, np.ndarray]:
    return request.getfixturevalue(f"{request.param}_uint8")


def official_instance_labels(
    x: np.ndarray,
    y: np.ndarray,
    rate: float,
    rng: np.random.RandomState,
    q: np.ndarray | None = None,
    weights: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The authors' part-dependent generator, re-written one sample at a time in float64.

    Per-sample flip rate q_i ~ N(rate, 0.1) truncated to [0, 1]; one d x C standard-normal
    matrix per true class (``weights[y]``); scores = the raw pixel row @ weights[y], the true
    class set to -inf; label ~ (1 - q_i) * onehot(y) + q_i * softmax(scores). ``q`` and
    ``weights`` may be given, to share them with distnoisy's draw. Returns the labels and each
    sample's label distribution.
    """
    from scipy import stats

    n, d = x.shape
    if q is None:
        q = stats.truncnorm(-rate / 0.1, (1 - rate) / 0.1, loc=rate, scale=0.1).rvs(
            n, random_state=rng
        )
    if weights is None:
        weights = rng.standard_normal((C, d, C))
    labels = np.empty(n, dtype=np.int64)
    probs = np.empty((n, C))
    for i in range(n):
        scores = x[i].astype(np.float64) @ weights[y[i]]
        scores[y[i]] = -np.inf
        e = np.exp(scores - scores.max())
        probs[i] = q[i] * e / e.sum()
        probs[i, y[i]] += 1.0 - q[i]
        labels[i] = rng.choice(C, p=probs[i])
    return labels, probs


def counts(clean: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    """C x C matrix of (clean, noisy) label counts."""
    out = np.zeros((C, C))
    np.add.at(out, (clean, noisy), 1)
    return out


def top1_flip_share(clean: np.ndarray, noisy: np.ndarray) -> np.ndarray:
    """Per class: the share of its flips that go to its most common wrong class."""
    off = counts(clean, noisy)
    np.fill_diagonal(off, 0)
    return off.max(axis=1) / off.sum(axis=1)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_instance_raw_transition_matrix_matches_official(
    real_images: tuple[np.ndarray, np.ndarray], seed: int
) -> None:
    # Given the flip rates q and the matrices W, the law of each label is fixed, so distnoisy's
    # realised transition matrix and the reference's (its own uniforms) must agree cell by cell
    # up to sampling error. instance_noise takes q and W first from default_rng(seed).
    x, y = real_images
    ours = make_noisy_labels(y, C, "instance", RATE, seed, features=x)
    q, weights, _, _ = _instance_draws(np.random.default_rng(seed), RATE, *x.shape, C)
    rng = np.random.RandomState(1000 + seed)
    ref, probs = official_instance_labels(x, y, RATE, rng, q=q, weights=np.stack(weights))
    n_c = np.bincount(y, minlength=C)[:, None]
    # Tolerance: a cell is (count of Bernoulli(p_ik) over the class's samples) / n_c, so the
    # difference of two independent realisations has variance 2 * sum_i p_ik (1 - p_ik) / n_c^2.
    # Allow 5 standard errors (two-sided p ~ 6e-7 per cell, < 1e-3 over the 600 cells of the
    # parametrisation) plus 2 samples' worth, which covers the discrete, Poisson-like tails of
    # cells with expected counts below ~1, where the normal approximation is too thin.
    var = np.zeros((C, C))
    np.add.at(var, y, probs * (1.0 - probs))
    tol = 5.0 * np.sqrt(2.0 * var) / n_c + 2.0 / n_c
    deviation = np.abs(counts(y, ours) - counts(y, ref)) / n_c
    worst = float(np.max(deviation / tol))
    assert worst <= 1.0, f"a cell is {worst:.2f} x its tolerance off the official law"
    # The same bound rejects the standardised law (same q and W): the test can tell them apart.
    std = make_noisy_labels(
        y, C, "instance", RATE, seed, features=x, instance_features="standardized"
    )
    assert np.sum(np.abs(counts(y, std) - counts(y, ref)) / n_c > tol) >= 10


def test_instance_raw_statistics_match_official_over_seeds(
    real_images: tuple[np.ndarray, np.ndarray],
) -> None:
    # Fully independent draws (the reference's own q and W): the statistics that do not depend
    # on which wrong class W favours must agree across seeds.
    from scipy import stats

    x, y = real_images
    seeds = range(12)
    flips: dict[str, list[np.ndarray]] = {"ours": [], "ref": []}
    shares: dict[str, list[np.ndarray]] = {"ours": [], "ref": []}
    for seed in seeds:
        ours = make_noisy_labels(y, C, "instance", RATE, seed, features=x)
        ref, _ = official_instance_labels(x, y, RATE, np.random.RandomState(1000 + seed))
        for name, noisy in (("ours", ours), ("ref", ref)):
            flips[name].append(noisy != y)
            shares[name].append(top1_flip_share(y, noisy))
    # Each label flips with probability m = E[q] independently of W, so rates are binomial.
    m = stats.truncnorm(-RATE / 0.1, (1 - RATE) / 0.1, loc=RATE, scale=0.1).mean()
    total = len(seeds) * len(y)
    rate_ours, rate_ref = np.mean(flips["ours"]), np.mean(flips["ref"])
    se = np.sqrt(m * (1 - m) / total)
    assert abs(rate_ours - m) < 5 * se and abs(rate_ref - m) < 5 * se, (rate_ours, rate_ref, m)
    n_c = len(seeds) * np.bincount(y, minlength=C)
    per_class = {
        k: np.sum([np.bincount(y[f], minlength=C) for f in v], 0) / n_c for k, v in flips.items()
    }
    se_c = np.sqrt(2 * m * (1 - m) / n_c)  # difference of two binomial proportions
    assert np.all(np.abs(per_class["ours"] - per_class["ref"]) < 5 * se_c)
    # The top-1 flip share depends on W (a new draw per seed and class), so its spread is
    # measured, not binomial: 4 standard errors of the difference of the two means.
    a, b = np.ravel(shares["ours"]), np.ravel(shares["ref"])
    se_share = np.sqrt(a.var(ddof=1) / a.size + b.var(ddof=1) / b.size)
    assert abs(a.mean() - b.mean()) < 4 * se_share, (a.mean(), b.mean(), se_share)
    assert 0.55 < b.mean() < 0.8  # the official law piles most flips onto one class


def test_instance_standardized_reproduces_version_1_files(
    digits_uint8: tuple[np.ndarray, np.ndarray],
) -> None:
    # SHA-256 of the labels (int64, little-endian) that the generator wrote before the raw law
    # became the default (GENERATOR_VERSION 1, the only law then): label files made with it stay
    # valid as noise.instance_features=standardized. The last case spans two chunks.
    x, y = digits_uint8
    rng = np.random.default_rng(11)
    feats, labels = rng.normal(size=(10_000, 3)), rng.integers(0, C, size=10_000)
    cases = [
        (y, x, 0.4, 0, "c9c4eb73bf6f7160515504fdbc25299c5262f2a13687275b0d7fd074f2efafce"),
        (y, x, 0.4, 1, "cb73b94c94f2feeaa88e6653cd51733f199543a38800d6de23c5184bfc35b443"),
        (y, x, 0.4, 2, "40ff9a98b46e38756c8b87ee0b5b2ca4c731808ca9579dd41737d2bf110f2ec4"),
        (labels, feats, 0.3, 5, "8bffbce9cdaa3293286195d31dc147d72f74e60485b50e82b643a06bcc3d3251"),
    ]
    for clean, f, rate, seed, digest in cases:
        noisy = make_noisy_labels(
            clean, C, "instance", rate, seed, features=f, instance_features="standardized"
        )
        assert hashlib.sha256(noisy.astype("<i8").tobytes()).hexdigest() == digest, seed


def test_instance_raw_and_standardized_laws_differ(
    digits_uint8: tuple[np.ndarray, np.ndarray],
) -> None:
    # Measured on digits at rate 0.4, mean over classes of the top-1 flip share:
    # raw 0.664 / 0.614 / 0.686, standardized 0.377 / 0.408 / 0.409 (seeds 0, 1, 2).
    x, y = digits_uint8
    for seed in (0, 1, 2):
        raw = make_noisy_labels(y, C, "instance", RATE, seed, features=x)
        std = make_noisy_labels(
            y, C, "instance", RATE, seed, features=x, instance_features="standardized"
        )
        # One draw order for both maps: the same samples flip, only their targets differ.
        np.testing.assert_array_equal(raw != y, std != y)
        share_raw, share_std = top1_flip_share(y, raw).mean(), top1_flip_share(y, std).mean()
        assert share_raw > 0.55 and share_std < 0.45, (seed, share_raw, share_std)
        assert share_raw - share_std > 0.15, (seed, share_raw, share_std)


def test_instance_features_choice_is_validated(tmp_path: Path) -> None:
    clean, feats = balanced_labels(100), np.ones((100, 4))
    expected = r"^invalid noise.instance_features='pca'; valid choices: raw, standardized$"
    with pytest.raises(ConfigError, match=expected):
        make_noisy_labels(clean, C, "instance", 0.2, 0, features=feats, instance_features="pca")
    with pytest.raises(ConfigError, match=expected):
        noisy_label_file(
            tmp_path, "toy", clean, C, "instance", 0.2, 0, features=feats, instance_features="pca"
        )
    assert not list(tmp_path.iterdir())
    assert CONFIG_INSTANCE_FEATURES == INSTANCE_FEATURES  # the config's copy of the choices


def test_noisy_label_file_keeps_instance_laws_apart(tmp_path: Path) -> None:
    clean = balanced_labels(2_000)
    feats = np.random.default_rng(0).integers(0, 256, size=(2_000, 16)).astype(np.uint8)
    raw = noisy_label_file(tmp_path, "toy", clean, C, "instance", 0.3, 1, features=feats)
    std = noisy_label_file(
        tmp_path,
        "toy",
        clean,
        C,
        "instance",
        0.3,
        1,
        features=feats,
        instance_features="standardized",
    )
    assert (raw.name, std.name) == (
        "noise-toy-instance-0.3-1.parquet",
        "noise-toy-instance-0.3-1-std.parquet",
    )
    for path, law in ((raw, "raw"), (std, "standardized")):
        lf = load_label_file(path, 2_000, C)
        assert lf.meta["instance_features"] == law
        assert lf.meta["generator_version"] == GENERATOR_VERSION == 2
        expected = make_noisy_labels(
            clean, C, "instance", 0.3, 1, features=feats, instance_features=law
        )
        np.testing.assert_array_equal(lf.labels, expected)
    # A file from generator version 1 (standardised labels, no instance_features key) sitting
    # at the raw law's name is regenerated, not served as raw.
    old = load_label_file(std, 2_000, C)
    meta_v1 = {k: v for k, v in old.meta.items() if k not in ("instance_features", "realised_rate")}
    save_label_file(raw, old.labels, clean, dict(meta_v1, generator_version=1))
    noisy_label_file(tmp_path, "toy", clean, C, "instance", 0.3, 1, features=feats)
    again = load_label_file(raw, 2_000, C)
    assert again.meta["instance_features"] == "raw" and not np.array_equal(again.labels, old.labels)


# ------------------------------------------------------------------------------------------------
# Validation, transition matrix, realised rate
# ------------------------------------------------------------------------------------------------


def test_validation_messages() -> None:
    clean = balanced_labels(100)
    with pytest.raises(ConfigError, match=r"noise.rate=1.0 is outside the valid range \[0, 1\)"):
        make_noisy_labels(clean, C, "symmetric", 1.0, 0)
    with pytest.raises(ConfigError, match=r"noise.rate=-0.1 is outside the valid range \[0, 1\]"):
        make_noisy_labels(clean, C, "pair", -0.1, 0)
    with pytest.raises(ConfigError, match="num_classes must be >= 2, got 1"):
        make_noisy_labels(np.zeros(5, dtype=np.int64), 1, "symmetric", 0.2, 0)
    with pytest.raises(ConfigError, match=r"noise\.seed"):
        make_noisy_labels(clean, C, "symmetric", 0.2, -1)
    bad = clean.copy()
    bad[17] = 10
    with pytest.raises(DataError, match=r"label 10 at index 17 is outside the valid range 0\.\.9"):
        make_noisy_labels(bad, C, "symmetric", 0.2, 0)
    with pytest.raises(DataError, match="integer dtype"):
        make_noisy_labels(clean.astype(float), C, "symmetric", 0.2, 0)
    with pytest.raises(ConfigError, match=r"only applies to noise\.kind='symmetric'"):
        make_noisy_labels(clean, C, "pair", 0.2, 0, include_true_class=True)


def test_transition_matrix_and_realised_rate(clean20k: np.ndarray) -> None:
    clean = np.array([0, 0, 0, 0, 1, 1])
    noisy = np.array([0, 0, 0, 2, 1, 0])
    t = transition_matrix(clean, noisy, 3)
    np.testing.assert_allclose(t, [[0.75, 0, 0.25], [0.5, 0.5, 0], [0, 0, 1]])  # class 2: eye
    assert realised_rate(clean, noisy) == pytest.approx(2 / 6)

    noisy = make_noisy_labels(clean20k, C, "symmetric", 0.4, 9)
    t = transition_matrix(clean20k, noisy, C)
    np.testing.assert_allclose(t.sum(axis=1), 1.0)
    np.testing.assert_allclose(np.diag(t), 0.6, atol=0.04)
    with pytest.raises(DataError, match="same length"):
        realised_rate(clean20k, noisy[:-1])


# ------------------------------------------------------------------------------------------------
# Label file
# ------------------------------------------------------------------------------------------------


def test_parquet_round_trip_with_metadata(tmp_path: Path) -> None:
    clean = balanced_labels(500)
    noisy = make_noisy_labels(clean, C, "symmetric", 0.4, 0)
    meta = {"kind": "symmetric", "rate": 0.4, "seed": 0, "realised_rate": np.float64(0.39)}
    path = tmp_path / "labels.parquet"
    save_label_file(path, noisy, clean, meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["labels.parquet"]  # no temp file left

    table = pq.read_table(path)
    assert table.column_names == ["index", "label", "clean_label"]
    assert all(table.schema.field(n).type == pa.int64() for n in table.column_names)

    lf = load_label_file(path, 500, C)
    assert isinstance(lf, LabelFile)
    np.testing.assert_array_equal(lf.labels, noisy)
    assert lf.clean_labels is not None
    np.testing.assert_array_equal(lf.clean_labels, clean)
    assert lf.meta == {"kind": "symmetric", "rate": 0.4, "seed": 0, "realised_rate": 0.39}

    # Unknown clean labels are stored as -1 and loaded as None.
    save_label_file(path, noisy, None, {})
    assert load_label_file(path, 500, C).clean_labels is None


def test_parquet_rows_in_any_order(tmp_path: Path) -> None:
    order = np.random.default_rng(0).permutation(50)
    labels = np.arange(50, dtype=np.int64) % C
    path = tmp_path / "shuffled.parquet"
    pq.write_table(pa.table({"index": order, "label": labels[order]}), path)
    lf = load_label_file(path, 50, C)
    np.testing.assert_array_equal(lf.labels, labels)
    assert lf.clean_labels is None and lf.meta == {}


def test_csv_round_trip(tmp_path: Path) -> None:
    path = tmp_path / "labels.csv"
    # Rows out of order, a blank line, and spaces are all accepted.
    path.write_text("index,label,clean_label\n2, 1,1\n0,3,3\n\n1,4,2\n")
    lf = load_label_file(path, 3, C)
    np.testing.assert_array_equal(lf.labels, [3, 4, 1])
    assert lf.clean_labels is not None
    np.testing.assert_array_equal(lf.clean_labels, [3, 2, 1])
    path.write_text("index,label\n1,0\n0,9\n")
    lf = load_label_file(path, 2, C)
    np.testing.assert_array_equal(lf.labels, [9, 0])
    assert lf.clean_labels is None


def test_npy_round_trip(tmp_path: Path) -> None:
    labels = balanced_labels(300)
    path = tmp_path / "labels.npy"
    np.save(path, labels.astype(np.int32))
    lf = load_label_file(path, 300, C)
    assert lf.labels.dtype == np.int64
    np.testing.assert_array_equal(lf.labels, labels)
    assert lf.clean_labels is None
    np.save(path, labels.astype(np.float32))
    with pytest.raises(DataError, match="dtype float32, expected an integer dtype"):
        load_label_file(path, 300, C)
    np.save(path, labels)
    with pytest.raises(DataError, match="has 300 labels, expected 301"):
        load_label_file(path, 301, C)
    np.save(path, np.array([{"a": 1}], dtype=object))
    with pytest.raises(DataError, match=r"not a plain numeric \.npy"):
        load_label_file(path, 1, C)


def test_csv_out_of_range_label_names_label_line_and_range(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("index,label\n0,1\n1,2\n2,12\n3,0\n")
    with pytest.raises(DataError) as info:
        load_label_file(path, 4, C)
    msg = str(info.value)
    assert "label 12" in msg and "index 2" in msg and "line 4" in msg and "0..9" in msg
    assert "\n" not in msg


def test_csv_bad_cells(tmp_path: Path) -> None:
    path = tmp_path / "bad.csv"
    path.write_text("index,label\n0,1\n1,cat\n")
    with pytest.raises(DataError, match="line 3: expected integers"):
        load_label_file(path, 2, C)
    path.write_text("idx,label\n0,1\n")
    with pytest.raises(DataError, match="no 'index' column"):
        load_label_file(path, 1, C)


def test_duplicate_and_missing_indices(tmp_path: Path) -> None:
    path = tmp_path / "dup.csv"
    path.write_text("index,label\n0,1\n1,2\n1,3\n2,0\n")
    with pytest.raises(DataError, match="1 indices appear more than once, first: 1"):
        load_label_file(path, 4, C)
    path = tmp_path / "missing.parquet"
    pq.write_table(pa.table({"index": np.array([0, 2, 4]), "label": np.array([1, 1, 1])}), path)
    with pytest.raises(DataError, match="2 of 5 sample indices are missing, first: 1, 3"):
        load_label_file(path, 5, C)
    with pytest.raises(DataError, match=r"index outside 0\.\.1, first: index 2"):
        load_label_file(path, 2, C)


def test_parquet_missing_column_and_wrong_dtype(tmp_path: Path) -> None:
    path = tmp_path / "x.parquet"
    pq.write_table(pa.table({"index": np.arange(3), "noisy": np.zeros(3, dtype=np.int64)}), path)
    with pytest.raises(DataError, match="has no 'label' column"):
        load_label_file(path, 3, C)
    pq.write_table(pa.table({"index": np.arange(3), "label": np.zeros(3)}), path)
    with pytest.raises(DataError, match="column 'label' has type double"):
        load_label_file(path, 3, C)


def test_missing_file_names_path(tmp_path: Path) -> None:
    path = tmp_path / "nope" / "labels.parquet"
    with pytest.raises(DataError) as info:
        load_label_file(path, 10, C)
    assert str(path) in str(info.value) and "does not exist" in str(info.value)
    with pytest.raises(DataError, match="unsupported suffix"):
        (tmp_path / "labels.txt").write_text("1\n")
        load_label_file(tmp_path / "labels.txt", 1, C)


# ------------------------------------------------------------------------------------------------
# Cached noise files
# ------------------------------------------------------------------------------------------------


def test_noisy_label_file_cache_reuse(tmp_path: Path) -> None:
    clean = balanced_labels(1_000)
    cache = tmp_path / "cache"
    path = noisy_label_file(cache, "digits", clean, C, "symmetric", 0.4, 3)
    assert path == cache / "noise-digits-symmetric-0.4-3.parquet"
    lf = load_label_file(path, 1_000, C)
    np.testing.assert_array_equal(lf.labels, make_noisy_labels(clean, C, "symmetric", 0.4, 3))
    assert lf.meta["kind"] == "symmetric" and lf.meta["rate"] == 0.4 and lf.meta["seed"] == 3
    assert lf.meta["dataset"] == "digits" and lf.meta["num_classes"] == C
    assert lf.meta["include_true_class"] is False
    assert lf.meta["realised_rate"] == pytest.approx(realised_rate(clean, lf.labels))

    # Backdate the file: a second call must not rewrite it.
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    assert noisy_label_file(cache, "digits", clean, C, "symmetric", 0.4, 3) == path
    assert path.stat().st_mtime_ns == 1_000_000_000

    # Different clean labels (e.g. another split) -> regenerated in place.
    clean2 = np.roll(clean, 1)
    noisy_label_file(cache, "digits", clean2, C, "symmetric", 0.4, 3)
    assert path.stat().st_mtime_ns != 1_000_000_000
    lf2 = load_label_file(path, 1_000, C)
    assert lf2.clean_labels is not None
    np.testing.assert_array_equal(lf2.clean_labels, clean2)
    assert sorted(p.name for p in cache.iterdir()) == [path.name]  # no temp files left


def test_noisy_label_file_regenerates_stale_or_corrupt(tmp_path: Path) -> None:
    clean = balanced_labels(200)
    path = tmp_path / noise_file_name("digits", "symmetric", 0.2, 0, include_true_class=True)
    assert path.name == "noise-digits-symmetric-0.2-0-incl.parquet"
    save_label_file(path, clean, clean, {"kind": "symmetric", "rate": 0.2, "seed": 0})
    noisy_label_file(tmp_path, "digits", clean, C, "symmetric", 0.2, 0, include_true_class=True)
    lf = load_label_file(path, 200, C)
    assert lf.meta["include_true_class"] is True
    assert lf.meta["generator_version"] == GENERATOR_VERSION
    assert realised_rate(clean, lf.labels) > 0.1

    path.write_bytes(b"not parquet")
    noisy_label_file(tmp_path, "digits", clean, C, "symmetric", 0.2, 0, include_true_class=True)
    np.testing.assert_array_equal(load_label_file(path, 200, C).labels, lf.labels)


def test_noisy_label_file_pair_and_instance(tmp_path: Path) -> None:
    clean = balanced_labels(2_000)
    path = noisy_label_file(tmp_path, "cifar10-train", clean, C, "pair", 0.4, 0)
    lf = load_label_file(path, 2_000, C)
    assert lf.meta["pair_map"] == sorted([k, v] for k, v in CIFAR10_PAIR_MAP.items())
    flipped = lf.labels != clean
    assert set(zip(clean[flipped].tolist(), lf.labels[flipped].tolist(), strict=True)) == set(
        CIFAR10_PAIR_MAP.items()
    )

    feats = np.random.default_rng(0).normal(size=(2_000, 12))
    path = noisy_label_file(tmp_path, "toy", clean, C, "instance", 0.3, 1, features=feats)
    meta = json.loads(pq.read_schema(path).metadata[b"distnoisy"])
    assert meta["features_sha256"] and meta["kind"] == "instance"
    os.utime(path, ns=(1_000_000_000, 1_000_000_000))
    noisy_label_file(tmp_path, "toy", clean, C, "instance", 0.3, 1, features=feats)
    assert path.stat().st_mtime_ns == 1_000_000_000  # same features: reused
    noisy_label_file(tmp_path, "toy", clean, C, "instance", 0.3, 1, features=feats + 1e-3)
    assert path.stat().st_mtime_ns != 1_000_000_000  # other features: regenerated

    with pytest.raises(ConfigError, match="cannot be used in a file name"):
        noisy_label_file(tmp_path, "../evil", clean, C, "pair", 0.4, 0)
