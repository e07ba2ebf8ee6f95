"""``python -m distnoisy.bench gpu``: training throughput on one accelerator, in-process.

It needs only torch, torchvision, numpy and pillow (no Ray, MLflow, OmegaConf or WebDataset),
so it runs on a bare accelerator machine. It writes its own synthetic shards of square JPEGs
(``round(size * 256 / 224)`` px, 256 for 224 crops, quality 90: the pre-resized Clothing1M
layout) and measures images per second of one training step per method:

- **model**: the step on device-resident tensors (the ceiling the input path should reach);
- **cpu decode**: end to end from the shards: loader processes decode with libjpeg and batch
  uint8 images; the crop, flip and normalisation run on the device
  (:mod:`distnoisy.data.device_augment`);
- **gpu decode**: end to end, the loader reads JPEG bytes only and the device decodes them
  (torchvision's nvJPEG), then augments.

Each column is a median over ``--repeats`` rounds, the methods in a new random order every
round; ratios are to CE of the same round. Peak device memory is per method (model step).
The Clothing1M projection divides an epoch's images by the measured rate
(:func:`projection`).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import io
import json
import logging
import platform
import random
import statistics
import tarfile
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

METHODS = ("ce", "elr", "dal", "elr_plus", "limit")
#: The Clothing1M statistics the shards are normalised with.
MEAN, STD = (0.6959, 0.6537, 0.6371), (0.3113, 0.3192, 0.3214)
CLASSES = 14
#: DivideMix's released code on one A100, seconds per Clothing1M epoch (no mixed precision).
DIVIDEMIX_EPOCH_S = 717.0


@dataclass
class GpuBenchSettings:
    device: str = "cuda"
    model: str = "resnet50"
    image_size: int = 224
    batch: int = 256
    steps: int = 30
    warmup: int = 5
    repeats: int = 3
    methods: tuple[str, ...] = METHODS
    precision: str = "bf16"
    channels_last: bool = True
    compile: bool = False
    loader_workers: int = 8
    distinct_images: int = 256
    seed: int = 0


@dataclass
class GpuBenchReport:
    settings: GpuBenchSettings
    #: method -> column ("model", "cpu_decode", "gpu_decode") -> images/s per round
    ips: dict[str, dict[str, list[float]]]
    peak_mem_gib: dict[str, float | None]
    gpu_decode_on: str
    environment: dict[str, str]
    notices: list[str] = field(default_factory=list)

    def median(self, method: str, column: str) -> float:
        return statistics.median(self.ips[method][column])

    def ratio(self, method: str, column: str) -> float:
        """Median over rounds of CE's rate / this method's rate (> 1 = slower than CE)."""
        pairs = zip(self.ips["ce"][column], self.ips[method][column], strict=True)
        return statistics.median(ce / m for ce, m in pairs)


# -- synthetic shards -------------------------------------------------------------------------
def write_shards(root: Path, n: int, side: int, distinct: int, seed: int) -> Any:
    """``n`` samples of ``side``-px JPEGs in WebDataset tar shards; the in-memory manifest.

    ``distinct`` different photo-like images are encoded and their bytes reused, so writing
    is fast; decoding work is the same as for distinct files of that size.
    """
    from PIL import Image

    from distnoisy.data.shard_format import Manifest, ShardInfo

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (side // 8, side // 8, 3), dtype=np.uint8)
    encoded = []
    for i in range(min(distinct, n)):
        img = Image.fromarray(np.roll(base, i, axis=1)).resize((side, side), Image.BILINEAR)
        arr = np.asarray(img).astype(np.int16) + rng.integers(-20, 21, (side, side, 3))
        buf = io.BytesIO()
        Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
        encoded.append(buf.getvalue())
    shard_size = 256
    shards = []
    for first in range(0, n, shard_size):
        name = f"train-{first // shard_size:06d}.tar"
        count = min(shard_size, n - first)
        with tarfile.open(root / name, "w") as tar:
            for i in range(first, first + count):
                for ext, data in (("jpg", encoded[i % len(encoded)]), ("cls", b"%d" % (i % 14))):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        shards.append(ShardInfo(name, count, first))
    classes = tuple(f"c{c:02d}" for c in range(CLASSES))
    return Manifest(
        str(root), "synthetic", "train", n, CLASSES, classes, "jpg", False, tuple(shards)
    )


# -- the subjects -----------------------------------------------------------------------------
class _Subject:
    """One method with its networks, optimizers and store, as the trainer sets them up."""

    def __init__(self, name: str, s: GpuBenchSettings, n: int, device: torch.device) -> None:
        from distnoisy.engine.precision import maybe_compile, resolve_precision, to_channels_last
        from distnoisy.engine.step import declare_run_fields
        from distnoisy.methods import METHODS as REGISTRY
        from distnoisy.models import build_model
        from distnoisy.store import SampleStore

        cls = REGISTRY.get(name)
        params = cls.Params(name=name)
        cls.validate_params(params)
        self.method = cls(params, num_samples=n, num_classes=CLASSES, epochs=1, seed=s.seed)
        torch.manual_seed(s.seed)
        nets = self.method.build_networks(
            lambda name=None, weights=None: build_model(name or s.model, CLASSES, 3)
        )
        nets = {k: to_channels_last(m.to(device), s.channels_last) for k, m in nets.items()}
        self.method.setup(nets, device)
        self.precision = resolve_precision(s.precision, device)
        self.method.grad_scaler = self.precision.grad_scaler()
        self.nets = {k: maybe_compile(m, s.compile, k) for k, m in nets.items()}
        self.opts = self.method.build_optimizers(
            self.nets, lambda p: torch.optim.SGD(p, lr=0.002, momentum=0.9, weight_decay=1e-3)
        )
        self.store = SampleStore(n)
        declare_run_fields(self.store, 1, CLASSES)
        self.method.attach(self.store)

    def step(self, x: torch.Tensor, y: torch.Tensor, index: torch.Tensor, k: int) -> None:
        from distnoisy.engine.step import train_step
        from distnoisy.methods.base import StepInput

        for phase in self.method.phases():
            batch = StepInput(x, y, index, epoch=0, step=k, steps_per_epoch=10**6, phase=phase)
            train_step(
                self.method, self.nets, self.opts, self.store, batch, self.precision.autocast()
            )


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_model(subject: _Subject, s: GpuBenchSettings, device: torch.device) -> float:
    """Images/s of the step on device-resident tensors."""
    from distnoisy.engine.precision import input_layout

    g = torch.Generator().manual_seed(s.seed)
    x = torch.randn(s.batch, 3, s.image_size, s.image_size, generator=g).to(device)
    x = input_layout(x, s.channels_last)
    index = torch.randperm(subject.store.num_samples, generator=g)[: s.batch]
    y = torch.randint(0, CLASSES, (s.batch,), generator=g).to(device)
    for k in range(s.warmup):
        subject.step(x, y, index, k)
    _sync(device)
    t0 = time.perf_counter()
    for k in range(s.steps):
        subject.step(x, y, index, s.warmup + k)
    _sync(device)
    return s.batch * s.steps / (time.perf_counter() - t0)


def _time_stream(
    subject: _Subject,
    batches: Iterator[dict[str, Any]],
    s: GpuBenchSettings,
    device: torch.device,
    decode_on: torch.device,
) -> float:
    """Images/s end to end over ``batches`` (the first ``warmup`` untimed)."""
    from distnoisy.data.device_augment import DeviceAugment, decode_batch, to_device
    from distnoisy.engine.precision import input_layout

    aug = DeviceAugment("imagenet_train", MEAN, STD, s.image_size)
    t0, done = 0.0, 0
    for k, batch in enumerate(batches):
        if k == s.warmup:
            _sync(device)
            t0, done = time.perf_counter(), 0
        if "jpeg" in batch:  # GPU decode: bytes to the device, decoded there
            side = round(s.image_size * 256 / 224)
            images = decode_batch(batch["jpeg"], batch["jpeg_offsets"], decode_on, side)[0]
            images = images.to(device)
        else:
            images = to_device(batch["image"], device)
        x = input_layout(aug(images, to_device(batch["augment"], device)), s.channels_last)
        index = batch["index"]
        subject.step(x, to_device(index, device) % CLASSES, index, k)
        done += len(index)
    _sync(device)
    return done / (time.perf_counter() - t0)


def _stream(manifest: Any, s: GpuBenchSettings, encoded: bool) -> Any:
    """The trainer's stream: loader processes decode (``encoded=False``) or only batch the
    JPEG bytes (``encoded=True``, ``data.decode=gpu``); crops and flips are left to the device.
    Its loader processes persist from one epoch to the next."""
    from distnoisy.data.stream import TrainStream, make_transform

    tf = make_transform(
        "imagenet_train", MEAN, STD, seed=s.seed, size=s.image_size, defer=True, encoded=encoded
    )
    return TrainStream(
        manifest,
        rank=0,
        world_size=1,
        local_batch_size=s.batch,
        seed=s.seed,
        split="shard",
        transform=tf,
        shuffle_buffer=s.batch,
        num_workers=s.loader_workers,
    )


# -- the run ----------------------------------------------------------------------------------
def resolve_device(name: str) -> torch.device:
    """The benchmark's device; a one-line :class:`SystemExit` when CUDA is asked for but absent."""
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(
            f"distnoisy.bench gpu: --device {name} but torch {torch.__version__} sees no CUDA "
            "device; run it on the accelerator machine, or --device cpu for a smoke run"
        )
    return device


