"""Grids of ordinary training runs that several result pages share, trained once and reused.

The label-issue page and the post-training page read the same runs (dataset x noise x method x
seed): :func:`run_grid` trains each run it does not find finished under ``root`` and reuses the
others, so either page's command trains what is missing and the other finds it done. Two
commands that reach the same run at the same time do not both train it: the first holds a
lock file beside the run directory; the second waits for it, then reuses the finished run.

Every run is a plain ``python -m distnoisy.train`` run (one process, no tracking); its
directory name says what it is: ``<dataset>-<noise>/<method>-seed<seed>``.
"""

from __future__ import annotations

import fcntl
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, overload

log = logging.getLogger(__name__)

#: The single-process set-up every grid run uses (no tracking: the pages are the record).
COMMON = ("scaling.launcher=local", "scaling.num_workers=1", "tracking.enabled=false")

#: Per dataset, the keys of its set-up. Digits: the default job with a 10% noisy validation
#: split. Fashion-MNIST: the set-up of docs/results/fashion_mnist.md (4,000 images, lenet, 40
#: epochs; run it with ``OMP_NUM_THREADS=1``).
DATASETS: dict[str, tuple[str, ...]] = {
    "digits": ("data.name=digits", "data.val_fraction=0.1"),
    "fashion_mnist": (
        "data.name=fashion_mnist",
        "data.train_size=4000",
        "data.val_fraction=0.1",
        "model.name=lenet",
        "train.epochs=40",
    ),
}

#: Per noise setting, its keys (40% of the training labels corrupted).
NOISES: dict[str, tuple[str, ...]] = {
    "symmetric": ("noise.kind=symmetric", "noise.rate=0.4"),
    "pair": ("noise.kind=pair", "noise.rate=0.4"),
    "instance": ("noise.kind=instance", "noise.rate=0.4"),
}


def run_dir(root: Path, dataset: str, noise: str, method: str, seed: int) -> Path:
    """Where the grid keeps the run of (dataset, noise, method, seed)."""
    return Path(root) / f"{dataset}-{noise}" / f"{method}-seed{seed}"


def run_args(dataset: str, noise: str, method: str, seed: int) -> list[str]:
    """The ``key=value`` arguments of that run (without ``output_dir``)."""
    return [*DATASETS[dataset], *NOISES[noise], f"method.name={method}", f"seed={seed}", *COMMON]


def _finished(out: Path) -> dict[str, Any] | None:
    summary = out / "summary.json"
    return json.loads(summary.read_text()) if summary.is_file() else None


def is_finished(root: Path, dataset: str, noise: str, method: str, seed: int) -> bool:
    """Whether the run of (dataset, noise, method, seed) under ``root`` has finished."""
    return _finished(run_dir(root, dataset, noise, method, seed)) is not None


@overload
def train_or_reuse(
    root: Path,
    dataset: str,
    noise: str,
    method: str,
    seed: int,
    extra: Iterable[str] = (),
    *,
    wait: Literal[True] = True,
) -> Path: ...


@overload
def train_or_reuse(
    root: Path,
    dataset: str,
    noise: str,
    method: str,
    seed: int,
    extra: Iterable[str] = (),
    *,
    wait: bool,
) -> Path | None: ...


def train_or_reuse(
    root: Path,
    dataset: str,
    noise: str,
    method: str,
    seed: int,
    extra: Iterable[str] = (),
    *,
    wait: bool = True,
) -> Path | None:
    """The finished run of (dataset, noise, method, seed) under ``root``, trained if missing.

    A run that was interrupted resumes from its last checkpoint. ``extra`` keys apply to a run
    trained here (not to one found finished). ``wait=False``: when another command is training
    the run right now, return None at once instead of waiting for it (a scheduler can do other
    runs first).
    """
    from distnoisy.config import load_config
    from distnoisy.driver.run import train

    out = run_dir(root, dataset, noise, method, seed)
    if _finished(out) is not None:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        try:  # another command training this run: wait for it (or, without wait, leave it)
            fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        if _finished(out) is None:
            resume = (out / "run.json").is_file()
            args = [*run_args(dataset, noise, method, seed), *extra, f"output_dir={out}"]
            log.info("grid: training %s", out)
            train(load_config([*args, f"resume={str(resume).lower()}"]))
    return out


def run_grid(
    root: Path,
    datasets: Iterable[str],
    noises: Iterable[str],
    methods: Iterable[str],
    seeds: Iterable[int],
) -> dict[tuple[str, str, str, int], Path]:
    """Every run of the grid, trained where missing: ``{(dataset, noise, method, seed): dir}``."""
    out = {}
    for dataset in datasets:
        for noise in noises:
            for method in methods:
                for seed in seeds:
                    key = (dataset, noise, method, seed)
                    out[key] = train_or_reuse(root, *key)
    return out
