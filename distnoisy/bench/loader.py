"""``python -m distnoisy.bench loader``: the shard pipeline against torchvision ImageFolder.

Both read the **same** 256-px JPEGs (generated, JPEG quality 90, 14 classes) and do the same
work per image: decode, resize to 256 (a no-op here: both skip it for a 256-px image), random
crop 224, horizontal flip, to float, normalise (Clothing1M statistics), batch of 64:

- **shards**: :class:`distnoisy.data.stream.TrainStream` over the WebDataset shards written by
  the image-folder converter (torchvision's libjpeg decoder on tensors, loader processes);
- **ImageFolder**: ``torchvision.datasets.ImageFolder`` + ``torch.utils.data.DataLoader``
  (``shuffle=True``, PIL decode, ``transforms.Resize(256) / RandomCrop(224) /
  RandomHorizontalFlip / ToTensor / Normalize``), the usual PyTorch input pipeline.

Repeats alternate the two (the order shuffled each repeat) after one untimed warm-up epoch
each, so load on the machine hits both alike. Reported: decoded+augmented images per second per
CPU core (images/s divided by the processes decoding: ``--workers``, or 1 in-process) and the
ratio shards / ImageFolder of the median epochs. Conversion throughput is measured on the way:
the generated originals (larger, like Clothing1M's photos) are converted with ``--resize 256``.
"""

from __future__ import annotations

import argparse
import random
import shlex
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distnoisy.bench.common import DOC_HEADER, _load_average, machine_info
from distnoisy.core import result_docs as reporting

SECTION = "Data loader: WebDataset shards vs ImageFolder"
MEAN = (0.6959, 0.6537, 0.6371)
STD = (0.3113, 0.3192, 0.3214)


@dataclass
class LoaderReport:
    images: int
    workers: int
    batch: int
    repeats: int
    shards_ips: list[float]
    folder_ips: list[float]
    convert_ips: float
    convert_workers: int
    load_before: float
    load_after: float

    @property
    def cores(self) -> int:
        return max(1, self.workers)

    @property
    def ratio(self) -> float:
        return statistics.median(self.shards_ips) / statistics.median(self.folder_ips)


def _originals(root: Path, n: int, seed: int) -> None:
    """``root/<class>/<i>.jpg``: n photo-like JPEGs of 320-480 x 400-600 px (quality 90)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (60, 80, 3), dtype=np.uint8)
    for i in range(n):
        c = i % 14
        h, w = int(rng.integers(320, 481)), int(rng.integers(400, 601))
        # Smooth content plus texture: compresses like a photo, not like flat colour or noise.
        img = Image.fromarray(np.roll(base, i, axis=1)).resize((w, h), Image.Resampling.BILINEAR)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 21, (h, w, 3))
        out = root / f"c{c:02d}" / f"{i:06d}.jpg"
        out.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(out, quality=90)


def _export_folder(manifest, dest: Path) -> None:
    """The shards' 256-px JPEG bytes as an ImageFolder tree (identical files for both sides)."""
    import tarfile

    from distnoisy.data.shards import read_labels

    labels, _, keys = read_labels(manifest)
    for url in manifest.urls:
        with tarfile.open(url) as tf:
            for m in tf.getmembers():
                if m.name.endswith(".jpg"):
                    i = int(m.name.split(".", 1)[0])
                    out = dest / manifest.classes[labels[i]] / Path(keys[i]).name
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(tf.extractfile(m).read())


def _shard_epoch(stream, epoch: int) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = 0
    for batch in stream.epoch_batches(epoch):
        n += len(batch["index"])
    return n, time.perf_counter() - t0


def _folder_epoch(loader) -> tuple[int, float]:
    t0 = time.perf_counter()
    n = 0
    for x, _ in loader:
        n += len(x)
    return n, time.perf_counter() - t0


