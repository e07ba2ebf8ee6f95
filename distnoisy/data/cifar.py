"""CIFAR-10/100 (the standard python batches) -> WebDataset shard sets.

``python -m distnoisy.data.cifar --root DIR --out DIR --name cifar10|cifar100``

``DIR`` holds ``cifar-10-batches-py/`` (``data_batch_1..5``, ``test_batch``, ``batches.meta``)
or ``cifar-100-python/`` (``train``, ``test``, ``meta``; fine labels), as downloaded from the
CIFAR page. Writes ``OUT/train`` (50,000) and ``OUT/test`` (10,000) as PNG shard sets, index =
position in the batches (the order CIFAR-10N/100N label files use). Train with
``data.name=cifar10 data.root=OUT``; human noisy labels (CIFAR-10N ``aggre_label``,
``worse_label``, ..., or CIFAR-100N ``noisy_label``) with ``noise.kind=cifar_n
noise.cifar_n=aggre noise.file=CIFAR-10_human.pt`` (:mod:`distnoisy.data.cifar_n`), or as
``noise.kind=file noise.file=LABELS`` (``.npy``/``.csv``/``.parquet`` keyed by the same index,
see :func:`write_human_label_file`). ``--coarse`` labels CIFAR-100 with its 20 superclasses
(for CIFAR-100N's ``noisy_coarse`` labels).

The batches are pickles (the only format CIFAR is distributed in). They are read with a
restricted unpickler that accepts only the numpy-array globals a CIFAR batch needs, so a
tampered file cannot run code; the shards never hold pickles.
"""

from __future__ import annotations

import argparse
import io
import logging
import pickle
import sys
from pathlib import Path

import numpy as np

from distnoisy.core.errors import DataError, DistnoisyError
from distnoisy.data.convert import EncodeOptions, Item, convert_split, make_pool

log = logging.getLogger(__name__)

MEAN = {"cifar10": (0.4914, 0.4822, 0.4465), "cifar100": (0.5071, 0.4865, 0.4409)}
STD = {"cifar10": (0.2023, 0.1994, 0.2010), "cifar100": (0.2673, 0.2564, 0.2762)}
_FOLDER = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
_TRAIN = {"cifar10": [f"data_batch_{i}" for i in range(1, 6)], "cifar100": ["train"]}
_TEST = {"cifar10": ["test_batch"], "cifar100": ["test"]}
_META = {"cifar10": ("batches.meta", b"label_names"), "cifar100": ("meta", b"fine_label_names")}
_LABELS = {"cifar10": b"labels", "cifar100": b"fine_labels"}


