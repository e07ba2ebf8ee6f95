"""Clothing1M as distributed by its authors -> WebDataset shard sets.

``python -m distnoisy.data.clothing1m --root DIR --out DIR [--resize 256] [--shard-size N]
[--workers K]``

Reads the authors' layout (``DIR``)::

    category_names_eng.txt          14 class names, ids 0..13 in line order
    noisy_label_kv.txt              "images/<d>/<dd>/<name>.jpg <label>" per line
    clean_label_kv.txt              same format, the verified labels
    noisy_train_key_list.txt        1,000,000 image paths (labels from noisy_label_kv.txt)
    clean_train_key_list.txt        47,570   \\
    clean_val_key_list.txt          14,313    } labels from clean_label_kv.txt
    clean_test_key_list.txt         10,526   /
    images/<d>/<dd>/<name>.jpg

and writes one shard set per split under ``--out``: ``noisy_train/``, ``clean_train/``,
``clean_val/``, ``clean_test/`` (``distnoisy.data.shards`` format: ``__key__`` = global index in
the split's key list, ``cls`` = the split's own label, ``clean.cls`` where a verified label
exists, e.g. the ~25k noisy-train images that are also in ``clean_label_kv.txt``; the image path
is the sample's ``key``), plus ``clothing1m.json``: counts per split, classes, the size of the
noisy-train subset with clean labels and the noise rate measured on it, unreadable images, and the
conversion throughput. ``noisy_train/labels.parquet`` holds the clean label of every overlap
sample (``-1`` elsewhere).

``--resize 256`` stores every image with its shorter side scaled to 256 px (the protocol's first
step, so training decodes small JPEGs); without it the original bytes are copied. Conversion runs
``--workers`` processes, shows progress, and is resumable: re-running skips finished shards (and
splits), as long as the parameters are the same.

Training: ``python -m distnoisy.train --config distnoisy/configs/clothing1m_elr.yaml
data.root=OUT``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import sys
import time
from concurrent.futures import Executor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distnoisy.core.errors import DataError, DistnoisyError
from distnoisy.data.convert import (
    EncodeOptions,
    Item,
    SplitResult,
    convert_split,
    default_workers,
    make_pool,
)

log = logging.getLogger(__name__)

NUM_CLASSES = 14
CLASSES = (
    "T-Shirt",
    "Shirt",
    "Knitwear",
    "Chiffon",
    "Sweater",
    "Hoodie",
    "Windbreaker",
    "Jacket",
    "Downcoat",
    "Suit",
    "Shawl",
    "Dress",
    "Vest",
    "Underwear",
)
#: Clothing1M channel statistics used by DivideMix and ELR (docs/methods.md#elr-two-networks).
MEAN = (0.6959, 0.6537, 0.6371)
STD = (0.3113, 0.3192, 0.3214)
NAMES_FILE = "category_names_eng.txt"
NOISY_KV = "noisy_label_kv.txt"
CLEAN_KV = "clean_label_kv.txt"
#: split -> (key list file, label file it takes its labels from)
SPLITS = {
    "noisy_train": ("noisy_train_key_list.txt", NOISY_KV),
    "clean_train": ("clean_train_key_list.txt", CLEAN_KV),
    "clean_val": ("clean_val_key_list.txt", CLEAN_KV),
    "clean_test": ("clean_test_key_list.txt", CLEAN_KV),
}
SUMMARY_FILE = "clothing1m.json"
_LAYOUT = (
    "the Clothing1M layout needs category_names_eng.txt, noisy_label_kv.txt, clean_label_kv.txt, "
    "noisy_train_key_list.txt, clean_train_key_list.txt, clean_val_key_list.txt, "
    "clean_test_key_list.txt and images/ in --root"
)


def _need(root: Path, name: str) -> Path:
    path = root / name
    if not path.is_file():
        raise DataError(f"{path} is missing; {_LAYOUT}")
    return path


def _lines(path: Path) -> list[tuple[int, str]]:
    """(1-based line number, stripped text) of the non-blank lines of a text file."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise DataError(f"{path}: cannot read it ({exc})") from exc
    return [(i, s.strip()) for i, s in enumerate(text.splitlines(), 1) if s.strip()]


