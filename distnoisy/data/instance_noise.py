"""Instance-dependent label noise: the part-dependent generator of Xia et al. (2020).

Registered as ``noise.kind=instance`` in :data:`distnoisy.data.noise.NOISE`, which checks its
inputs (:func:`distnoisy.data.noise.check_noise`) before calling it; see
:func:`instance_noise` and docs/methods.md#noise-model.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from distnoisy.core.errors import ConfigError, DataError

#: Std of the per-sample flip rate in the instance generator (Xia et al. 2020).
_INSTANCE_RATE_STD = 0.1

#: Rows of features standardised and projected at a time (bounds memory for big image sets).
_CHUNK_ROWS = 8192


def _truncated_normal(
    rng: np.random.Generator, mean: float, std: float, n: int, low: float, high: float
) -> np.ndarray:
    """Draw ``n`` values from N(mean, std) truncated to [low, high] by resampling.

    Rejection sampling is exact (the same law as ``scipy.stats.truncnorm``) and needs no inverse
    normal CDF. For mean in [0, 1) and std 0.1 at least ~half the draws are accepted, so this
    loop runs a handful of rounds. The number of draws is a function of the seed only, so the
    result is deterministic.
    """
    out = np.empty(n, dtype=np.float64)
    pending = np.arange(n)
    while pending.size:
        draw = rng.normal(mean, std, size=pending.size)
        ok = (draw >= low) & (draw <= high)
        out[pending[ok]] = draw[ok]
        pending = pending[~ok]
    return out


def _column_stats(flat: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std over the rows of ``flat``, in float64 chunks.

    Chunks are merged with Chan et al.'s pairwise update, which is stable, unlike a running sum
    of squares, and never materialises a float64 copy of the whole feature matrix.
    """
    d = flat.shape[1]
    count = 0
    mean = np.zeros(d)
    m2 = np.zeros(d)
    for start in range(0, flat.shape[0], _CHUNK_ROWS):
        x = flat[start : start + _CHUNK_ROWS].astype(np.float64)
        k = x.shape[0]
        x_mean = x.mean(axis=0)
        x_m2 = ((x - x_mean) ** 2).sum(axis=0)
        delta = x_mean - mean
        total = count + k
        mean = mean + delta * (k / total)
        m2 = m2 + x_m2 + delta**2 * (count * k / total)
        count = total
    std = np.sqrt(m2 / count)
    return mean, std


def _instance_inputs(clean: np.ndarray, features: np.ndarray | None) -> np.ndarray:
    """The features as an (N, d) view, one row per label, after checking them."""
    if features is None:
        raise ConfigError(
            "noise.kind='instance' needs the training features (array of shape (N, ...)); "
            "pass features=..."
        )
    n = clean.shape[0]
    feats = np.asarray(features)
    if feats.ndim < 2 or feats.shape[0] != n:
        raise DataError(
            f"instance noise needs features of shape (N, ...) with N={n} (one row per label), "
            f"got shape {feats.shape}"
        )
    if not (np.issubdtype(feats.dtype, np.number) or feats.dtype == np.bool_):
        raise DataError(f"instance noise needs numeric features, got dtype {feats.dtype}")
    return feats.reshape(n, -1)


def _feature_map(flat: np.ndarray, instance_features: str) -> tuple[np.ndarray, np.ndarray]:
    """(shift, scale) with z = (x - shift) * scale: the features the projection sees.

    ``raw`` is the identity (the official generator projects the pixel values themselves);
    ``standardized`` is the per-feature z-score, with constant features mapped to 0.
    """
    d = flat.shape[1]
    if instance_features == "raw":
        return np.zeros(d), np.ones(d)
    mean, std = _column_stats(flat)
    if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std))):
        raise DataError("instance noise needs finite features; found NaN or inf")
    return mean, np.divide(1.0, std, out=np.zeros_like(std), where=std > 0)


def _instance_draws(
    rng: np.random.Generator, rate: float, n: int, d: int, num_classes: int
) -> tuple[np.ndarray, list[np.ndarray], np.ndarray, np.ndarray]:
    """All the randomness of :func:`instance_noise`: (q, W_0..W_{C-1}, u_flip, u_target).

    The draw order is part of the file format (``noise.GENERATOR_VERSION``), and it is the
    same for both feature maps, so with one seed they flip the same samples (only the targets
    move).
    """
    q = _truncated_normal(rng, rate, _INSTANCE_RATE_STD, n, 0.0, 1.0)
    weights = [rng.standard_normal((d, num_classes)) for _ in range(num_classes)]
    return q, weights, rng.random(n), rng.random(n)