def environment(device: torch.device) -> dict[str, str]:
    """Device, driver, library versions and date of the measurement."""
    import torchvision

    env = {
        "date": dt.datetime.now(dt.timezone.utc).replace(microsecond=0).isoformat(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "python": platform.python_version(),
        "device": str(device),
    }
    if device.type == "cuda":
        env["device_name"] = torch.cuda.get_device_name(device)
        env["cuda"] = str(torch.version.cuda)
        with contextlib.suppress(Exception):
            import subprocess

            env["driver"] = subprocess.run(
                ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                capture_output=True,
                text=True,
                timeout=20,
            ).stdout.strip()
    else:
        from distnoisy.bench.common import machine_info

        info = machine_info()
        env["device_name"] = f"CPU {info['cpu']} ({info['cpu_count']} logical CPUs)"
        env["cpu_threads"] = info["torch_threads"]
    return env


def run_gpu_bench(s: GpuBenchSettings, work_dir: Path | None = None) -> GpuBenchReport:
    """Measure the table of the module docstring; see :class:`GpuBenchReport`."""
    from distnoisy.data.stream.decode import jpeg_decode_device

    device = resolve_device(s.device)
    notices: list[str] = []
    decode_on, reason = jpeg_decode_device(device)
    if reason:
        notices.append(f"gpu decode falls back to the CPU: {reason}")
        log.warning("data.decode=gpu: %s; decoding on the CPU", reason)
    n = s.batch * (s.warmup + s.steps)
    peak: dict[str, float | None] = {m: None for m in s.methods}
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        manifest = write_shards(
            Path(tmp), n, round(s.image_size * 256 / 224), s.distinct_images, s.seed
        )
        streams = [_stream(manifest, s, encoded) for encoded in (False, True)]
        try:
            ips = _rounds(n, streams, s, device, decode_on, peak)
        finally:
            for stream in streams:
                stream.close()
    return GpuBenchReport(s, ips, peak, str(decode_on), environment(device), notices)


def _rounds(
    n: int,
    streams: list[Any],
    s: GpuBenchSettings,
    device: torch.device,
    decode_on: torch.device,
    peak: dict[str, float | None],
) -> dict[str, dict[str, list[float]]]:
    """``repeats`` rounds over the methods in a new random order each; images/s per column.

    Each turn builds its method afresh (same seed) and frees it after, so the peak device
    memory is that method's alone: weights, optimizer state, activations, store traffic.
    """
    ips: dict[str, dict[str, list[float]]] = {m: {} for m in s.methods}
    rng = random.Random(s.seed)
    epoch = 0
    for _ in range(s.repeats):
        order = list(s.methods)
        rng.shuffle(order)
        for m in order:
            if device.type == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats(device)
            sub = _Subject(m, s, n, device)
            ips[m].setdefault("model", []).append(_time_model(sub, s, device))
            if device.type == "cuda":
                peak[m] = torch.cuda.max_memory_allocated(device) / 2**30
            for stream, col in zip(streams, ("cpu_decode", "gpu_decode"), strict=True):
                rate = _time_stream(sub, stream.epoch_batches(epoch), s, device, decode_on)
                ips[m].setdefault(col, []).append(rate)
            epoch += 1
            del sub
    return ips


# -- the table, the projection, the files -----------------------------------------------------
COLUMNS = (("model", "model step"), ("cpu_decode", "cpu decode"), ("gpu_decode", "gpu decode"))


def projection(ips: float, images: int, gpus: int, efficiency: float) -> float:
    """Seconds per epoch of ``images`` on ``gpus`` accelerators at ``ips`` images/s each.

    ``efficiency`` is the assumed fraction of linear scaling on several GPUs (the gradient
    all-reduce and the store's gathers; 1 for one GPU). An estimate, not a measurement.
    """
    return images / (ips * gpus * (1.0 if gpus == 1 else efficiency))


#: Images per epoch: Clothing1M's noisy set; the ELR+ protocol trains each of its two networks
#: on 3,000 class-balanced batches of 64 (192k) per epoch.
#: An ELR+ iteration trains both networks on one batch: its epoch is 192k iterations' images.
EPOCH_IMAGES = {"ce": 1_000_000, "elr": 1_000_000, "dal": 1_000_000, "limit": 1_000_000}
ELR_PLUS_IMAGES = 192_000


def format_table(report: GpuBenchReport, efficiency: float = 0.9) -> str:
    """Markdown: images/s, ratio of step time to CE, peak memory, projected epoch times."""
    s = report.settings
    head = ["| method |", "|---|"]
    for _, title in COLUMNS:
        head[0] += f" {title} img/s | x CE |"
        head[1] += "---:|---:|"
    head[0] += " peak mem GiB | epoch 1 GPU | epoch 8 GPUs |"
    head[1] += "---:|---:|---:|"
    rows = []
    for m in s.methods:
        row = f"| {m} |"
        for col, _ in COLUMNS:
            ratio = report.ratio(m, col) if "ce" in report.ips else float("nan")
            row += f" {report.median(m, col):,.0f} | {ratio:.3f} |"
        mem = report.peak_mem_gib[m]
        best = max(report.median(m, c) for c, _ in COLUMNS[1:])
        images = EPOCH_IMAGES.get(m, ELR_PLUS_IMAGES)
        one, eight = (projection(best, images, g, efficiency) for g in (1, 8))
        row += f" {'-' if mem is None else f'{mem:.1f}'} | {one:,.0f} s | {eight:,.0f} s |"
        rows.append(row)
    return "\n".join(head + rows)


def format_section(report: GpuBenchReport, command: str, efficiency: float = 0.9) -> str:
    s, env = report.settings, report.environment
    lines = [
        f"`{command}`",
        "",
        f"{env.get('device_name')} ({env['device']}; driver {env.get('driver', '-')}, CUDA "
        f"{env.get('cuda', '-')}), torch {env['torch']}, torchvision {env['torchvision']}, "
        f"{env['date']}. {s.model}, {s.image_size} px, batch {s.batch}, {s.precision}, "
        f"channels_last={s.channels_last}, compile={s.compile}, {s.loader_workers} loader "
        f"processes; {s.steps} timed steps after {s.warmup}, median of {s.repeats} rounds.",
        "",
        format_table(report, efficiency),
        "",
        "Images/s count each batch once: an ELR+ or LIMIT iteration trains both networks on it, "
        "so their `x CE` is the step time of both networks over one CE step.",
        "",
        f"Epoch projections: Clothing1M's 1M noisy images (ELR+: its protocol's 192k per "
        f"network) at the faster end-to-end rate; 8 GPUs at an assumed {efficiency:.0%} of "
        f"linear scaling. DivideMix's released code: {DIVIDEMIX_EPOCH_S:.0f} s per epoch on one "
        "A100.",
    ]
    lines += [f"Notice: {n}" for n in report.notices]
    return "\n".join(lines)


def write_json(report: GpuBenchReport, path: Path) -> None:
    """The report as JSON, written atomically."""
    doc = asdict(report)
    doc["medians"] = {m: {c: report.median(m, c) for c, _ in COLUMNS} for m in report.ips}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)