# The only globals a CIFAR batch needs: numpy array reconstruction (old and numpy-2 paths).
_ALLOWED_GLOBALS = {
    (module, name)
    for module in ("numpy.core.multiarray", "numpy._core.multiarray")
    for name in ("_reconstruct", "scalar")
} | {("numpy", "ndarray"), ("numpy", "dtype")}


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, bytes, numbers and numpy arrays, and nothing else: a file that
    names any other global (the way a malicious pickle runs code) is refused."""

    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        raise DataError(
            f"refusing to unpickle {module}.{name}: a CIFAR batch holds only arrays, lists and "
            "bytes; this file is not an original CIFAR batch"
        )


def _unpickle(path: Path) -> dict:
    if not path.is_file():
        raise DataError(
            f"{path} is missing; the CIFAR python batches (cifar-10-python.tar.gz / "
            "cifar-100-python.tar.gz) must be extracted into --root"
        )
    with open(path, "rb") as f:
        try:
            return _BatchUnpickler(f, encoding="bytes").load()
        except DataError as exc:
            raise DataError(f"{path}: {exc}") from None


def read_cifar(
    root: Path | str, name: str, coarse: bool = False
) -> tuple[list[str], dict[str, tuple]]:
    """Class names and ``{"train": (uint8 N x 32 x 32 x 3, labels), "test": ...}``.

    ``coarse=True`` (CIFAR-100 only) gives the 20 superclasses instead of the 100 classes.
    """
    if name not in _FOLDER:
        raise DataError(f"unknown CIFAR name {name!r}; choose cifar10 or cifar100")
    if coarse and name != "cifar100":
        raise DataError("--coarse (the 20 superclasses) applies to CIFAR-100 only")
    base = Path(root).expanduser()
    if (base / _FOLDER[name]).is_dir():
        base = base / _FOLDER[name]
    meta_file, meta_key = _META[name]
    label_key = _LABELS[name]
    if coarse:
        meta_key, label_key = b"coarse_label_names", b"coarse_labels"
    classes = [c.decode() for c in _unpickle(base / meta_file)[meta_key]]
    out = {}
    for split, files in (("train", _TRAIN[name]), ("test", _TEST[name])):
        images, labels = [], []
        for fname in files:
            d = _unpickle(base / fname)
            images.append(np.asarray(d[b"data"], dtype=np.uint8).reshape(-1, 3, 32, 32))
            labels.extend(int(x) for x in d[label_key])
        lab = np.asarray(labels, dtype=np.int64)
        bad = np.flatnonzero((lab < 0) | (lab >= len(classes)))
        if len(bad):
            raise DataError(f"{base}: {split} image {bad[0]} has label {lab[bad[0]]}")
        out[split] = (np.concatenate(images).transpose(0, 2, 3, 1), lab)
    return classes, out


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


def convert(
    root: Path | str,
    out: Path | str,
    name: str,
    *,
    shard_size: int = 5000,
    workers: int = 1,
    coarse: bool = False,
) -> dict[str, int]:
    """Convert CIFAR-10/100 python batches to ``out/train`` and ``out/test``; returns counts.

    ``coarse=True``: CIFAR-100 labelled with its 20 superclasses (for CIFAR-100N's
    ``noisy_coarse`` labels, ``noise.cifar_n=noisy_coarse``).
    """
    classes, data = read_cifar(root, name, coarse)
    out = Path(out).expanduser()
    opts = EncodeOptions(image_ext="png")
    pool = make_pool(workers)
    counts = {}
    try:
        for split, (images, labels) in data.items():
            items = [
                Item(i, _png(images[i]), int(labels[i]), int(labels[i]), f"{split}/{i}")
                for i in range(len(labels))
            ]
            params = {"source": name, "split": split, "num_samples": len(items)}
            if coarse:
                params["labels"] = "coarse"
            params["shard_size"] = shard_size
            r = convert_split(
                items,
                out / split,
                split=split,
                classes=classes,
                dataset=name,
                shard_size=shard_size,
                opts=opts,
                params=params,
                pool=pool,
            )
            counts[split] = r.manifest.num_samples
    finally:
        if pool is not None:
            pool.shutdown()
    return counts


def write_human_label_file(
    labels: np.ndarray, clean: np.ndarray | None, path: Path | str, source: str = "human"
) -> Path:
    """Save human noisy labels (e.g. CIFAR-10N's ``worse_label``) as a ``noise.file`` (Parquet).

    ``labels[i]`` is the label of training image ``i`` in batch order (the order of the
    CIFAR-10N/100N arrays). ``clean`` (the CIFAR labels; optional) is stored beside them. A plain
    ``.npy`` array in that order also works as ``noise.file`` directly; the run then measures the
    noise against the shards' own (clean) CIFAR labels.
    """
    from distnoisy.data.noise import save_label_file

    path = Path(path)
    save_label_file(path, np.asarray(labels), clean, {"kind": "file", "source": source})
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distnoisy.data.cifar")
    parser.add_argument("--root", required=True, help="folder with the extracted python batches")
    parser.add_argument("--out", required=True)
    parser.add_argument("--name", choices=sorted(_FOLDER), default="cifar10")
    parser.add_argument("--shard-size", type=int, default=5000)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument(
        "--coarse", action="store_true", help="CIFAR-100: label with the 20 superclasses"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        counts = convert(
            args.root,
            args.out,
            args.name,
            shard_size=args.shard_size,
            workers=args.workers,
            coarse=args.coarse,
        )
    except DistnoisyError as e:
        print(f"distnoisy: error: {e}", file=sys.stderr)
        return 2
    print(", ".join(f"{k}: {v} images" for k, v in counts.items()) + f" in {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
