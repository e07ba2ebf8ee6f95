"""The image folder that ``python -m distnoisy.bench pipeline`` starts from: real images, any N.

``N`` training images are Fashion-MNIST training images (60,000 of them, drawn without
replacement up to 60,000 and with replacement beyond), each under its own random shift (up to
3 px in each direction, the uncovered border black: a crop of the shifted image), a horizontal
flip with probability 1/2 and a brightness scale in [0.8, 1.2], encoded as 28x28 grey PNG. The
validation and test images are Fashion-MNIST *test* images (two disjoint halves, un-augmented,
``min(5000, max(500, N // 20))`` each), so no evaluation image shares a source with a training
image.

The folder is laid out as a user's data arrives, ``ROOT/<split>/<class>/<block>/<id>.png``
(``<block>`` = ``id // 1000``, so no directory holds more than 1,000 files), for the project's
own converter (``python -m distnoisy.data.folder``). Generation is split into blocks of
:data:`BLOCK` images, each drawn from its own seeded generator, so the images do not depend on
the number of processes.
"""

from __future__ import annotations

import functools
import io
import json
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from distnoisy.data import fashion_mnist

#: Images per generation task (and per seeded generator).
BLOCK = 10_000
#: Largest shift in pixels, in each direction.
MAX_SHIFT = 3
SPLITS = ("train", "val", "test")


@dataclass(frozen=True)
class FolderSpec:
    """What to generate: ``n`` training images, ``n_eval`` validation and test images each."""

    root: str
    source: str
    n: int
    n_eval: int
    seed: int


def eval_size(n: int) -> int:
    """Validation (and test) images for ``n`` training images."""
    return min(5000, max(500, n // 20))


def class_dirs() -> list[str]:
    """Folder names of the classes in label order (``/`` is not allowed in a name)."""
    return [f"{i}-{name.replace('/', '-')}" for i, name in enumerate(fashion_mnist.CLASSES)]


@functools.lru_cache(maxsize=1)
def _load(source: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    files = fashion_mnist.find_files(source, hint="--fashion-mnist DIR")
    return {split: fashion_mnist.read_split(*paths) for split, paths in files.items()}


def _png(image: np.ndarray) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(image, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _augment(image: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """A random shift (black border), flip and brightness scale of one 28x28 image."""
    dy, dx = rng.integers(-MAX_SHIFT, MAX_SHIFT + 1, 2)
    out = np.zeros_like(image)
    h, w = image.shape
    out[max(dy, 0) : h + min(dy, 0), max(dx, 0) : w + min(dx, 0)] = image[
        max(-dy, 0) : h + min(-dy, 0), max(-dx, 0) : w + min(-dx, 0)
    ]
    if rng.random() < 0.5:
        out = out[:, ::-1]
    scale = rng.uniform(0.8, 1.2)
    return np.clip(out.astype(np.float32) * scale, 0, 255).astype(np.uint8)


def _path(root: Path, split: str, i: int, label: int) -> Path:
    return root / split / class_dirs()[label] / f"{i // 1000:04d}" / f"{i:07d}.png"


def _write(root: Path, split: str, i: int, label: int, image: np.ndarray) -> None:
    path = _path(root, split, i, label)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(_png(image))


def _train_block(spec: FolderSpec, block: int) -> int:
    """Write training images ``[block * BLOCK, ...)``; returns how many. A block whose last
    image exists was written whole by an earlier, interrupted call (the images are written in
    order) and is skipped."""
    images, labels = _load(spec.source)["train"]
    lo, hi = block * BLOCK, min(spec.n, (block + 1) * BLOCK)
    if spec.n <= len(images):  # without replacement: one permutation of the whole set
        base = np.random.default_rng(spec.seed).permutation(len(images))[lo:hi]
    else:
        base = np.random.default_rng([spec.seed, block, 0]).integers(0, len(images), hi - lo)
    root = Path(spec.root)
    last = _path(root, "train", hi - 1, int(labels[base[-1]]))
    if last.is_file() and last.stat().st_size > 0:
        return hi - lo
    rng = np.random.default_rng([spec.seed, block, 1])
    for i, j in zip(range(lo, hi), base.tolist(), strict=True):
        _write(root, "train", i, int(labels[j]), _augment(images[j], rng))
    return hi - lo


def _eval_split(spec: FolderSpec, split: str) -> int:
    """Write the validation or test images (halves of a seeded order of the test set)."""
    images, labels = _load(spec.source)["test"]
    order = np.random.default_rng([spec.seed, 99]).permutation(len(images))
    half = order[: spec.n_eval] if split == "val" else order[len(order) // 2 :][: spec.n_eval]
    root = Path(spec.root)
    for i, j in enumerate(half.tolist()):
        _write(root, split, i, int(labels[j]), images[j])
    return len(half)


def generate(spec: FolderSpec, workers: int) -> dict:
    """Write the whole folder with ``workers`` processes; returns what was written.

    An earlier complete folder of the same spec (``ROOT/folder.json``) is kept as it is.
    (The pipeline deletes the training images once converted: then they are written again.)
    """
    root = Path(spec.root)
    done = root / "folder.json"
    shutil.rmtree(root / ".train-deleted", ignore_errors=True)  # an interrupted deletion
    complete = done.is_file() and (root / "train").is_dir()
    if complete and json.loads(done.read_text()).get("spec") == vars(spec):
        return json.loads(done.read_text())
    if spec.n_eval > 5000:
        raise ValueError("at most 5,000 validation and test images each (Fashion-MNIST's test set)")
    t0 = time.perf_counter()
    blocks = range((spec.n + BLOCK - 1) // BLOCK)
    with ProcessPoolExecutor(max_workers=workers) as pool:
        futures = [pool.submit(_train_block, spec, b) for b in blocks]
        futures += [pool.submit(_eval_split, spec, s) for s in ("val", "test")]
        written = sum(f.result() for f in futures)
    info = {
        "spec": vars(spec),
        "images": written,
        "seconds": time.perf_counter() - t0,
        "classes": class_dirs(),
    }
    done.write_text(json.dumps(info, indent=2))
    return info
