"""``python -m distnoisy.posttrain.experiment``: the digits post-training table, regenerated.

Trains (or reuses, when its ``summary.json`` exists) one run per method and seed on the digits
default (40% symmetric noise, a 10% noisy validation split, local launcher, one worker): CE for
100 epochs (it memorises every wrong label), ELR and DAL with their defaults; post-trains each
with the four scores (reusing finished post-trainings unless ``--force``); writes a markdown
page with the per-seed numbers and the means.

    python -m distnoisy.posttrain.experiment --seeds 0 1 2 --out docs/results/posttrain.md
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

from distnoisy.posttrain.config import SCORES

METHODS = {"ce": ["train.epochs=100"], "elr": [], "dal": []}
COMMON = ["scaling.launcher=local", "scaling.num_workers=1", "data.val_fraction=0.1"]


def _train(method: str, seed: int, root: Path, uri: str) -> Path:
    from distnoisy.config import load_config
    from distnoisy.train import train

    out = root / f"{method}-seed{seed}"
    if (out / "summary.json").is_file():
        return out
    cfg = load_config(
        [
            f"method.name={method}",
            *METHODS[method],
            *COMMON,
            f"seed={seed}",
            f"output_dir={out}",
            f"tracking.uri={uri}",
        ]
    )
    train(cfg)
    return out


def _posttrain(run: Path, score: str, force: bool = False) -> dict[str, Any]:
    import json

    from distnoisy.posttrain.config import load
    from distnoisy.posttrain.run import posttrain

    done = run / f"posttrain-{score}" / "summary.json"
    if done.is_file() and not force:  # finished before: reuse (--force redoes it)
        return json.loads(done.read_text())
    return posttrain(
        load([f"run={run}", f"posttrain.score={score}", f"output_dir={run / f'posttrain-{score}'}"])
    )


def _pct(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "-"
    return f"{100 * np.mean(vals):.1f} ± {100 * np.std(vals):.1f}"


def _num(values: list[float | None]) -> str:
    vals = [v for v in values if v is not None]
    return f"{np.mean(vals):.4f}" if vals else "-"


def table(results: dict[tuple[str, str], list[dict[str, Any]]]) -> str:
    """Mean ± std over seeds per (method, score)."""
    head = (
        "| run | score | test acc before | refit only | after post-training | change "
        "(points) | removed | precision of first 20% removed | round-1 AUROC | "
        "round-1 precision@k |"
    )
    lines = [head, "|" + "---|" * 10]
    for (method, score), rows in results.items():
        change = [100 * (r["test_acc"] - r["test_acc_before"]) for r in rows]
        lines.append(
            f"| {method} | {score} | {_pct([r['test_acc_before'] for r in rows])} | "
            f"{_pct([r['test_acc_refit_only'] for r in rows])} | "
            f"{_pct([r['test_acc'] for r in rows])} | "
            f"{np.mean(change):+.1f} ± {np.std(change):.1f} | "
            f"{_pct([r['removed_fraction'] for r in rows])} | "
            f"{_pct([r.get('precision_first_20pct') for r in rows])} | "
            f"{_num([r.get('auroc') for r in rows])} | "
            f"{_num([r.get('precision_at_k') for r in rows])} |"
        )
    return "\n".join(lines) + "\n"


def per_seed(results: dict[tuple[str, str], list[dict[str, Any]]], seeds: list[int]) -> str:
    lines = [
        "| run | score | seed | before | after | removed | precision first 20% | "
        "rounds | stopped |",
        "|" + "---|" * 9,
    ]
    for (method, score), rows in results.items():
        for seed, r in zip(seeds, rows, strict=True):
            complete = "" if r.get("first_20pct_complete", True) else " (fewer removed)"
            lines.append(
                f"| {method} | {score} | {seed} | {100 * r['test_acc_before']:.1f} | "
                f"{100 * r['test_acc']:.1f} | {r['removed']} | "
                f"{100 * (r.get('precision_first_20pct') or 0):.1f}{complete} | "
                f"{len(r['rounds']) - 1} | round {r['best_round']} kept |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distnoisy.posttrain.experiment", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--scores", nargs="+", default=list(SCORES), choices=list(SCORES))
    parser.add_argument(
        "--runs",
        default="runs/posttrain-experiment",
        help="where the training runs are (reused when finished)",
    )
    parser.add_argument("--out", default="docs/results/posttrain.md")
    parser.add_argument("--jobs", type=int, default=1, help="post-trainings run at once")
    parser.add_argument("--force", action="store_true", help="redo finished post-trainings")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    for noisy in ("mlflow", "alembic", "distnoisy.engine.trainer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    root = Path(args.runs).resolve()
    root.mkdir(parents=True, exist_ok=True)
    uri = f"sqlite:///{root / 'mlflow.db'}"
    t0 = time.perf_counter()
    runs = {m: [_train(m, s, root, uri) for s in args.seeds] for m in args.methods}
    jobs = [(m, score, r) for m in args.methods for score in args.scores for r in runs[m]]
    with ProcessPoolExecutor(args.jobs, mp_context=get_context("spawn")) as pool:
        done = list(
            pool.map(
                _posttrain,
                [r for _, _, r in jobs],
                [s for _, s, _ in jobs],
                [args.force] * len(jobs),
            )
        )
    results: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for (method, score, _), summary in zip(jobs, done, strict=True):
        results.setdefault((method, score), []).append(summary)
    page = render(results, args, time.perf_counter() - t0)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(page)
    tmp.replace(args.out)
    print(table(results))
    return 0


NOTES = """## Reading the table

