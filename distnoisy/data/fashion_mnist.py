"""Fashion-MNIST (70,000 real 28x28 grey-scale clothing images, 10 classes) as shard sets.

``python -m distnoisy.data.fashion_mnist --root DIR --out DIR [--train-size N] [--val-fraction F]``

The source is the four idx files as published (``train-images-idx3-ubyte``,
``train-labels-idx1-ubyte``, ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each
gzipped or not); the Debian package ``dataset-fashion-mnist`` installs them in
:data:`DEFAULT_SOURCE`. ``python -m distnoisy.train data.name=fashion_mnist`` converts them on
first use into a cache (:func:`prepare_fashion_mnist`) and reuses it while the source files
and parameters are unchanged; the command above writes the same sets to ``OUT`` (train with
``data.name=fashion_mnist data.urls=OUT``). Splits: ``train`` (60,000, or a class-balanced
subset), optionally ``val`` (a clean, stratified hold-out of those) and ``test`` (the official
10,000, always whole). Keys are ``train/{i}`` and ``test/{i}``, ``i`` the image's position in
its idx file.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import logging
import sys
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from distnoisy.core.errors import ConfigError, DataError, DistnoisyError
from distnoisy.data.cache import all_cached, clean_png_samples, write_cached_sets

log = logging.getLogger(__name__)

DEFAULT_SOURCE = Path("/usr/share/datasets/fashion-mnist")
# The official class names, in label order (Xiao et al., 2017, the dataset's README).
CLASSES = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
]
# Mean and std of all 60,000 training images on the 0..1 pixel scale: mean 0.286041, std
# 0.353024 (computed once with numpy, float64, over every pixel of train-images-idx3-ubyte).
MEAN = 0.2860
STD = 0.3530
# idx file base names per split: (images, labels).
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
IMAGE_SIZE = 28
# Bump when the way the shards are made changes, so old caches are rebuilt.
_VERSION = 1
# The idx format's type byte -> element type (multi-byte types are big-endian).
_IDX_TYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
_GZIP_MAGIC = b"\x1f\x8b"


def _file_bytes(path: Path) -> bytes:
    """The contents of ``path``, decompressed when it is gzipped (told by content, not name)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    if data[:2] != _GZIP_MAGIC:
        return data
    try:
        return gzip.decompress(data)
    except (OSError, EOFError, zlib.error) as exc:
        raise DataError(f"{path}: damaged gzip data ({exc})") from None


def read_idx(path: Path | str) -> np.ndarray:
    """Read one idx file (the MNIST format), gzipped or not.

    Parameters
    ----------
    path
        The file. Layout: two zero bytes, a type byte (0x08 uint8, 0x09 int8, 0x0B int16,
        0x0C int32, 0x0D float32, 0x0E float64), the number of dimensions, one big-endian
        uint32 per dimension, then the elements, big-endian, row-major.

    Returns
    -------
    numpy.ndarray
        A writable array of that shape, in the native byte order.

    Raises
    ------
    DataError
        One line naming the file: unreadable, damaged gzip data, a wrong magic number, an
        unknown type byte, or a data length that disagrees with the dimensions (truncated or
        padded).
    """
    path = Path(path)
    data = _file_bytes(path)
    if len(data) < 4 or data[:2] != b"\0\0" or data[2] not in _IDX_TYPES or data[3] == 0:
        raise DataError(
            f"{path}: not an idx file (magic number {data[:4].hex() or 'missing'}; expected "
            "00 00, a type byte 08/09/0b/0c/0d/0e and a dimension count)"
        )
    dtype, ndim = np.dtype(_IDX_TYPES[data[2]]), data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: truncated idx header ({len(data)} bytes, {header} needed)")
    shape = tuple(int(d) for d in np.frombuffer(data, ">u4", count=ndim, offset=4))
    expected = header + int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(data) != expected:
        raise DataError(
            f"{path}: {len(data) - header} data bytes but its dimensions {shape} need "
            f"{expected - header} (truncated or padded)"
        )
    array = np.frombuffer(data, dtype, offset=header).reshape(shape)
    return array.astype(dtype.newbyteorder("="))  # a writable copy in native order