def read_class_names(root: Path) -> list[str]:
    """The 14 class names of ``category_names_eng.txt`` (id = line order)."""
    path = _need(root, NAMES_FILE)
    names = [s for _, s in _lines(path)]
    if len(names) != NUM_CLASSES:
        raise DataError(f"{path}: {len(names)} class names, Clothing1M has {NUM_CLASSES}")
    return names


def read_label_kv(path: Path) -> dict[str, int]:
    """``image path -> label`` from a ``*_label_kv.txt`` file.

    Raises
    ------
    DataError
        A malformed line or a label outside 0..13, naming the file and the line number.
    """
    out: dict[str, int] = {}
    for number, line in _lines(path):
        parts = line.split()
        if len(parts) != 2:
            raise DataError(
                f"{path} line {number}: expected 'images/.../name.jpg <label>', got {line[:80]!r}"
            )
        key, raw = parts
        try:
            label = int(raw)
        except ValueError:
            raise DataError(f"{path} line {number}: label {raw!r} is not an integer") from None
        if not 0 <= label < NUM_CLASSES:
            raise DataError(
                f"{path} line {number}: label {label} is outside 0..{NUM_CLASSES - 1} ({key})"
            )
        out[key] = label
    return out


def read_key_list(path: Path, labels: dict[str, int], label_file: str) -> list[str]:
    """Image paths of a ``*_key_list.txt`` file; each must have a label in ``label_file``."""
    keys: list[str] = []
    for number, line in _lines(path):
        key = line.split()[0]
        if key not in labels:
            raise DataError(f"{path} line {number}: {key} has no label in {label_file}")
        keys.append(key)
    return keys


@dataclass
class Layout:
    """The parsed annotation files of a Clothing1M root."""

    root: Path
    classes: list[str]
    noisy: dict[str, int]
    clean: dict[str, int]
    keys: dict[str, list[str]]  # split -> image paths

    def items(self, split: str) -> list[Item]:
        """The split's samples in key-list order (global index = line order)."""
        own = self.noisy if SPLITS[split][1] == NOISY_KV else self.clean
        return [
            Item(i, str(self.root / key), own[key], self.clean.get(key), key)
            for i, key in enumerate(self.keys[split])
        ]