def _softmax_targets(
    z: np.ndarray, y: np.ndarray, weights: list[np.ndarray], u: np.ndarray
) -> np.ndarray:
    """Draw k != y_i with probability softmax(z_i @ W_{y_i} with entry y_i set to -inf)[k].

    An inverse-CDF draw with one uniform ``u_i`` per row of ``z``.
    """
    m, num_classes = z.shape[0], weights[0].shape[1]
    scores = np.empty((m, num_classes))
    with np.errstate(over="ignore", invalid="ignore"):  # overflow is reported just below
        for c in np.unique(y):
            rows = y == c
            scores[rows] = z[rows] @ weights[c]
    if not np.all(np.isfinite(scores)):
        # NaN/inf features, or (raw features only) values so large that the projection overflows.
        raise DataError(
            "instance noise needs finite features; found NaN or inf in the features or in their "
            "projection"
        )
    rows_idx = np.arange(m)
    scores[rows_idx, y] = -np.inf
    # Softmax over the other classes (max-subtracted; the true class has probability 0). With raw
    # pixels the scores span thousands, so most rows come out one-hot, as in the official code.
    scores -= scores.max(axis=1, keepdims=True)
    probs = np.exp(scores)
    probs /= probs.sum(axis=1, keepdims=True)
    cdf = np.cumsum(probs, axis=1)
    # The clip guards against u landing above a cdf that sums to 1 - ulp.
    target = np.minimum((cdf < u[:, None]).sum(axis=1), num_classes - 1)
    # Rounding could in principle pick a zero-probability class at the end of the row;
    # the true class has probability exactly 0, so fall back to the most likely class.
    bad = target == y
    if bad.any():
        target[bad] = probs[bad].argmax(axis=1)
    return target


def instance_noise(
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
    """Instance-dependent noise: the part-dependent generator of Xia et al. (2020).

    For sample i with true class y and flattened features x_i (d values):

    1. a flip rate q_i ~ N(rate, 0.1) truncated to [0, 1] (exact truncation by resampling);
    2. scores s_i = z_i @ W_y, where W_y is a d x C matrix of independent standard normals
       drawn once per true class y (C matrices in all), and z_i is

       - ``raw`` (default, the authors' generator): x_i itself, unscaled. For images these
         are the 0..255 pixel values, which is what the published benchmarks projected;
       - ``standardized``: x_i standardised per feature (zero mean, unit std over the whole
         dataset; constant features become 0). This was distnoisy's only law before
         ``noise.GENERATOR_VERSION`` 2, and it still reproduces those files label for label;

    3. s_i[y] = -inf; the sample keeps y with probability 1 - q_i and otherwise flips to
       k != y with probability softmax(s_i)[k]. That is, its label is drawn from the mixture
       (1 - q_i) * e_y + q_i * softmax(s_i).

    Parameters
    ----------
    features
        Array of shape (N, ...) (e.g. images N x C x H x W); each row is flattened. Required.
        With ``raw`` the scale matters: give pixels on the 0..255 scale to match the official
        law (on a 0..1 scale the softmax is flatter and the flips less concentrated).
    instance_features
        ``"raw"`` or ``"standardized"``: the feature map z above.

    Notes
    -----
    - The two maps give very different noise. Raw pixels are non-negative, so the images of a
      class share a large common component (about the class's mean image) whose projection
      favours the same wrong class for most of them; and the scores are in the hundreds or
      thousands, so the softmax is one-hot for almost every sample. Standardising removes the
      dataset mean and scales to unit variance, so what is left of each image is more its own
      and the flips spread over more classes. On scikit-learn's digits at rate 0.4, the share of
      a class's flips that go to its most common wrong class (mean over classes) is
      0.664 / 0.614 / 0.686 raw and 0.377 / 0.408 / 0.409 standardized for seeds 0 / 1 / 2
      (seed 0: score std 880 vs 8; 99% vs 28% of samples with a softmax maximum above 0.99).
    - The overall realised rate is E[q_i], which exceeds ``rate`` slightly for small rates
      because the truncation at 0 removes the left tail (about +0.006 at rate 0.2).
      ``rate == 0`` returns the clean labels unchanged rather than a ~0.04 noise floor.
    - As in Xia et al., the scores are not scaled by 1/sqrt(d).
    - The keep/flip decision and the choice of target use separate uniforms, which is the same
      law as sampling the mixture directly. The random numbers are distnoisy's own (see
      :func:`distnoisy.data.noise.make_noisy_labels`), so the labels are not those of the
      authors' code for the same seed; their distribution is.
    """
    flat = _instance_inputs(clean, features)
    if rate == 0.0:
        return clean.copy()
    n, d = flat.shape
    shift, scale = _feature_map(flat, instance_features)
    q, weights, u_flip, u_target = _instance_draws(rng, rate, n, d, num_classes)
    noisy = clean.copy()
    for start in range(0, n, _CHUNK_ROWS):
        stop = min(start + _CHUNK_ROWS, n)
        y = clean[start:stop]
        z = (flat[start:stop].astype(np.float64) - shift) * scale
        target = _softmax_targets(z, y, weights, u_target[start:stop])
        noisy[start:stop] = np.where(u_flip[start:stop] < q[start:stop], target, y)
    return noisy