def find_files(source: Path | str, hint: str = "data.root=DIR") -> dict[str, tuple[Path, Path]]:
    """The idx files of each split in ``source``: ``{"train": (images, labels), "test": ...}``.

    Each file may be gzipped (``NAME.gz``, preferred when both exist) or not (``NAME``).
    ``hint`` names the option that points at another directory, for the error message.

    Raises
    ------
    DataError
        One line listing the missing files and how to get them.
    """
    source = Path(source).expanduser()
    found: dict[str, Path] = {}
    missing: list[str] = []
    for name in (n for pair in FILES.values() for n in pair):
        path = next((p for p in (source / f"{name}.gz", source / name) if p.is_file()), None)
        if path is None:
            missing.append(f"{name}[.gz]")
        else:
            found[name] = path
    if missing:
        raise DataError(
            f"Fashion-MNIST idx files not found in {source} ({', '.join(missing)}); install "
            f"them with 'apt-get install dataset-fashion-mnist' or pass {hint}"
        )
    return {split: (found[images], found[labels]) for split, (images, labels) in FILES.items()}


def read_split(images_path: Path, labels_path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images (uint8, ``N x 28 x 28``) and labels (int64, ``N``, in 0..9) of one split.

    Raises
    ------
    DataError
        One line naming the file whose type, shape, count or labels are wrong.
    """
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.dtype != np.uint8 or images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise DataError(
            f"{images_path}: expected uint8 images of shape (N, {IMAGE_SIZE}, {IMAGE_SIZE}), "
            f"found {images.dtype} {images.shape}"
        )
    if labels.dtype != np.uint8 or labels.ndim != 1:
        raise DataError(f"{labels_path}: expected a 1-D uint8 label array, found {labels.shape}")
    if len(labels) != len(images):
        raise DataError(
            f"{labels_path}: {len(labels)} labels but {images_path.name} holds {len(images)} images"
        )
    bad = np.flatnonzero(labels >= len(CLASSES))
    if len(bad):
        raise DataError(f"{labels_path}: label {labels[bad[0]]} of image {bad[0]} is not in 0..9")
    return images, labels.astype(np.int64)


def balanced_subset(labels: np.ndarray, size: int, seed: int) -> np.ndarray:
    """Sorted indices of a class-balanced random subset of ``size`` samples (0 = all).

    Each class gets ``size // C`` samples; the ``size % C`` left over go one each to classes
    drawn at random. Depends only on ``labels``, ``size`` and ``seed``.

    Raises
    ------
    ConfigError
        ``size`` is below C or a class has too few samples.
    """
    if size == 0:
        return np.arange(len(labels))
    num_classes = len(CLASSES)
    if size < num_classes:
        raise ConfigError(
            f"data.train_size={size}: give 0 (all images) or at least {num_classes} (one per class)"
        )
    rng = np.random.default_rng(seed)
    want = np.full(num_classes, size // num_classes)
    want[rng.choice(num_classes, size % num_classes, replace=False)] += 1
    chosen = []
    for c in range(num_classes):
        members = np.flatnonzero(labels == c)
        if want[c] > len(members):
            raise ConfigError(
                f"data.train_size={size} needs {want[c]} images of class {CLASSES[c]!r}, the "
                f"training set has {len(members)}"
            )
        chosen.append(rng.permutation(members)[: want[c]])
    return np.sort(np.concatenate(chosen))


def _split_val(labels: np.ndarray, idx: np.ndarray, fraction: float, seed: int) -> tuple:
    """(train, val) indices: a stratified hold-out of ``fraction`` of ``idx``."""
    from sklearn.model_selection import train_test_split

    try:
        train, val = train_test_split(
            idx, test_size=fraction, random_state=seed, stratify=labels[idx]
        )
    except ValueError as exc:  # too few images per class for a stratified split
        raise ConfigError(f"data.val_fraction={fraction} of {len(idx)} images: {exc}") from None
    return np.sort(train), np.sort(val)


def _params(
    files: dict[str, tuple[Path, Path]],
    train_size: int,
    val_fraction: float,
    seed: int,
    shard_size: int,
) -> dict[str, Any]:
    # The files' digest, not their path: a cache made from other idx files (MNIST has the same
    # names and format) is rebuilt, a copy of the same files elsewhere is reused.
    digest = hashlib.sha256()
    for split in FILES:
        for path in files[split]:
            try:
                digest.update(path.read_bytes())
            except OSError as exc:
                raise DataError(f"cannot read {path}: {exc.strerror or exc}") from None
    params: dict[str, Any] = {
        "source": "fashion-mnist idx",
        "version": _VERSION,
        "sha256": digest.hexdigest(),
        "train_size": int(train_size),
        "seed": int(seed),
        "shard_size": int(shard_size),
    }
    if val_fraction > 0:
        params["val_fraction"] = float(val_fraction)
    return params


def prepare_fashion_mnist(
    root: Path | str,
    *,
    source: Path | str = DEFAULT_SOURCE,
    train_size: int = 0,
    val_fraction: float = 0.0,
    seed: int = 0,
    shard_size: int = 256,
    hint: str = "data.root=DIR",
) -> tuple[Path, Path]:
    """Write (or reuse) the Fashion-MNIST train/test (and optional val) shard sets under ``root``.

    Parameters
    ----------
    root
        Output directory; the sets are ``root/train``, ``root/test`` and, with a validation
        fraction, ``root/val``.
    source
        Directory holding the four idx files (see :func:`find_files`).
    train_size
        0 = all 60,000 training images; N = a class-balanced random subset of N of them
        (:func:`balanced_subset`), for cheap runs. The test set is always whole.
    val_fraction
        Fraction of the (subset of) training images held out, stratified, as a clean
        validation split; 0 = none.
    seed
        Seed of the subset and of the validation split.
    shard_size
        Samples per shard.
    hint
        How the caller points at another source directory (in the missing-files error).

    Returns
    -------
    (Path, Path)
        The train and test shard directories.

    Notes
    -----
    Cached like :func:`distnoisy.data.digits.prepare_digits`: nothing is written when every
    split's manifest records the same parameters (including the SHA-256 of the source files);
    splits are built in a temporary directory and renamed into place, so a failure leaves no
    half-written set and concurrent callers end with one valid set.
    """
    if train_size < 0:
        raise ConfigError(f"data.train_size must be >= 0 (0 = all), got {train_size}")
    if not 0.0 <= val_fraction < 1.0:
        raise ConfigError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    if shard_size < 1:
        raise ConfigError(f"data.shard_size must be at least 1, got {shard_size}")
    root = Path(root).expanduser()
    files = find_files(source, hint)
    params = _params(files, train_size, val_fraction, seed, shard_size)
    splits = ["train", "test"] + (["val"] if val_fraction > 0 else [])
    if all_cached(root, "fashion_mnist", splits, params):
        log.debug("Fashion-MNIST shards cached in %s", root)
        return root / "train", root / "test"

    train_images, train_labels = read_split(*files["train"])
    test_images, test_labels = read_split(*files["test"])
    train_idx = balanced_subset(train_labels, train_size, seed)
    parts = {"train": clean_png_samples(train_images, train_labels, train_idx, "train")}
    sizes = {"train": len(train_idx), "test": len(test_labels)}
    if val_fraction > 0:
        train_idx, val_idx = _split_val(train_labels, train_idx, val_fraction, seed)
        parts["train"] = clean_png_samples(train_images, train_labels, train_idx, "train")
        parts["val"] = clean_png_samples(train_images, train_labels, val_idx, "train")
        sizes.update(train=len(train_idx), val=len(val_idx))
    parts["test"] = clean_png_samples(test_images, test_labels, np.arange(len(test_labels)), "test")
    write_cached_sets(
        root,
        parts,
        dataset="fashion_mnist",
        classes=CLASSES,
        params=params,
        shard_size=shard_size,
    )
    log.info(
        "Fashion-MNIST: %s images written to %s",
        " / ".join(f"{n} {split}" for split, n in sizes.items()),
        root,
    )
    return root / "train", root / "test"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distnoisy.data.fashion_mnist")
    parser.add_argument(
        "--root", default=str(DEFAULT_SOURCE), help=f"folder with the idx files ({DEFAULT_SOURCE})"
    )
    parser.add_argument("--out", required=True)
    parser.add_argument("--train-size", type=int, default=0, help="0 = all 60,000")
    parser.add_argument("--val-fraction", type=float, default=0.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--shard-size", type=int, default=5000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        prepare_fashion_mnist(
            args.out,
            source=args.root,
            train_size=args.train_size,
            val_fraction=args.val_fraction,
            seed=args.seed,
            shard_size=args.shard_size,
            hint="--root DIR",
        )
    except DistnoisyError as e:
        print(f"distnoisy: error: {e}", file=sys.stderr)
        return 2
    print(f"Fashion-MNIST shards in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
