"""``python -m distnoisy.bench plain-loop``: distnoisy on a class-ordered image folder against a
plain PyTorch loop over the same images and labels.

The case a new user meets first: Fashion-MNIST written out as an ordinary image folder
(``root/<class>/<n>.png``, listed class by class), converted with the image-folder converter
(:mod:`distnoisy.data.folder`) and trained with ``data.name=shards method.name=ce
noise.kind=symmetric noise.rate=0.4``. Side by side, in one process and one run:

- **distnoisy**: ``python -m distnoisy.train`` on the converted shards (local launcher, one
  worker, ``--loader-workers`` loader processes), clean test accuracy and epoch time from
  its ``summary.json``;
- **plain loop**: the same model class and initial weights (``small_cnn``, seeded alike), the
  same training images in memory, the same noisy labels (read back from the distnoisy run), the
  same augmentation the shard pipeline applies to small grey images (random crop 28 with 4 px
  zero padding, horizontal flip, normalisation by mean 0.5 / std 0.25), Adam at 1e-3, batch 64,
  ``torch.utils.data.DataLoader(shuffle=True)``; its epoch time includes its test pass, as
  distnoisy's does.

Printed (and written to ``--out`` as a Markdown section): clean test accuracy after each epoch
for both, the difference, and the epoch-time ratio distnoisy / plain loop.
"""

from __future__ import annotations

import argparse
import json
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from distnoisy.core import result_docs as reporting

SECTION = "Class-ordered image folder: distnoisy vs a plain PyTorch loop"
MEAN, STD = 0.5, 0.25  # what data.name=shards normalises grey images with


@dataclass
class PlainLoopReport:
    train_size: int
    epochs: int
    distnoisy_acc: list[float]
    plain_acc: list[float]
    distnoisy_epoch_s: list[float]
    plain_epoch_s: list[float]
    batch_class_mix: list[float]

    @property
    def time_ratio(self) -> float:
        """Mean epoch time distnoisy / plain loop."""
        return float(np.mean(self.distnoisy_epoch_s) / np.mean(self.plain_epoch_s))


def export_class_ordered_folder(
    images: np.ndarray, labels: np.ndarray, rows: np.ndarray, root: Path
) -> None:
    """Write ``images[rows]`` as ``root/<label>_<class>/<row>.png`` (a folder, class by class)."""
    from distnoisy.data.fashion_mnist import CLASSES

    for c, name in enumerate(CLASSES):
        (root / f"{c}_{name.replace('/', '-')}").mkdir(parents=True, exist_ok=True)
    for row in rows.tolist():
        c = int(labels[row])
        path = root / f"{c}_{CLASSES[c].replace('/', '-')}" / f"{row:05d}.png"
        Image.fromarray(images[row]).save(path)


def _rows_of(keys: list[str]) -> np.ndarray:
    """Fashion-MNIST rows of the shard set's samples, from their keys ``<class>/<row>.png``."""
    return np.array([int(Path(k).stem) for k in keys], dtype=np.int64)


def run_distnoisy(shards: Path, out: Path, epochs: int, loader_workers: int, seed: int) -> dict:
    """Train CE on the converted folder with distnoisy; its ``summary.json``."""
    from distnoisy.config import load_config
    from distnoisy.train import train

    cfg = load_config(
        [
            "data.name=shards",
            f"data.urls={shards}",
            f"data.num_workers={loader_workers}",
            "method.name=ce",
            "model.name=small_cnn",
            "noise.kind=symmetric",
            "noise.rate=0.4",
            "train.optimizer=adam",
            "train.lr=0.001",
            "train.weight_decay=0",
            "train.scheduler=none",
            "train.batch_size=64",
            f"train.epochs={epochs}",
            f"seed={seed}",
            "scaling.launcher=local",
            "scaling.num_workers=1",
            "tracking.enabled=false",
            f"output_dir={out}",
        ]
    )
    train(cfg)
    return json.loads((out / "summary.json").read_text())


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop 28 of the 4-px zero-padded image and a horizontal flip, per sample."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=gen)
    dx = torch.randint(0, 9, (n,), generator=gen)
    rows = (dy[:, None] + torch.arange(h)[None, :])[:, None, :, None].expand(n, 1, h, w + 8)
    out = padded.gather(2, rows)
    cols = (dx[:, None] + torch.arange(w)[None, :])[:, None, None, :].expand(n, 1, h, w)
    out = out.gather(3, cols)
    flip = torch.rand(n, generator=gen) < 0.5
    out[flip] = out[flip].flip(3)
    return out


