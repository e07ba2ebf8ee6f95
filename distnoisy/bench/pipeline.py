"""The whole pipeline at a real size: ``python -m distnoisy.bench pipeline --samples N --out DIR``.

One job goes the path a user takes, every step a command line run as a user types it (in
``DIR``, so MLflow's default SQLite store is ``DIR/mlflow.db``):

1. an image folder of ``N`` real images arrives (:mod:`distnoisy.bench.pipeline_data`:
   Fashion-MNIST under random shifts, crops, flips and brightness, 28x28 PNG);
2. ``convert``: ``python -m distnoisy.data.folder`` writes the train, val and test shard sets;
3. ``train``: ``python -m distnoisy.train`` on them (ELR, 40% symmetric noise drawn by the run:
   the known noisy subset, ``lenet``, ``--epochs`` epochs, ``--workers`` Ray Train workers,
   the partitioned store, MLflow on);
4. ``label_issues``: the end of that same command, from its last epoch line to its exit: the
   final prediction pass over the training set, the ranked ``label_issues/`` and
   ``sample_stats/`` parts, the merged top-k, the summary and the review page;
5. ``posttrain``: ``python -m distnoisy.posttrain`` (EK-FAC influence, scored on
   ``--workers`` ranks);
6. ``analyze``: ``python -m distnoisy.analyze`` (frequency buckets; the approximate k-NN above
   :data:`distnoisy.analyze.knn.EXACT_MAX_ROWS` training rows).

Each phase's wall time, samples per second (``N / wall_s``), the peak resident memory of the
largest of its processes (Ray's workers included: :mod:`distnoisy.bench.proctree`) and what it
wrote to disk go to ``DIR/pipeline.json`` with ``N``, the machine and its load. The outputs are
then checked against the truth: ``label_issues`` covers every training sample once, its AUROC
against the noisy subset the run drew, the precision of post-training's removed set, and the
analysis table.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import shlex
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distnoisy.bench import pipeline_data
from distnoisy.bench.common import machine_info
from distnoisy.bench.proctree import CommandRecord, run_command
from distnoisy.core.errors import ConfigError

PHASES = ("convert", "train", "label_issues", "posttrain", "analyze")
#: What this bench writes in ``--out``; an earlier run's are refused (no stale figures).
OUTPUTS = ("data", "run", "analysis", "mlflow.db", "pipeline.json")
#: The noise the run draws: the known noisy subset.
NOISE = ("noise.kind=symmetric", "noise.rate=0.4")


@dataclass(frozen=True)
class Plan:
    """The job: ``samples`` training images in ``out``; ``workers`` Ray Train workers, scoring
    ranks, analysis tasks and converter processes."""

    samples: int
    out: Path
    workers: int
    epochs: int
    batch_size: int
    seed: int
    fashion_mnist: str
    keep_source: bool
    resume: bool = False


def phase_commands(plan: Plan) -> dict[str, list[list[str]]]:
    """The command lines of each phase, exactly as typed in ``plan.out``."""
    w = str(plan.workers)
    folder = f"python -m distnoisy.data.folder --out data --workers {w}".split()
    train = (
        "python -m distnoisy.train data.name=shards data.urls=data method.name=elr "
        f"model.name=lenet {' '.join(NOISE)} train.epochs={plan.epochs} "
        f"train.batch_size={plan.batch_size} store.backend=partitioned "
        f"scaling.num_workers={w} seed={plan.seed} output_dir=run"
    )
    posttrain = (
        "python -m distnoisy.posttrain run=run posttrain.score=influence posttrain.hessian=ekfac "
        f"posttrain.num_workers={w}"
    )
    analyze = f"python -m distnoisy.analyze run=run output_dir=analysis analysis.num_workers={w}"
    return {
        "convert": [
            [*folder, "--root", "source/train", "--split", "train"],
            [*folder, "--root", "source/val", "--split", "val", "--clean"],
            [*folder, "--root", "source/test", "--split", "test", "--clean"],
        ],
        "train": [train.split()],
        "posttrain": [posttrain.split()],
        "analyze": [analyze.split()],
    }


def disk_mb(*paths: Path) -> float:
    """Bytes on disk (allocated blocks) under ``paths``, in MB."""
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_blocks * 512
        elif path.is_dir():
            for p in path.rglob("*"):
                if p.is_file() and not p.is_symlink():
                    total += p.stat().st_blocks * 512
    return total / 1e6


def _load() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


class PhaseFailed(Exception):
    """A command exited with an error; its log names why."""


def _run(plan: Plan, phase: str, argv: list[str]) -> CommandRecord:
    real = [sys.executable, *argv[1:]] if argv[0] == "python" else argv
    log = plan.out / "logs" / f"{phase}.log"
    record = run_command(real, plan.out, log, env=dict(os.environ))
    if record.returncode != 0:
        tail = [line for _, line in record.lines[-5:]]
        raise PhaseFailed(
            f"{phase}: `{shlex.join(argv)}` exited with {record.returncode} (log {log}): "
            + " | ".join(tail)
        )
    return record


def _figures(plan: Plan, records: list[CommandRecord], t0: float, t1: float) -> dict[str, Any]:
    peak, name = max((r.peak(max(t0, r.start), min(t1, r.end)) for r in records), default=(0, ""))
    wall = t1 - t0
    cpu = sum(r.cpu_seconds(max(t0, r.start), min(t1, r.end)) for r in records)
    return {
        "wall_s": round(wall, 2),
        "samples_per_s": round(plan.samples / wall, 1) if wall > 0 else None,
        "cpu_s": round(cpu, 1),
        "cpu_us_per_sample": round(1e6 * cpu / plan.samples, 1),
        "peak_rss_mb": round(peak, 1),
        "peak_process": name,
    }


def _delete_source(source: Path) -> None:
    """Delete the converted training images: first the record that they are complete, then
    the folder under another name, so an interrupted deletion is never taken for a folder."""
    (source / "folder.json").unlink(missing_ok=True)
    gone = source / ".train-deleted"
    if (source / "train").is_dir():
        os.replace(source / "train", gone)
    shutil.rmtree(gone, ignore_errors=True)


def _clear(out: Path, phase: str) -> None:
    """Remove what an unfinished ``phase`` left (``--resume`` runs it again from the start)."""
    leftovers = {
        "convert": [out / "data"],
        "train": [out / "run", out / "data" / "noise"],
        "posttrain": [*(out / "run").glob("posttrain-*"), out / "run" / "features"],
        "analyze": [out / "analysis"],
    }[phase]
    for path in leftovers:
        shutil.rmtree(path, ignore_errors=True)


def run_phases(plan: Plan, report: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """Every phase in turn; their figures by name (``label_issues`` is cut out of ``train``).

    ``report["phases"]`` holds the phases an earlier (``--resume``) run finished: they are kept
    and skipped. After each phase the report is written to ``pipeline.json`` (``complete``
    false until every phase and check is done)."""
    commands = phase_commands(plan)
    out, phases = plan.out, report.setdefault("phases", {})
    for phase in ("convert", "train", "posttrain", "analyze"):
        if phase in phases:
            print(f"{phase}: done by an earlier run (--resume), kept", flush=True)
            continue
        _clear(out, phase)
        load_start = _load()
        records = [_run(plan, phase, argv) for argv in commands[phase]]
        load_end = _load()
        t0, t1 = records[0].start, records[-1].end
        if phase == "train":
            cut = records[0].last_line(f"epoch {plan.epochs}/{plan.epochs}")
            if cut is None:
                raise PhaseFailed(f"train: no line 'epoch {plan.epochs}/{plan.epochs}' in its log")
            phases["train"] = _figures(plan, records, t0, cut)
            phases["label_issues"] = _figures(plan, records, cut, t1)
            phases["label_issues"]["commands"] = ["(the end of the train command)"]
            for p in ("train", "label_issues"):
                phases[p].update(load_avg_start=load_start, load_avg_end=load_end)
        else:
            phases[phase] = _figures(plan, records, t0, t1)
            phases[phase].update(load_avg_start=load_start, load_avg_end=load_end)
        phases[phase]["commands"] = [shlex.join(a) for a in commands[phase]]
        phases[phase]["processes"] = _largest_processes(records)
        _phase_disk(out, phase, phases)
        _write(out, report)
        print(f"{phase}: {json.dumps(_brief(phases[phase]))}", flush=True)
        if phase == "convert" and not plan.keep_source:  # after its record: 1M files take a while
            _delete_source(out / "source")
    return {p: phases[p] for p in PHASES}


def _write(out: Path, report: dict[str, Any]) -> None:
    tmp = out / ".pipeline.json.tmp"
    tmp.write_text(json.dumps(report, indent=2))
    os.replace(tmp, out / "pipeline.json")


def _brief(figures: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in figures.items() if k not in ("processes", "commands")}


def _largest_processes(records: list[CommandRecord], top: int = 4) -> list[list[Any]]:
    """The ``top`` largest processes of the commands: ``[name, peak MB]``."""
    peaks = [
        (trace.peak(r.start, r.end), trace.name) for r in records for trace in r.processes.values()
    ]
    return [[name, round(mb, 1)] for mb, name in sorted(peaks, reverse=True)[:top]]


def _phase_disk(out: Path, phase: str, phases: dict[str, dict[str, Any]]) -> None:
    run = out / "run"
    issues = [
        run / "label_issues",
        run / "sample_stats",
        run / "label_issues.parquet",
        run / "sample_stats.parquet",
        *run.glob("label_issues_top.*"),
        run / "summary.json",
    ]
    if phase == "convert":
        phases[phase]["disk_mb"] = round(disk_mb(out / "data"), 1)
    elif phase == "train":
        li = disk_mb(*issues)
        phases["label_issues"]["disk_mb"] = round(li, 1)
        phases["train"]["disk_mb"] = round(disk_mb(run, out / "data" / "noise") - li, 1)
    elif phase == "posttrain":
        phases[phase]["disk_mb"] = round(disk_mb(*run.glob("posttrain-*"), run / "features"), 1)
    else:
        phases[phase]["disk_mb"] = round(disk_mb(out / "analysis"), 1)


def _check_plan(plan: Plan) -> None:
    if plan.samples < 2000:
        raise ConfigError(f"--samples {plan.samples}: at least 2,000 (the k-NN and the flags)")
    if plan.workers < 1 or plan.epochs < 1 or plan.batch_size % plan.workers:
        raise ConfigError(
            "--workers and --epochs must be >= 1 and --batch-size a multiple of --workers"
        )
    taken = [name for name in OUTPUTS if (plan.out / name).exists()]
    if taken and not plan.resume:
        raise ConfigError(
            f"--out {plan.out} already holds {', '.join(taken)} from an earlier run; give a new "
            "directory (a generated source/ folder of the same size is reused), or --resume "
            "to keep its finished phases"
        )


def run_pipeline(plan: Plan) -> dict[str, Any]:
    """Generate, run every phase, check the outputs; returns (and writes) ``pipeline.json``."""
    _check_plan(plan)
    earlier = plan.out / "pipeline.json"
    if plan.resume and earlier.is_file():
        report = json.loads(earlier.read_text())
        if (report["samples"], report["epochs"], report["workers"]) != (
            plan.samples,
            plan.epochs,
            plan.workers,
        ):
            raise ConfigError(f"--resume: {earlier} is of another --samples/--epochs/--workers")
        report.pop("checks", None)
        report["phases"] = {p: f for p, f in report["phases"].items() if p in PHASES}
        report["resumed"] = report.get("resumed", 0) + 1
        return _finish(plan, report)
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "logs").mkdir(exist_ok=True)
    n_eval = pipeline_data.eval_size(plan.samples)
    spec = pipeline_data.FolderSpec(
        str(plan.out / "source"), plan.fashion_mnist, plan.samples, n_eval, plan.seed
    )
    t0 = time.perf_counter()
    folder = pipeline_data.generate(spec, plan.workers)
    report: dict[str, Any] = {
        "samples": plan.samples,
        "val_samples": n_eval,
        "test_samples": n_eval,
        "epochs": plan.epochs,
        "workers": plan.workers,
        "batch_size": plan.batch_size,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {
            **machine_info(),
            "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        },
        "source": {
            "generate_s": round(time.perf_counter() - t0, 1),
            "images": folder["images"],
            "disk_mb": round(disk_mb(plan.out / "source"), 1),
        },
    }
    report["complete"] = False
    return _finish(plan, report)


def _finish(plan: Plan, report: dict[str, Any]) -> dict[str, Any]:
    """The phases not done yet, the checks, ``pipeline.json``."""
    from distnoisy.bench.pipeline_checks import check_outputs

    report["phases"] = run_phases(plan, report)
    report["checks"] = check_outputs(plan.out, plan.samples)
    report["disk_mb_total"] = round(disk_mb(plan.out), 1)
    report["mlflow_db_mb"] = round(disk_mb(plan.out / "mlflow.db"), 1)
    report["complete"] = True
    _write(plan.out, report)
    return report


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser(
        "pipeline",
        help="convert, train, label issues, post-train and analyse one job of N real images",
    )
    s.add_argument("--samples", type=int, required=True, help="training images (N)")
    s.add_argument("--out", type=Path, required=True, help="a new directory for everything")
    s.add_argument(
        "--workers", type=int, default=2, help="Ray Train workers, scoring ranks, Ray tasks (2)"
    )
    s.add_argument("--epochs", type=int, default=1)
    s.add_argument("--batch-size", type=int, default=256, help="global batch (256)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--fashion-mnist", default=str(pipeline_data.fashion_mnist.DEFAULT_SOURCE))
    s.add_argument(
        "--keep-source",
        action="store_true",
        help="keep the generated training folder after conversion (deleted by default)",
    )
    s.add_argument(
        "--resume",
        action="store_true",
        help="keep the phases an earlier run in --out finished (pipeline.json), run the rest",
    )


def main(args: argparse.Namespace, argv: list[str]) -> dict[str, Any]:
    plan = Plan(
        samples=args.samples,
        out=args.out.expanduser().resolve(),
        workers=args.workers,
        epochs=args.epochs,
        batch_size=args.batch_size,
        seed=args.seed,
        fashion_mnist=args.fashion_mnist,
        keep_source=args.keep_source,
        resume=args.resume,
    )
    try:
        report = run_pipeline(plan)
    except PhaseFailed as e:
        raise ConfigError(str(e)) from None
    print(json.dumps({p: _brief(f) for p, f in report["phases"].items()}, indent=1))
    print(json.dumps(report["checks"], indent=1))
    print(f"pipeline.json: {plan.out / 'pipeline.json'}")
    return report
