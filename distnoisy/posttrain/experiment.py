"""``python -m distnoisy.posttrain.experiment``: docs/results/posttrain.md, regenerated.

Reads the shared grid of ordinary training runs (:mod:`distnoisy.driver.grid`: Fashion-MNIST in
the set-up of docs/results/fashion_mnist.md and digits, 40% symmetric and 40% instance noise,
CE, GCE, DAL, ELR, ELR+ and LIMIT, 3 seeds), training the runs it does not find finished under
``--runs`` (a run another command is training is done later; never twice). Each run is then
post-trained with the defaults, head only and fine-tuned (``default``); from its final weights
(``final``, the old default); with the noisy-validation stopping rule (``val_noisy``); on
Fashion-MNIST with every other score; and cleanlab's recipe runs on the same features
(:mod:`distnoisy.posttrain.peer`). Finished post-trainings with the same config are reused
(:mod:`distnoisy.posttrain.experiment_jobs`). Run it with ``OMP_NUM_THREADS=1`` (the
Fashion-MNIST set-up); ``--jobs`` runs that many runs' work at once.

    OMP_NUM_THREADS=1 python -m distnoisy.posttrain.experiment --runs /work/grid --jobs 2
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from distnoisy.posttrain.config import DEFAULT_SCORE, SCORES
from distnoisy.posttrain.experiment_jobs import RunJob, Variant, run_job

DATASETS = ("fashion_mnist", "digits")
NOISES = ("symmetric", "instance")
METHODS = ("ce", "gce", "dal", "elr", "elr_plus", "limit")
#: Epochs of the fine-tune after the rounds (the default variant).
FINETUNE_EPOCHS = 10
#: Datasets whose runs are post-trained with every score (the score comparison).
SCORE_DATASETS = ("fashion_mnist",)
#: Seconds between looks at runs another command is training.
POLL_S = 30.0

log = logging.getLogger("distnoisy.posttrain.experiment")


def variants(
    dataset: str, scores: list[str], finetune_epochs: int, compared: bool = True
) -> tuple[Variant, ...]:
    """The post-trainings every run of ``dataset`` gets (module docstring); ``compared=False``:
    the default one only (a method left out of the comparisons by ``--compare-methods``)."""
    out = [Variant("default", (f"posttrain.finetune_epochs={finetune_epochs}",))]
    if not compared:
        return tuple(out)
    out += [
        Variant("final", ("posttrain.weights=final",)),
        Variant("val_noisy", ("posttrain.select_on=val_noisy",)),
    ]
    if dataset in SCORE_DATASETS:
        out += [Variant(s, (f"posttrain.score={s}",)) for s in scores if s != DEFAULT_SCORE]
    return tuple(out)


def plan(args: argparse.Namespace) -> list[RunJob]:
    """One job per grid run, Fashion-MNIST CE first (the runs the bars are about)."""
    jobs = [
        RunJob(
            str(Path(args.runs).resolve()),
            dataset,
            noise,
            method,
            seed,
            variants(
                dataset,
                args.scores,
                args.finetune_epochs,
                args.compare_methods is None or method in args.compare_methods,
            ),
            peer_of="default" if args.peer else None,
            force=args.force,
            extra_train=tuple(args.train_override),
            reuse_only=args.reuse_only,
        )
        for dataset in args.datasets
        for method in args.methods
        for noise in args.noises
        for seed in args.seeds
    ]
    return jobs


Key = tuple[str, str, str, int]


def execute(jobs: list[RunJob], workers: int) -> tuple[dict[Key, dict[str, Any]], dict[Key, str]]:
    """Every job's results, ``workers`` at a time, and what is missing (``--reuse-only``); a
    run another command is training right now is put back and tried again later (every
    ``POLL_S`` seconds when nothing else is left)."""
    results: dict[Key, dict[str, Any]] = {}
    missing: dict[Key, str] = {}
    pending = list(jobs)
    put_back = 0  # jobs put back in a row: when every pending one was, wait a while
    with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
        running: dict[Future, RunJob] = {}
        while pending or running:
            while pending and len(running) < workers:
                job = pending.pop(0)
                running[pool.submit(run_job, job, False)] = job
            done, _ = wait(list(running), return_when=FIRST_COMPLETED)
            for fut in done:
                job = running.pop(fut)
                out = fut.result()
                if out is None:  # being trained by another command: later
                    pending.append(job)
                    put_back += 1
                elif "missing" in out:
                    missing[job.key] = out["missing"]
                else:
                    results[job.key] = out
                    put_back = 0
                    log.info("done %s (%d of %d)", job.key, len(results), len(jobs))
            if pending and not running and put_back >= len(pending):
                time.sleep(POLL_S)
                put_back = 0
    return results, missing


def main_parser() -> argparse.ArgumentParser:
    """The command's arguments."""
    parser = argparse.ArgumentParser(
        prog="python -m distnoisy.posttrain.experiment", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--runs", default="runs/grid", help="the grid's root (shared, reused)")
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--noises", nargs="+", default=list(NOISES), choices=NOISES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--scores", nargs="+", default=list(SCORES), choices=list(SCORES))
    parser.add_argument("--finetune-epochs", type=int, default=FINETUNE_EPOCHS)
    parser.add_argument(
        "--compare-methods",
        nargs="+",
        choices=METHODS,
        help="methods whose runs also get the other starts, selections and scores (default: "
        "every method; the others get the default post-training and cleanlab's recipe)",
    )
    parser.add_argument(
        "--reuse-only",
        action="store_true",
        help="train and post-train nothing: the page from what is finished, the rest listed "
        "as missing",
    )
    parser.add_argument(
        "--no-peer", dest="peer", action="store_false", help="skip cleanlab's recipe"
    )
    parser.add_argument(
        "--train-override",
        nargs="*",
        default=[],
        metavar="KEY=VALUE",
        help="training keys for the runs trained here (not for runs found finished)",
    )
    parser.add_argument("--out", default="docs/results/posttrain.md")
    parser.add_argument("--jobs", type=int, default=1, help="runs worked on at once")
    parser.add_argument("--force", action="store_true", help="redo finished post-trainings")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = main_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("mlflow", "alembic", "distnoisy.engine.trainer", "distnoisy.posttrain"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    log.setLevel(logging.INFO)
    if args.peer:
        from distnoisy.core.errors import ConfigError
        from distnoisy.posttrain.peer import require_cleanlab

        try:
            require_cleanlab()
        except ConfigError as e:
            print(f"distnoisy: error: {e}; or pass --no-peer", file=sys.stderr)
            return 2
    from distnoisy.posttrain.experiment_page import render

    t0 = time.perf_counter()
    results, missing = execute(plan(args), args.jobs)
    command = " ".join(["python -m distnoisy.posttrain.experiment", *(argv or sys.argv[1:])])
    page = render(results, args, time.perf_counter() - t0, command, missing)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(page)
    tmp.replace(out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