- **CE after 100 epochs** has memorised every wrong label (training accuracy on the given labels
  100%). Refitting the head with the post-training penalty alone recovers about 15 points;
  removing the most influential samples and refitting adds about 10 more, with every score.
  The first 20% of the training set removed is almost entirely corrupted samples (>= 99.6% for
  every score and seed; the bar was 80%), and the gain is +25 to +26 points (the bar was +8).
- **ELR and DAL** do not memorise. Post-training changes their clean test accuracy by +0.5/+0.6
  (ELR) and -0.0 to +0.4 points (DAL) on average (the bar was >= -0.5). Per seed it is not always
  harmless: DAL seed 0 loses 0.9 to 1.4 points with every score. The stopping metric is the
  accuracy on 144 noisy validation labels (one image = 0.7 points), so it cannot tell such a
  small loss from noise.
- **Ranking quality from the one run.** On the CE runs the influence ranking of round 1 has AUROC
  0.989 and precision@k 0.945, just below cleanlab's standard recipe on the same data (0.9915
  and 0.947 with 5-fold cross-validated logistic regression, i.e. 5 extra trainings).
  `loss_history`, the run's own per-sample loss record, beats it (0.996 / 0.960). The removed
  samples' precision stays >= 99% until about 30-40% of the training set is removed.
- The influence rows use the exact head Hessian (digits: 2,570 head parameters).
"""


def render(results: dict[tuple[str, str], list[dict[str, Any]]], args: Any, wall: float) -> str:
    seeds = " ".join(str(s) for s in args.seeds)
    return (
        "# Post-training on digits (40% symmetric noise)\n\n"
        f"Regenerate: `python -m distnoisy.posttrain.experiment --seeds {seeds} --out "
        f"{args.out} --jobs 3` (trains the runs it does not find under `--runs`, default "
        "`runs/posttrain-experiment`, and reuses finished post-trainings; this page: 9 runs of "
        "2-4 min each, then 36 post-trainings in 26 min, 3 at a time, on a 2-core CPU machine "
        f"shared with other jobs; this rendering took {wall / 60:.1f} min).\n\n"
        "Runs: digits, 40% symmetric noise, 10% noisy validation split, small_cnn, one worker "
        "(local launcher); CE for 100 epochs, ELR and DAL with their defaults (60 epochs). "
        "Post-training with the defaults (`posttrain.fraction_per_round=0.05`, "
        "`max_removed=0.5`, class-balanced, `patience=2`, `weight_decay=1e-3`), one row per "
        "score. Mean ± std over seeds; accuracies are clean test accuracy (360 images: one "
        "image is 0.28 points). *Refit only* is round 0: the head refit on every sample, "
        "nothing removed. *Precision of first 20% removed*: the share of truly corrupted "
        "samples among the first 20% of the training set removed (in removal order). "
        "*Round-1 AUROC / precision@k*: the first round's ranking of every training sample "
        "against the corrupted set (k = the number corrupted).\n\n"
        + table(results)
        + "\n"
        + NOTES
        + "\n## Per seed\n\n"
        + per_seed(results, list(args.seeds))
    )


if __name__ == "__main__":
    sys.exit(main())
