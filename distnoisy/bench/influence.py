"""Scale of the post-training influence scores: ``python -m distnoisy.bench influence``.

Synthetic features (Gaussian clusters, ``C`` classes, 30% of the labels flipped) are written to a
``.npy`` file in float32 and scored with EK-FAC (:mod:`distnoisy.posttrain.ranks`) by 1 and by 2
ranks of the local launcher, side by side, for every size. Each rank reports its wall time and
its peak resident memory (``VmHWM``: its whole process, interpreter, torch and the pages of
the memory-mapped rows it touched included; every rank is a spawned process, also for 1 rank).
The scores of 1 and 2 ranks are compared.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shlex
import tempfile
import time
from pathlib import Path

import numpy as np

from distnoisy.bench.common import machine_info
from distnoisy.core import result_docs as reporting

SECTION = "Post-training: influence scores at scale (EK-FAC, synthetic features)"


def make_features(path: Path, n: int, d: int, c: int, seed: int = 0, chunk: int | None = None):
    """Synthetic ``(n, d)`` float32 features, labels (30% flipped) and a fitted-looking head.

    Written chunk by chunk into a memory-mapped ``.npy`` (default: ``2^24 / d`` rows, 128 MB of
    float64 draws), so 1M x 2048 (8 GB) is never held in memory."""
    chunk = chunk or max(1, 2**24 // d)
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 1.0, (c, d)).astype(np.float32)
    feats = np.lib.format.open_memmap(path / "h.npy", mode="w+", dtype=np.float32, shape=(n, d))
    labels = np.empty(n, dtype=np.int64)
    for lo in range(0, n, chunk):
        m = min(chunk, n - lo)
        y = rng.integers(0, c, m)
        feats[lo : lo + m] = centers[y] + rng.normal(0, 1.0, (m, d)).astype(np.float32)
        flip = rng.random(m) < 0.3
        y[flip] = (y[flip] + rng.integers(1, c, flip.sum())) % c
        labels[lo : lo + m] = y
    feats.flush()
    np.save(path / "y.npy", labels)
    theta = np.concatenate([centers.astype(np.float64) / d, np.zeros((c, 1))], axis=1)
    return theta


def run_one(path: Path, theta: np.ndarray, workers: int) -> dict:
    from distnoisy.launch.ranks import run_ranks
    from distnoisy.posttrain.ranks import ScoreTask, score_rank

    n = len(np.load(path / "y.npy", mmap_mode="r"))
    out = path / f"scores-{workers}.npy"
    np.lib.format.open_memmap(out, mode="w+", dtype=np.float64, shape=(n,)).flush()
    task = ScoreTask(
        features=str(path / "h.npy"),
        labels=str(path / "y.npy"),
        theta=theta,
        mu=1e-3,
        scores=str(out),
        report=str(path / f"report-{workers}-{{rank}}.json"),
    )
    t0 = time.perf_counter()
    run_ranks(score_rank, task, world_size=workers, launcher="local", storage_dir=path, spawn=True)
    wall = time.perf_counter() - t0
    ranks = [json.loads((path / f"report-{workers}-{r}.json").read_text()) for r in range(workers)]
    return {"workers": workers, "wall_s": wall, "ranks": ranks, "scores": out}


def format_rows(rows: list[dict]) -> str:
    lines = [
        "| N | d | C | ranks | wall (s, with process start) | per-rank compute (s) | "
        "per-rank peak RSS (MB) | per-rank RSS at start (MB) | max rel. diff vs 1 rank |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        comp = " / ".join(f"{k['total_s']:.1f}" for k in r["ranks"])
        rss = " / ".join(f"{k['peak_rss_mb']:.0f}" for k in r["ranks"])
        rss0 = " / ".join(f"{k['rss_at_start_mb']:.0f}" for k in r["ranks"])
        diff = "-" if r["diff"] is None else f"{r['diff']:.1e}"
        lines.append(
            f"| {r['n']:,} | {r['d']} | {r['c']} | {r['workers']} | {r['wall_s']:.1f} | {comp} | "
            f"{rss} | {rss0} | {diff} |"
        )
    return "\n".join(lines) + "\n"


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("influence", help="EK-FAC influence scores: time and memory, 1 vs 2 ranks")
    s.add_argument(
        "--sizes", nargs="+", default=["50000x512", "200000x512", "50000x2048"], help="NxD pairs"
    )
    s.add_argument("--classes", type=int, default=14)
    s.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    s.add_argument("--out", type=Path, default=None, help="Markdown file to write the section to")


def main(args: argparse.Namespace, argv: list[str]) -> list[dict]:
    rows = []
    for size in args.sizes:
        n, d = (int(v) for v in size.lower().split("x"))
        with tempfile.TemporaryDirectory(prefix="distnoisy-bench-influence-") as tmp:
            theta = make_features(Path(tmp), n, d, args.classes)
            base = None
            for w in args.workers:
                r = run_one(Path(tmp), theta, w)
                scores = np.load(r.pop("scores"))
                diff = None
                if base is None:
                    base = scores
                else:
                    diff = float(np.max(np.abs(scores - base) / np.abs(base)))
                rows.append({"n": n, "d": d, "c": args.classes, **r, "diff": diff})
                print(format_rows(rows[-1:]).splitlines()[-1], flush=True)
    m = machine_info()
    body = (
        f"`python -m distnoisy.bench {shlex.join(argv)}` on {m['cpu']} ({m['cpu_count']} "
        f"cores, shared with other jobs), {dt.date.today()}, torch threads per rank 1.\n\n"
        + format_rows(rows)
    )
    print(body)
    if args.out is not None:
        reporting.write_section(args.out, SECTION, body, header=reporting.BENCHMARKS_HEADER)
    return rows