def run_plain_loop(
    train_x: np.ndarray,
    train_y: np.ndarray,
    test_x: np.ndarray,
    test_y: np.ndarray,
    epochs: int,
    seed: int,
) -> tuple[list[float], list[float]]:
    """A plain PyTorch loop: (clean test accuracy, epoch seconds) per epoch."""
    from distnoisy.models import build_model

    torch.manual_seed(seed)  # as the distnoisy worker does before building the model
    model = build_model("small_cnn", 10, 1, None)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)

    def to_tensor(a: np.ndarray) -> torch.Tensor:  # 0..1; padding must be black, as uint8 0
        return torch.from_numpy(a).float().div(255).unsqueeze(1)

    data = torch.utils.data.TensorDataset(to_tensor(train_x), torch.from_numpy(train_y))
    gen = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(data, batch_size=64, shuffle=True, generator=gen)
    tx, ty = (to_tensor(test_x) - MEAN) / STD, torch.from_numpy(test_y)
    accs, seconds = [], []
    for _ in range(epochs):
        t0 = time.perf_counter()
        model.train()
        for x, y in loader:
            loss = F.cross_entropy(model((_augment(x, gen) - MEAN) / STD), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(tx[i : i + 256]).argmax(1) for i in range(0, len(tx), 256)])
        accs.append(float((pred == ty).float().mean()))
        seconds.append(time.perf_counter() - t0)
    return accs, seconds


def run(
    train_size: int, epochs: int, loader_workers: int, seed: int, work: Path
) -> PlainLoopReport:
    """Export, convert, train both ways; the report."""
    from distnoisy.data import fashion_mnist, folder
    from distnoisy.data.shards import read_labels, read_manifest

    files = fashion_mnist.find_files(fashion_mnist.DEFAULT_SOURCE, hint="--root DIR")
    images, labels = fashion_mnist.read_split(*files["train"])
    test_x, test_y = fashion_mnist.read_split(*files["test"])
    rows = fashion_mnist.balanced_subset(labels, train_size, seed)
    export_class_ordered_folder(images, labels, rows, work / "folder" / "train")
    export_class_ordered_folder(test_x, test_y, np.arange(len(test_y)), work / "folder" / "test")
    folder.convert(work / "folder" / "train", work / "shards", split="train")
    folder.convert(work / "folder" / "test", work / "shards", split="test", clean=True)

    summary = run_distnoisy(work / "shards", work / "run", epochs, loader_workers, seed)
    import pyarrow.parquet as pq

    given = pq.read_table(work / "run" / "label_issues.parquet").to_pandas()
    noisy = given.sort_values("index")["given_label"].to_numpy().astype(np.int64)
    train_keys = read_labels(read_manifest(work / "shards" / "train"))[2]
    test_keys = read_labels(read_manifest(work / "shards" / "test"))[2]
    test_rows = _rows_of(list(test_keys))
    plain_acc, plain_s = run_plain_loop(
        images[_rows_of(list(train_keys))],
        noisy,
        test_x[test_rows],
        test_y[test_rows],
        epochs,
        seed,
    )
    hist = summary["history"]
    return PlainLoopReport(
        train_size=len(rows),
        epochs=epochs,
        distnoisy_acc=[h["test_acc"] for h in hist],
        plain_acc=plain_acc,
        distnoisy_epoch_s=[h["epoch_time_s"] for h in hist],
        plain_epoch_s=plain_s,
        batch_class_mix=[h["batch_class_mix"] for h in hist],
    )


def format_section(report: PlainLoopReport, command: str, loader_workers: int) -> str:
    lines = [
        f"`{command}`: {report.train_size} Fashion-MNIST training images (class-balanced), "
        "written as an image folder class by class, converted with `python -m "
        "distnoisy.data.folder`; CE, 40% symmetric noise, `small_cnn`, Adam 1e-3, batch 64, "
        f"the full 10,000-image test set; distnoisy with {loader_workers} loader process(es).",
        "",
        "| epoch | distnoisy clean test acc | plain loop | difference | distnoisy epoch s | "
        "plain epoch s | batch_class_mix |",
        "|---|---|---|---|---|---|---|",
    ]
    for e in range(report.epochs):
        a, b = report.distnoisy_acc[e], report.plain_acc[e]
        lines.append(
            f"| {e + 1} | {a:.1%} | {b:.1%} | {100 * (a - b):+.1f} pts | "
            f"{report.distnoisy_epoch_s[e]:.1f} | {report.plain_epoch_s[e]:.1f} | "
            f"{report.batch_class_mix[e]:.2f} |"
        )
    lines += ["", f"Epoch time distnoisy / plain loop: **{report.time_ratio:.2f}**."]
    return "\n".join(lines) + "\n"


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("plain-loop", help="class-ordered image folder: distnoisy vs plain loop")
    s.add_argument("--train-size", type=int, default=12000)
    s.add_argument("--epochs", type=int, default=2)
    s.add_argument("--loader-workers", type=int, default=1, help="distnoisy's data.num_workers")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, default=None, help="Markdown file to write the section to")


def main(args: argparse.Namespace, argv: list[str]) -> PlainLoopReport:
    if args.epochs < 1 or args.train_size < 640 or args.loader_workers < 0:
        raise SystemExit("--epochs >= 1, --train-size >= 640 and --loader-workers >= 0 please")
    with tempfile.TemporaryDirectory(prefix="distnoisy-plain-loop-") as tmp:
        report = run(args.train_size, args.epochs, args.loader_workers, args.seed, Path(tmp))
    command = "python -m distnoisy.bench " + shlex.join(argv)
    section = format_section(report, command, args.loader_workers)
    print(f"## {SECTION}\n\n{section}")
    if args.out is not None:
        reporting.write_section(args.out, SECTION, section, header=reporting.BENCHMARKS_HEADER)
        print(f"wrote {SECTION!r} to {args.out}")
    return report
