"""Grids of ordinary training runs that several result pages share, trained once and reused.

The label-issue page and the post-training page read the same runs (dataset x noise x method x
seed): :func:`run_grid` trains each run it does not find finished under ``root`` and reuses the
others, so either page's command trains what is missing and the other finds it done. Two
commands that reach the same run at the same time do not both train it: the first holds a
lock file beside the run directory; the second waits for it, then reuses the finished run.

Every run is a plain ``python -m distnoisy.train`` run (one process, no tracking); its
directory name says what it is: ``<dataset>-<noise>/<method>-seed<seed>``.

Cross-validation (the label-issue page's peer, cleanlab on out-of-sample probabilities):
:func:`cv_fold_dir` / :func:`train_cv_fold` train CE on all but one of ``k`` folds of the
training set (``data.exclude_file``, the held-out fold) with the grid run's set-up, in
``<dataset>-<noise>/cv-ce-seed<seed>/fold<f>``; the fold's ``final_prob`` rows of the held-out
samples are then predictions of a model that never trained on them. The folds are stratified by
the given label (read from the finished CE run of the same seed) and fixed by the seed.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np

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
    out = run_dir(root, dataset, noise, method, seed)
    if _finished(out) is not None:
        return out
    return _train_locked(out, [*run_args(dataset, noise, method, seed), *extra], wait=wait)


def _train_locked(out: Path, args: list[str], *, wait: bool = True) -> Path | None:
    """Train the run ``args`` into ``out`` unless it is finished, holding ``out``'s lock."""
    from distnoisy.config import load_config
    from distnoisy.driver.run import train

    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out.parent / f".{out.name}.lock", "w") as lock:
        try:  # another command training this run: wait for it (or, without wait, leave it)
            fcntl.flock(lock, fcntl.LOCK_EX if wait else fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return None
        if _finished(out) is None:
            resume = (out / "run.json").is_file()
            log.info("grid: training %s", out)
            train(load_config([*args, f"output_dir={out}", f"resume={str(resume).lower()}"]))
    return out


#: Folds of the cross-validated CE peer (cleanlab's default, ``cv_n_folds=5``).
CV_FOLDS = 5


def cv_fold_dir(root: Path, dataset: str, noise: str, seed: int, fold: int) -> Path:
    """Where the grid keeps fold ``fold`` of the cross-validated CE runs of that seed."""
    return Path(root) / f"{dataset}-{noise}" / f"cv-ce-seed{seed}" / f"fold{fold}"


def cv_folds(given: np.ndarray, folds: int, seed: int) -> np.ndarray:
    """``[N]`` fold of each sample: stratified by given label, shuffled by ``seed``.

    Within each class the samples are shuffled, then dealt to the folds in turn, so every fold
    holds each class's share to within one sample (as scikit-learn's ``StratifiedKFold``).
    """
    given = np.asarray(given, dtype=np.int64)
    rng = np.random.default_rng(seed)
    fold = np.empty(len(given), dtype=np.int64)
    start = 0
    for c in np.unique(given):
        members = rng.permutation(np.flatnonzero(given == c))
        # continue dealing where the previous class stopped, so fold sizes stay balanced
        fold[members] = (start + np.arange(len(members))) % folds
        start = (start + len(members)) % folds
    return fold


def _given_labels(run: Path) -> np.ndarray:
    import pyarrow.parquet as pq

    table = pq.read_table(run / "sample_stats.parquet", columns=["index", "given_label"])
    order = np.argsort(table.column("index").to_numpy())
    return table.column("given_label").to_numpy()[order]


def train_cv_fold(
    root: Path, dataset: str, noise: str, seed: int, fold: int, folds: int = CV_FOLDS
) -> Path:
    """The finished CE run trained without fold ``fold`` (of ``folds``), trained if missing.

    The folds come from the given labels of the grid's CE run of the same seed (trained first
    if missing); the held-out indices are written beside the fold's run directory as
    ``fold<f>-heldout.npy``.
    """
    out = cv_fold_dir(root, dataset, noise, seed, fold)
    if _finished(out) is not None:
        return out
    given = _given_labels(train_or_reuse(root, dataset, noise, "ce", seed))
    heldout = out.parent / f"{out.name}-heldout.npy"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = heldout.with_name(f".{heldout.name}.tmp-{os.getpid()}.npy")
    np.save(tmp, np.flatnonzero(cv_folds(given, folds, seed) == fold))
    os.replace(tmp, heldout)
    return _train_locked(
        out, [*run_args(dataset, noise, "ce", seed), f"data.exclude_file={heldout}"]
    )


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
