"""Image folders (``root/<class>/*.jpg``) -> a WebDataset shard set.

``python -m distnoisy.data.folder --root DIR --out DIR [--split train] [--resize N]``

Classes are the sub-directory names in sorted order (label = position, as torchvision's
``ImageFolder``); images are the files with an image extension below each, listed in sorted
order. Convert a train and a test folder into ``OUT/train`` and ``OUT/test`` (and optionally
``OUT/val``) and train with ``data.name=shards data.urls=OUT``.

Sample order. A folder lists its images class by class, and shards written in that order hold one
or two classes each: a stream that reads a few shards at a time then serves batches of one class.
So the converter places the images into shards in a seeded random order (``--seed``, default 0,
recorded in the manifest): the global index of an image is its position in that shuffled
listing, its ``key`` (recorded with every sample, in ``labels.parquet`` and in the label-issue
table) is its path relative to ``--root``. The same folder and seed give the same indices.
``--keep-order`` keeps the listing order (index = position in the sorted listing), for sets
that are already mixed or must keep that numbering; the training stream then has to mix them
(``data.open_shards``), and the loop warns when it cannot.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from distnoisy.core.errors import DataError, DistnoisyError
from distnoisy.data.convert import (
    EncodeOptions,
    Item,
    convert_split,
    default_workers,
    make_pool,
)
from distnoisy.data.shards import Manifest

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def shuffled(items: list[Item], seed: int) -> list[Item]:
    """``items`` in a seeded random order, re-indexed 0..N-1 (labels and keys travel along)."""
    order = np.random.default_rng(seed).permutation(len(items))
    return [
        Item(new, items[old].source, items[old].label, items[old].clean_label, items[old].key)
        for new, old in enumerate(order.tolist())
    ]


def list_folder(root: Path | str) -> tuple[list[str], list[Item]]:
    """Class names and items of an image folder (``DataError`` when it holds no images)."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"--root {root} is not a directory (expected root/<class>/<image>)")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    items: list[Item] = []
    for label, name in enumerate(classes):
        for path in sorted((root / name).rglob("*")):
            if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
                rel = str(path.relative_to(root))
                items.append(Item(len(items), str(path), label, None, rel))
    if not items:
        raise DataError(f"{root} holds no images in class folders (root/<class>/*.jpg)")
    return classes, items


def convert(
    root: Path | str,
    out: Path | str,
    *,
    split: str = "train",
    resize: int | None = None,
    shard_size: int = 1000,
    workers: int = 1,
    quality: int = 90,
    clean: bool = False,
    seed: int | None = 0,
) -> Manifest:
    """Convert one image folder into the shard set ``out/split``.

    Without ``resize`` the files' bytes are stored as they are (JPEG or PNG, decoded by content
    when training; the member is named ``jpg``). ``clean=True`` records the folder labels as
    verified clean labels too (a test set). ``seed`` shuffles the images into the shards (see
    the module docstring); ``None`` keeps the sorted listing order.
    """
    classes, items = list_folder(root)
    if clean:
        items = [Item(i.index, i.source, i.label, i.label, i.key) for i in items]
    if seed is not None:
        items = shuffled(items, seed)
    params = {
        "source": "folder",
        "split": split,
        "num_samples": len(items),
        "resize": resize,
        "quality": quality if resize else None,
        "shard_size": shard_size,
        "order": "listing" if seed is None else f"shuffled, seed {seed}",
    }
    pool = make_pool(workers)
    try:
        result = convert_split(
            items,
            Path(out).expanduser() / split,
            split=split,
            classes=classes,
            dataset=Path(root).name,
            shard_size=shard_size,
            opts=EncodeOptions(resize=resize, quality=quality, image_ext="jpg"),
            params=params,
            pool=pool,
        )
    finally:
        if pool is not None:
            pool.shutdown()
    if result.problems:
        log.warning(
            "%s: %d of %d images cannot be decoded (stored; training skips them): %s%s",
            split,
            len(result.problems),
            len(items),
            ", ".join(k for k, _ in result.problems[:5]),
            ", ..." if len(result.problems) > 5 else "",
        )
    return result.manifest


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m distnoisy.data.folder")
    parser.add_argument("--root", required=True, help="root/<class>/<image>")
    parser.add_argument("--out", required=True)
    parser.add_argument("--split", default="train", help="train, val or test")
    parser.add_argument("--resize", type=int, default=None)
    parser.add_argument("--shard-size", type=int, default=1000)
    parser.add_argument("--workers", type=int, default=default_workers())
    parser.add_argument("--clean", action="store_true", help="labels are verified (test sets)")
    parser.add_argument(
        "--seed", type=int, default=0, help="seed of the shuffled order of images in the shards"
    )
    parser.add_argument(
        "--keep-order",
        action="store_true",
        help="write images in listing order (class by class) instead of a shuffled order",
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        m = convert(
            args.root,
            args.out,
            split=args.split,
            resize=args.resize,
            shard_size=args.shard_size,
            workers=args.workers,
            clean=args.clean,
            seed=None if args.keep_order else args.seed,
        )
    except DistnoisyError as e:
        print(f"distnoisy: error: {e}", file=sys.stderr)
        return 2
    print(f"{m.split}: {m.num_samples} images, {m.num_classes} classes in {m.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
