"""What a mid-epoch checkpoint (``train.checkpoint_every_steps``) costs at scale.

``python -m distnoisy.bench midepoch`` runs W gloo processes (``torch.multiprocessing``, no
Ray) that hold what a Clothing1M ELR run holds: a partitioned per-sample store of N rows
(C float targets, the run's loss/prediction/margin histories, final probabilities) and a
``resnet50`` with its SGD momentum. Side by side, in the same processes, it times:

- **a mid-epoch checkpoint** as :class:`distnoisy.engine.trainer.Trainer` writes it: every
  rank's random generators gathered, each rank's store part saved
  (:func:`distnoisy.store.parts.save_part`), rank 0's ``state.pt`` (networks, optimizer,
  running sums), then the local launcher's merge of the ranks' directories into the
  checkpoint (a copy), all between barriers: the time the training loop stands still;
- **a training step** of the same network on the same ranks (224 px, the local batch given),
  so that the checkpoint's cost is a share of the ``K`` steps between two checkpoints:
  ``checkpoint / (K x step)``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as tdist
import torch.multiprocessing as mp

from distnoisy.bench.common import DOC_HEADER, _load_average, machine_info
from distnoisy.core.result_docs import write_section
from distnoisy.store import FieldSpec, make_store

SECTION = "Mid-epoch checkpoints: cost per checkpoint"


@dataclass
class MidEpochSettings:
    n: int = 1_000_000
    classes: int = 14
    epochs: int = 10
    workers: int = 2
    model: str = "resnet50"
    image: int = 224
    local_batch: int = 16
    repeats: int = 3
    every: tuple[int, ...] = (100, 500, 1000)


@dataclass
class MidEpochReport:
    settings: MidEpochSettings
    per_rank: list[dict[str, Any]] = field(default_factory=list)
    load_average: float = float("nan")  # over the last minute, when the run ended
    machine: dict[str, str] = field(default_factory=machine_info)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, tmp: str, s: dict[str, Any]) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        result = _worker(rank, world, s, Path(tmp))
        (Path(tmp) / f"{rank}.json").write_text(json.dumps(result))
    finally:
        tdist.destroy_process_group()


def _filled_store(s: dict[str, Any], world: int, rank: int) -> Any:
    from distnoisy.engine.step import run_field_specs

    specs = run_field_specs(s["epochs"], s["classes"])
    specs["elr_target"] = FieldSpec(shape=(s["classes"],), lowp=True)
    store = make_store(s["n"], specs, backend="partitioned", world_size=world)
    gen = torch.Generator().manual_seed(rank)
    for t in store.parts.values():
        if t.is_floating_point():
            t.copy_(torch.rand(t.shape, generator=gen))
        else:
            t.copy_(torch.randint(-1, s["classes"], t.shape, generator=gen))
    return store


def _checkpoint(store: Any, model: Any, opt: Any, rank: int, root: Path, no: int) -> float:
    """One mid-epoch checkpoint as the trainer and the local launcher write it; seconds."""
    from distnoisy.engine.checkpoint import STATE_FILE, save_atomic
    from distnoisy.store.parts import save_part

    tdist.barrier()
    t0 = time.perf_counter()
    rng = [None] * tdist.get_world_size()
    tdist.all_gather_object(rng, {"torch": torch.get_rng_state()})
    sums = [None] * tdist.get_world_size()
    tdist.all_gather_object(sums, torch.zeros(5, dtype=torch.float64))
    mine = root / f"rank{rank}-{no}"
    mine.mkdir()
    save_part(store, mine, rank)
    if rank == 0:
        state = {
            "networks": {"model": model.state_dict()},
            "optimizers": {"model": opt.state_dict()},
            "rng": rng,
            "position": {"sums": sums},
        }
        save_atomic(state, mine / STATE_FILE)
    final = root / f"ckpt-{no}"
    if rank == 0:
        final.mkdir()
    tdist.barrier()
    shutil.copytree(mine, final, dirs_exist_ok=True)  # the launcher's merge
    tdist.barrier()
    seconds = time.perf_counter() - t0
    shutil.rmtree(mine)
    tdist.barrier()
    if rank == 0:
        shutil.rmtree(final)
    return seconds


def _worker(rank: int, world: int, s: dict[str, Any], tmp: Path) -> dict[str, Any]:
    from torch.nn.parallel import DistributedDataParallel as DDP

    from distnoisy.models import build_model

    torch.manual_seed(0)
    model = DDP(build_model(s["model"], s["classes"], 3))
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(s["local_batch"], 3, s["image"], s["image"])
    y = torch.randint(0, s["classes"], (s["local_batch"],))
    steps = []
    for i in range(s["repeats"] + 1):
        tdist.barrier()
        t0 = time.perf_counter()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        tdist.barrier()
        if i:  # the first step warms up
            steps.append(time.perf_counter() - t0)
    store = _filled_store(s, world, rank)
    ckpts = [_checkpoint(store, model.module, opt, rank, tmp, no) for no in range(s["repeats"])]
    lo, hi = store.owned_range()
    part_bytes = sum(t.numel() * t.element_size() for t in store.parts.values())
    store.close()
    return {"rows": hi - lo, "part_mb": part_bytes / 2**20, "step_s": steps, "ckpt_s": ckpts}


def run(s: MidEpochSettings) -> MidEpochReport:
    settings = asdict(s)
    with tempfile.TemporaryDirectory(dir=os.environ.get("DISTNOISY_BENCH_TMP")) as tmp:
        mp.spawn(_entry, args=(s.workers, _free_port(), tmp, settings), nprocs=s.workers, join=True)
        per_rank = [json.loads((Path(tmp) / f"{r}.json").read_text()) for r in range(s.workers)]
    return MidEpochReport(s, per_rank, _load_average())


def render(r: MidEpochReport, command: str) -> str:
    s, m = r.settings, r.machine
    # The slowest rank decides: every rank waits for it at the barriers.
    ckpt = statistics.median(max(p["ckpt_s"][i] for p in r.per_rank) for i in range(s.repeats))
    step = statistics.median(max(p["step_s"][i] for p in r.per_rank) for i in range(s.repeats))
    part = max(p["part_mb"] for p in r.per_rank)
    lines = [
        f"Command: `{command}`. Machine: {m['cpu']}, {m['cpu_count']} cores shared with other "
        f"work (load average {r.load_average:.0f}), torch {m['torch']}, gloo over "
        "loopback, one thread per process.",
        "",
        f"{s.workers} ranks, a partitioned store of N = {s.n:,} rows (C = {s.classes} float32 "
        f"ELR targets and final probabilities, {s.epochs}-epoch histories: {part:.0f} MB per "
        f"rank) and `{s.model}` with SGD momentum. Checkpoint: generators and running sums "
        "gathered, each rank's store part and rank 0's state.pt written, the ranks' directories "
        f"merged (the local launcher's copy); step: forward, backward, SGD on {s.image} px, "
        f"local batch {s.local_batch}. Medians of {s.repeats} repeats, slowest rank.",
        "",
        "| checkpoint (s) | training step (s) | K = "
        + " | K = ".join(str(k) for k in s.every)
        + " |",
        "|---:|---:|" + "---:|" * len(s.every),
        f"| {ckpt:.2f} | {step:.2f} | "
        + " | ".join(f"{ckpt / (k * step):.2%}" for k in s.every)
        + " |",
        "",
        "The K columns: one checkpoint's time as a share of the K training steps between two "
        "checkpoints (`train.checkpoint_every_steps=K`).",
    ]
    return "\n".join(lines) + "\n"


def add_parser(sub: Any) -> None:
    p = sub.add_parser("midepoch", help="mid-epoch checkpoint cost vs the steps between them")
    d = MidEpochSettings()
    p.add_argument("--n", type=int, default=d.n)
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--model", default=d.model)
    p.add_argument("--image", type=int, default=d.image)
    p.add_argument("--local-batch", type=int, default=d.local_batch)
    p.add_argument("--repeats", type=int, default=d.repeats)
    p.add_argument("--out", type=Path, default=None, help="Markdown file to write the section to")


def main(args: argparse.Namespace, argv: list[str]) -> MidEpochReport:
    if args.repeats < 1 or args.workers < 1 or args.n < args.workers:
        raise SystemExit("--repeats and --workers must be >= 1 and --n >= --workers")
    settings = MidEpochSettings(
        n=args.n,
        workers=args.workers,
        model=args.model,
        image=args.image,
        local_batch=args.local_batch,
        repeats=args.repeats,
    )
    report = run(settings)
    text = render(report, "python -m distnoisy.bench midepoch " + " ".join(argv[1:]))
    print(f"## {SECTION}\n\n{text}")
    if args.out is not None:
        write_section(args.out, SECTION, text, header=DOC_HEADER)
    return report
