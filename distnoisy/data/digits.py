"""scikit-learn's bundled digits (1,797 real 8x8 grey-scale images) as train/test shard sets.

This is the default dataset of ``python -m distnoisy.train``: it ships with scikit-learn, so the
first run needs no download. :func:`prepare_digits` writes the shards once and reuses them.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np

from distnoisy.core.errors import ConfigError
from distnoisy.data.cache import all_cached, clean_png_samples, write_cached_sets

log = logging.getLogger(__name__)

# Mean and std of all 1,797 images after the uint8 quantisation used for the PNGs, on the 0..1
# pixel scale: x = round(v * 255 / 16) / 255 -> mean 0.305309, std 0.375886 (computed once from
# sklearn.datasets.load_digits(); all images, not one split, so they do not depend on the seed).
DIGITS_MEAN = 0.3053
DIGITS_STD = 0.3759

DIGITS_CLASSES = [str(c) for c in range(10)]
# Bump when the way the shards are made changes, so old caches are rebuilt.
_DIGITS_VERSION = 1


def _params(
    test_fraction: float, seed: int, shard_size: int, val_fraction: float = 0.0
) -> dict[str, Any]:
    params = {
        "source": "sklearn.datasets.load_digits",
        "version": _DIGITS_VERSION,
        "test_fraction": float(test_fraction),
        "seed": int(seed),
        "shard_size": int(shard_size),
    }
    if val_fraction > 0:  # only when used, so caches made before val splits stay valid
        params["val_fraction"] = float(val_fraction)
    return params


def prepare_digits(
    root: Path,
    *,
    test_fraction: float = 0.2,
    seed: int = 0,
    shard_size: int = 256,
    val_fraction: float = 0.0,
) -> tuple[Path, Path]:
    """Write (or reuse) the digits train/test (and optional validation) shard sets under ``root``.

    The split is stratified and depends only on ``seed``; clean labels equal the labels (the
    dataset is clean; noise is added separately). Keys are ``digits/{original index}``; global
    indices follow the original order within each split.

    Parameters
    ----------
    root
        Cache directory; the sets are ``root/train`` and ``root/test``.
    test_fraction
        Fraction of the 1,797 images in the test split, in (0, 1).
    seed
        Seed of the stratified split.
    shard_size
        Samples per shard.
    val_fraction
        Fraction of the non-test images held out (stratified) as a clean validation split in
        ``root/val``, for model selection and sweeps; 0 = no validation split.

    Returns
    -------
    (Path, Path)
        The train and test shard directories.

    Notes
    -----
    Cached: when both manifests exist and record the same parameters nothing is written. Safe
    against concurrent callers: each builds in its own temporary sibling directory and renames
    the finished split into place; a loser of the rename uses the winner's (identical) shards.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ConfigError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
    if shard_size < 1:
        raise ConfigError(f"data.shard_size must be at least 1, got {shard_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    root = Path(root).expanduser()
    params = _params(test_fraction, seed, shard_size, val_fraction)
    train_dir, test_dir = root / "train", root / "test"
    splits = ["train", "test"] + (["val"] if val_fraction > 0 else [])
    if all_cached(root, "digits", splits, params):
        log.debug("digits shards cached in %s", root)
        return train_dir, test_dir
    # Imported only to write shards: scikit-learn takes about a second to import, which every
    # run on cached shards would pay in its driver.
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    # Quantise 0..16 to 0..255 for 8-bit PNGs; the transform maps back to 0..1.
    images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    targets = np.asarray(digits.target, dtype=np.int64)
    all_idx = np.arange(len(targets))
    train_idx, test_idx = train_test_split(
        all_idx, test_size=test_fraction, random_state=seed, stratify=targets
    )
    parts = {"train": train_idx, "test": test_idx}
    if val_fraction > 0:
        parts["train"], parts["val"] = train_test_split(
            train_idx, test_size=val_fraction, random_state=seed, stratify=targets[train_idx]
        )
    write_cached_sets(
        root,
        {
            split: clean_png_samples(images, targets, np.sort(idx), "digits")
            for split, idx in parts.items()
        },
        dataset="digits",
        classes=DIGITS_CLASSES,
        params=params,
        shard_size=shard_size,
    )
    sizes = " / ".join(f"{len(idx)} {split}" for split, idx in parts.items())
    log.info("digits: %s images written to %s", sizes, root)
    return train_dir, test_dir