def run_loader_bench(
    images: int = 1024,
    workers: int = 2,
    batch: int = 64,
    repeats: int = 5,
    seed: int = 0,
    work_dir: Path | None = None,
) -> LoaderReport:
    import torchvision
    from torchvision import transforms as T

    from distnoisy.data import folder
    from distnoisy.data.stream import TrainStream, make_transform

    tmp = tempfile.TemporaryDirectory() if work_dir is None else None
    root = Path(tmp.name if tmp else work_dir)
    try:
        load_before = _load_average()
        _originals(root / "orig", images, seed)
        t0 = time.perf_counter()
        m = folder.convert(
            root / "orig", root / "shards", resize=256, shard_size=128, workers=max(1, workers)
        )
        convert_ips = images / (time.perf_counter() - t0)
        _export_folder(m, root / "folder")

        stream = TrainStream(
            m,
            rank=0,
            world_size=1,
            local_batch_size=batch,
            seed=seed,
            split="shard",
            transform=make_transform("imagenet_train", MEAN, STD, seed=seed),
            shuffle_buffer=1000,
            num_workers=workers,
        )
        tf = T.Compose(
            [
                T.Resize(256),
                T.RandomCrop(224),
                T.RandomHorizontalFlip(),
                T.ToTensor(),
                T.Normalize(MEAN, STD),
            ]
        )
        ds = torchvision.datasets.ImageFolder(str(root / "folder"), transform=tf)
        loader = torch.utils.data.DataLoader(
            ds,
            batch_size=batch,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            persistent_workers=workers > 0,
            multiprocessing_context="forkserver" if workers > 0 else None,
        )
        _shard_epoch(stream, 0)  # warm-up: loader processes start, files in the page cache
        _folder_epoch(loader)
        shards_ips: list[float] = []
        folder_ips: list[float] = []
        rng = random.Random(seed)
        for r in range(repeats):
            order = ["shards", "folder"]
            rng.shuffle(order)
            for which in order:
                if which == "shards":
                    n, s = _shard_epoch(stream, r + 1)
                    shards_ips.append(n / s)
                else:
                    n, s = _folder_epoch(loader)
                    folder_ips.append(n / s)
        stream.close()
        del loader
        return LoaderReport(
            images=images,
            workers=workers,
            batch=batch,
            repeats=repeats,
            shards_ips=shards_ips,
            folder_ips=folder_ips,
            convert_ips=convert_ips,
            convert_workers=max(1, workers),
            load_before=load_before,
            load_after=_load_average(),
        )
    finally:
        if tmp is not None:
            tmp.cleanup()


def format_section(report: LoaderReport, command: str, note: str | None = None) -> str:

    info = machine_info()
    per_core = report.cores

    def row(name: str, ips: list[float]) -> str:
        med = statistics.median(ips)
        return f"| {name} | {med:.0f} | {med / per_core:.0f} | {min(ips):.0f} - {max(ips):.0f} |"

    lines = [
        f"`{command}`",
        "",
        f"{report.images} generated JPEGs (shorter side 256, quality 90), random crop 224 + flip "
        f"+ normalise, batch {report.batch}, {report.workers} loader processes each "
        f"(= {per_core} core{'s' if per_core > 1 else ''} decoding), {report.repeats} "
        "interleaved epochs each after one warm-up epoch.",
        "",
        "| pipeline | images/s (median) | images/s per core | range over epochs |",
        "|---|---|---|---|",
        row("WebDataset shards (`TrainStream`)", report.shards_ips),
        row("torchvision `ImageFolder` + `DataLoader`", report.folder_ips),
        "",
        f"**Ratio shards / ImageFolder: {report.ratio:.2f}** (median epochs).",
        "",
        f"Conversion (`distnoisy.data.folder`, `--resize 256` from 400-600 px originals, "
        f"{report.convert_workers} processes): **{report.convert_ips:.0f} images/s**.",
        "",
        f"Machine: {info['cpu']}, {info['cpu_count']} logical CPUs, Python {info['python']}, "
        f"torch {info['torch']}; 1-min load average {report.load_before:.1f} before, "
        f"{report.load_after:.1f} after (the machine is shared: both pipelines ran interleaved "
        "under the same load).",
    ]
    if note:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("loader", help="shard pipeline vs ImageFolder+DataLoader, images/s/core")
    s.add_argument("--images", type=int, default=1024)
    s.add_argument("--workers", type=int, default=2, help="loader processes for each pipeline")
    s.add_argument("--batch", type=int, default=64)
    s.add_argument("--repeats", type=int, default=5)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--out", type=Path, default=None, help="Markdown file to write the section to")
    s.add_argument("--note", default=None)


def main(args: argparse.Namespace, argv: list[str]) -> LoaderReport:
    for name in ("images", "batch", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1")
    if args.workers < 0:
        raise SystemExit("--workers must be >= 0")
    if args.images < args.batch:
        raise SystemExit("--images must be at least --batch")
    report = run_loader_bench(args.images, args.workers, args.batch, args.repeats, args.seed)
    command = "python -m distnoisy.bench " + shlex.join(argv)
    section = format_section(report, command, args.note)
    print(f"## {SECTION}\n\n{section}")
    if args.out is not None:
        reporting.write_section(args.out, SECTION, section, header=DOC_HEADER)
        print(f"wrote {SECTION!r} to {args.out}")
    return report