def read_layout(root: Path | str, splits: tuple[str, ...] = tuple(SPLITS)) -> Layout:
    """Parse and check every annotation file of a Clothing1M root (no image is opened).

    Raises
    ------
    DataError
        A missing file (naming it and the layout), a malformed line or a label outside 0..13
        (naming the file and line), or a listed image without a label.
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"--root {root} is not a directory; {_LAYOUT}")
    classes = read_class_names(root)
    for split in splits:  # all files first: a missing one is reported before hours of parsing
        _need(root, SPLITS[split][0])
    noisy = read_label_kv(_need(root, NOISY_KV))
    clean = read_label_kv(_need(root, CLEAN_KV))
    if not (root / "images").is_dir():
        raise DataError(f"{root / 'images'} is missing; {_LAYOUT}")
    keys = {}
    for split in splits:
        list_file, label_file = SPLITS[split]
        keys[split] = read_key_list(
            root / list_file, noisy if label_file == NOISY_KV else clean, label_file
        )
    return Layout(root, classes, noisy, clean, keys)


def convert(
    root: Path | str,
    out: Path | str,
    *,
    resize: int | None = None,
    shard_size: int = 1000,
    workers: int = 1,
    quality: int = 90,
    splits: tuple[str, ...] = tuple(SPLITS),
) -> dict:
    """Convert a Clothing1M root to shard sets under ``out``; returns ``clothing1m.json``."""
    t0 = time.perf_counter()
    layout = read_layout(root, splits)
    out = Path(out).expanduser()
    opts = EncodeOptions(resize=resize, quality=quality, image_ext="jpg")
    results: dict[str, SplitResult] = {}
    pool = make_pool(workers)
    try:
        for split in splits:
            results[split] = _convert_one(layout, split, out, opts, shard_size, pool)
    finally:
        if pool is not None:
            pool.shutdown()
    doc = _summary(layout, results, time.perf_counter() - t0, resize)
    old = out / SUMMARY_FILE
    if doc["converted_images"] == 0 and old.is_file():  # a no-op re-run keeps the measured rate
        with contextlib.suppress(ValueError, KeyError):
            doc["conversion_images_per_s"] = json.loads(old.read_text())["conversion_images_per_s"]
    old.write_text(json.dumps(doc, indent=1))
    return doc


def _convert_one(
    layout: Layout,
    split: str,
    out: Path,
    opts: EncodeOptions,
    shard_size: int,
    pool: Executor | None,
) -> SplitResult:
    items = layout.items(split)
    params = {
        "source": "clothing1m",
        "split": split,
        "num_samples": len(items),
        "resize": opts.resize,
        "quality": opts.quality if opts.resize else None,
        "shard_size": shard_size,
    }
    return convert_split(
        items,
        out / split,
        split=split,
        classes=layout.classes,
        dataset="clothing1m",
        shard_size=shard_size,
        opts=opts,
        params=params,
        pool=pool,
    )


def _summary(layout: Layout, results: dict[str, SplitResult], seconds: float, resize: int | None):
    doc: dict = {
        "dataset": "clothing1m",
        "classes": layout.classes,
        "resize": resize,
        "splits": {},
    }
    for split, r in results.items():
        doc["splits"][split] = {
            "num_samples": r.manifest.num_samples,
            "num_shards": len(r.manifest.shards),
            "num_clean_labels": r.manifest.num_clean_labels,
            "converted_now": r.converted,
            "bad_images": [{"key": k, "problem": p} for k, p in r.problems],
        }
    if "noisy_train" in layout.keys:
        keys = layout.keys["noisy_train"]
        both = [k for k in keys if k in layout.clean]
        noisy = np.array([layout.noisy[k] for k in both], dtype=np.int64)
        clean = np.array([layout.clean[k] for k in both], dtype=np.int64)
        doc["noisy_train_with_clean_label"] = len(both)
        doc["noise_rate_on_overlap"] = float((noisy != clean).mean()) if len(both) else None
    converted = sum(r.converted for r in results.values())
    busy = sum(r.seconds for r in results.values() if r.converted)
    doc["converted_images"] = converted
    doc["conversion_images_per_s"] = converted / busy if busy > 0 else None
    doc["seconds"] = seconds
    return doc


# --------------------------------------------------------------------------------------------
# A miniature Clothing1M tree (tests, benchmarks, trying the pipeline without the data set)


def make_miniature(
    root: Path | str,
    *,
    num_noisy: int = 280,
    num_clean_train: int = 28,
    num_val: int = 56,
    num_test: int = 56,
    overlap: int = 56,
    noise_rate: float = 0.4,
    size: int = 48,
    seed: int = 0,
) -> Path:
    """Write a small tree in the exact Clothing1M layout with real JPEGs (learnable classes).

    Each class has its own colour and stripe direction (with pixel noise), so a small model
    learns it in an epoch or two. ``overlap`` of the noisy-train images also get a clean label;
    noisy labels are flipped to a random other class with probability ``noise_rate``. Image
    sizes vary around ``size`` (non-square), as real photos do.
    """
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / NAMES_FILE).write_text("\n".join(CLASSES) + "\n")
    colours = rng.integers(30, 226, size=(NUM_CLASSES, 3))
    total = num_noisy + num_clean_train + num_val + num_test
    true = np.arange(total) % NUM_CLASSES
    rng.shuffle(true)
    keys: list[str] = []
    for i in range(total):
        c = int(true[i])
        h, w = size + int(rng.integers(0, size // 2)), size + int(rng.integers(0, size // 2))
        yy, xx = np.mgrid[0:h, 0:w]
        stripes = ((xx if c % 2 else yy) // (2 + c // 2)) % 2
        img = colours[c][None, None, :] * (0.6 + 0.4 * stripes[..., None])
        img = np.clip(img + rng.normal(0, 12, img.shape), 0, 255).astype(np.uint8)
        key = f"images/{i % 10}/{i % 100:02d}/{i:06d}_{seed}.jpg"
        (root / key).parent.mkdir(parents=True, exist_ok=True)
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=90)
        (root / key).write_bytes(buf.getvalue())
        keys.append(key)
    flip = rng.random(total) < noise_rate
    other = (true + rng.integers(1, NUM_CLASSES, total)) % NUM_CLASSES
    noisy_label = np.where(flip, other, true)
    a, b, c = num_noisy, num_noisy + num_clean_train, num_noisy + num_clean_train + num_val
    noisy_keys, clean_train, val, test = keys[:a], keys[a:b], keys[b:c], keys[c:]
    with_clean = set(noisy_keys[:overlap]) | set(keys[a:])
    (root / NOISY_KV).write_text("".join(f"{k} {noisy_label[i]}\n" for i, k in enumerate(keys[:a])))
    (root / CLEAN_KV).write_text(
        "".join(f"{k} {true[i]}\n" for i, k in enumerate(keys) if k in with_clean)
    )
    for split, lst in zip(SPLITS, (noisy_keys, clean_train, val, test), strict=True):
        (root / SPLITS[split][0]).write_text("".join(f"{k}\n" for k in lst))
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distnoisy.data.clothing1m",
        description="Convert Clothing1M (the authors' layout) to WebDataset shard sets.",
    )
    parser.add_argument("--root", required=True, help="the Clothing1M directory")
    parser.add_argument("--out", required=True, help="output directory (one shard set per split)")
    parser.add_argument("--shard-size", type=int, default=1000, help="images per shard")
    parser.add_argument("--workers", type=int, default=default_workers(), help="processes")
    parser.add_argument(
        "--resize", type=int, default=None, help="store with the shorter side scaled to this"
    )
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality with --resize")
    parser.add_argument(
        "--splits", default=",".join(SPLITS), help=f"comma-separated subset of {','.join(SPLITS)}"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    splits = tuple(s for s in args.splits.split(",") if s)
    try:
        unknown = [s for s in splits if s not in SPLITS]
        if unknown:
            raise DataError(f"unknown split(s) {unknown}; choose from {', '.join(SPLITS)}")
        doc = convert(
            args.root,
            args.out,
            resize=args.resize,
            shard_size=args.shard_size,
            workers=args.workers,
            quality=args.quality,
            splits=splits,
        )
    except DistnoisyError as e:
        print(f"distnoisy: error: {e}", file=sys.stderr)
        return 2
    for split, s in doc["splits"].items():
        bad = f", {len(s['bad_images'])} unreadable images (kept, skipped in training)"
        print(
            f"{split}: {s['num_samples']} images in {s['num_shards']} shards"
            f"{bad if s['bad_images'] else ''}"
        )
    if doc.get("noise_rate_on_overlap") is not None:
        print(
            f"noisy_train: {doc['noisy_train_with_clean_label']} images with a clean label, noise "
            f"rate on them {100 * doc['noise_rate_on_overlap']:.1f}%"
        )
    rate = doc.get("conversion_images_per_s")
    print(f"wrote {Path(args.out) / SUMMARY_FILE}" + (f" ({rate:.0f} images/s)" if rate else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