SECTION = "GPU throughput"


def add_parser(sub: Any) -> argparse.ArgumentParser:
    d = GpuBenchSettings()
    p = sub.add_parser("gpu", help="training images/s on one accelerator (in-process, no Ray)")
    p.add_argument("--device", default=d.device, help="cuda, cuda:N or cpu (a smoke run)")
    p.add_argument("--model", default=d.model)
    p.add_argument("--image-size", type=int, default=d.image_size)
    p.add_argument("--batch", type=int, default=d.batch)
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--warmup", type=int, default=d.warmup)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--methods", default=",".join(d.methods))
    p.add_argument("--precision", default=d.precision, choices=("fp32", "bf16", "fp16"))
    p.add_argument(
        "--channels-last", action=argparse.BooleanOptionalAction, default=d.channels_last
    )
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=d.compile)
    p.add_argument("--loader-workers", type=int, default=d.loader_workers)
    p.add_argument("--efficiency", type=float, default=0.9, help="assumed 8-GPU scaling")
    p.add_argument("--json", type=Path, default=None, help="write the report here")
    p.add_argument("--doc", type=Path, default=None, help="Markdown file for the section")
    return p


def settings_from(args: argparse.Namespace) -> GpuBenchSettings:
    """Checked settings; a one-line :class:`SystemExit` for a bad value."""
    for name in ("image_size", "batch", "steps", "repeats"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0 or args.loader_workers < 0:
        raise SystemExit("--warmup and --loader-workers must be >= 0")
    methods = tuple(m for m in args.methods.split(",") if m)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise SystemExit(f"--methods: unknown {unknown}; choose from {','.join(METHODS)}")
    return GpuBenchSettings(
        device=args.device,
        model=args.model,
        image_size=args.image_size,
        batch=args.batch,
        steps=args.steps,
        warmup=args.warmup,
        repeats=args.repeats,
        methods=methods,
        precision=args.precision,
        channels_last=args.channels_last,
        compile=args.compile,
        loader_workers=args.loader_workers,
    )


def main(args: argparse.Namespace, argv: list[str]) -> GpuBenchReport:
    import shlex

    settings = settings_from(args)
    resolve_device(settings.device)  # fail in one line before any work
    report = run_gpu_bench(settings)
    section = format_section(
        report, "python -m distnoisy.bench " + shlex.join(argv), args.efficiency
    )
    print(f"## {SECTION}\n\n{section}")
    if args.json is not None:
        write_json(report, args.json)
        print(f"wrote {args.json}")
    if args.doc is not None:
        from distnoisy.core import result_docs as reporting

        reporting.write_section(args.doc, SECTION, section, header=reporting.BENCHMARKS_HEADER)
        print(f"wrote {SECTION!r} to {args.doc}")
    return report
