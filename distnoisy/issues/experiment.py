"""``python -m distnoisy.issues.experiment``: the label-issue page, regenerated.

For every dataset x noise x method x seed of the grid (:mod:`distnoisy.driver.grid`, runs
trained once under ``--runs`` and reused), the label issues are recomputed from the finished
run's per-sample stats with :func:`distnoisy.issues.find.find_label_issues` (so runs trained
before a change of the method serve it too) and measured against the known corruption: the
estimated against the realised noise rate, precision, recall and F1 of the flags, and how often
the suggested label is the clean one on the flagged corrupted rows. The peer is cleanlab's
``find_label_issues`` on 5-fold cross-validated probabilities of CE with the same data, model
and epochs (``cv-ce-seed<seed>/fold<k>`` under the grid root).

    OMP_NUM_THREADS=1 python -m distnoisy.issues.experiment --runs /work/grid \\
        --out docs/results/label_issues.md --jobs 2

Generated sections of the page are replaced; others (the reading of the results) are kept.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterable
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DATASETS = ("digits", "fashion_mnist")
NOISES = ("symmetric", "pair", "instance")
METHODS = ("ce", "gce", "dal", "elr", "elr_plus", "limit")
METHOD_NAMES = {
    "ce": "CE",
    "gce": "GCE",
    "dal": "DAL",
    "elr": "ELR",
    "elr_plus": "ELR+",
    "limit": "LIMIT",
    "cleanlab": "cleanlab (5-fold CV of CE)",
}
#: The bars of the page: count within this fraction of the corrupted count, suggestions right
#: on at least this share of the flagged corrupted rows (CE and ELR, symmetric noise).
COUNT_TOLERANCE = 0.15
SUGGESTION_BAR = 0.80
BAR_METHODS = ("ce", "elr")
TITLE = "# Label issues: flag count and suggested labels\n"


# -- measuring one run -------------------------------------------------------------------------
def _read_stats(run: Path, columns: Iterable[str]) -> dict[str, np.ndarray]:
    """Columns of a finished run's per-sample stats (either layout), in sample order; vector
    columns as 2-D arrays."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from distnoisy.store.export import INDEX_FILE, SAMPLE_STATS_DIR, iter_sample_stats

    first = (
        run / SAMPLE_STATS_DIR / "part-00000.parquet"
        if (run / SAMPLE_STATS_DIR / INDEX_FILE).exists()
        else run / "sample_stats.parquet"
    )
    present = set(pq.read_schema(first).names)
    wanted = [c for c in dict.fromkeys(["index", *columns]) if c in present]
    table = pa.Table.from_batches(list(iter_sample_stats(run, columns=wanted)))
    out = {}
    for name in wanted:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            flat = col.flatten().to_numpy(zero_copy_only=False)
            out[name] = flat.reshape(len(col), col.type.list_size)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    order = np.argsort(out["index"], kind="stable")
    return {k: v[order] for k, v in out.items()}


def flag_quality(
    flags: np.ndarray,
    corrupted: np.ndarray,
    suggested: np.ndarray,
    given: np.ndarray,
    clean: np.ndarray,
) -> dict[str, Any]:
    """Precision, recall and F1 of ``flags`` against ``corrupted``, the share of flagged
    corrupted rows whose suggestion is the clean label, and the flagged rows that suggest
    their given label."""
    tp = int((flags & corrupted).sum())
    n_flag, n_bad = int(flags.sum()), int(corrupted.sum())
    p = tp / n_flag if n_flag else float("nan")
    r = tp / n_bad if n_bad else float("nan")
    hit = flags & corrupted
    return {
        "flagged": n_flag,
        "corrupted": n_bad,
        "precision": p,
        "recall": r,
        "f1": 2 * p * r / (p + r) if tp else 0.0,
        "suggestion_acc": float((suggested[hit] == clean[hit]).mean()) if tp else float("nan"),
        "self_suggested": int((flags & (suggested == given)).sum()),
    }


def measure_run(run: Path) -> dict[str, Any]:
    """The label-issue figures of one finished grid run, recomputed from its outputs."""
    import json

    from distnoisy.issues.find import EVIDENCE_COLUMNS, find_label_issues
    from distnoisy.issues.ranking import auroc

    summary = json.loads((run / "summary.json").read_text())
    cols = ["given_label", "clean_label", "label_issue_score", "train_pred", *EVIDENCE_COLUMNS]
    stats = _read_stats(run, cols)
    given, clean = stats["given_label"].astype(np.int64), stats["clean_label"].astype(np.int64)
    trained = stats["train_pred"] >= 0
    score = stats["label_issue_score"].astype(np.float64)
    found = find_label_issues(
        given, stats, score, num_classes=int(summary["num_classes"]), eligible=trained
    )
    corrupted = given != clean
    out = flag_quality(found.is_label_issue, corrupted, found.suggested_label, given, clean)
    out.update(
        rate_estimated=found.estimate.rate,
        rate_realised=float(corrupted[trained].mean()),
        auroc=auroc(score[trained], corrupted[trained]),
        window=found.window,
        epochs=int(stats["pred_hist"].shape[1]),
        test_acc=summary.get("test_acc"),
    )
    return out


def measure_cleanlab(folds: list[Path], heldout: list[np.ndarray]) -> dict[str, Any]:
    """cleanlab's ``find_label_issues`` (its defaults) on the cross-validated probabilities
    assembled from the folds' held-out rows; its suggestion is their argmax."""
    from cleanlab.filter import find_label_issues
    from cleanlab.rank import get_label_quality_scores

    from distnoisy.issues.ranking import auroc

    stats = [_read_stats(f, ["given_label", "clean_label", "final_prob"]) for f in folds]
    given, clean = stats[0]["given_label"].astype(np.int64), stats[0]["clean_label"]
    probs = np.zeros(stats[0]["final_prob"].shape, dtype=np.float64)
    for s, rows in zip(stats, heldout, strict=True):
        probs[rows] = s["final_prob"][rows]
    probs /= probs.sum(axis=1, keepdims=True)
    flags = find_label_issues(labels=given, pred_probs=probs, n_jobs=1)  # no fork pool
    corrupted = given != clean
    out = flag_quality(flags, corrupted, probs.argmax(axis=1), given, clean)
    quality = get_label_quality_scores(given, probs)
    out.update(
        rate_estimated=float(flags.mean()),
        rate_realised=float(corrupted.mean()),
        auroc=auroc(-quality, corrupted),
        window=None,
        epochs=None,
        test_acc=None,
    )
    return out


# -- training (the grid) -----------------------------------------------------------------------
def _task(kind: str, root: str, dataset: str, noise: str, method: str, seed: int) -> str:
    """Train one run or CV fold if missing (in a worker process, single-threaded torch)."""
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import torch

    from distnoisy.driver import grid

    torch.set_num_threads(1)
    logging.basicConfig(level=logging.INFO, format="%(message)s")  # a fresh process: its log
    if kind == "cv":
        return str(grid.train_cv_fold(Path(root), dataset, noise, seed, int(method)))
    return str(grid.train_or_reuse(Path(root), dataset, noise, method, seed))


def tasks(
    datasets: Iterable[str], noises: Iterable[str], methods: Iterable[str], seeds: list[int]
) -> list[tuple[str, str, str, str, int]]:
    """Every training of the page, in the order they are trained: first CE and ELR under
    symmetric noise for every seed (the bars), then seed by seed, noise by noise: CE and ELR,
    the cross-validated CE folds of the peer, the other methods. A page rendered part-way
    thus has every noise and method at the first seed."""
    from distnoisy.driver.grid import CV_FOLDS

    datasets, noises, methods = list(datasets), list(noises), list(methods)
    first = [m for m in methods if m in BAR_METHODS]
    rest = [m for m in methods if m not in BAR_METHODS]
    out: list[tuple[str, str, str, str, int]] = []
    if "symmetric" in noises:
        out += [("run", d, "symmetric", m, s) for s in seeds for d in datasets for m in first]
    for seed in seeds:
        for noise in noises:
            for d in datasets:
                out += [("run", d, noise, m, seed) for m in first]
                out += [("cv", d, noise, str(k), seed) for k in range(CV_FOLDS)]
                out += [("run", d, noise, m, seed) for m in rest]
    return list(dict.fromkeys(out))


def train_all(root: Path, todo: list[tuple[str, str, str, str, int]], jobs: int) -> None:
    """Train what is missing, ``jobs`` at a time (each run single-threaded); a run that fails
    is logged and left out of the page."""
    if jobs <= 1:
        for t in todo:
            try:
                _task(t[0], str(root), *t[1:])
            except Exception:
                log.exception("grid run %s failed", t)
        return
    # one process per training (max_tasks_per_child=1): nothing a run leaves behind (threads,
    # torch state) reaches the next
    pool = ProcessPoolExecutor(jobs, mp_context=get_context("spawn"), max_tasks_per_child=1)
    with pool:
        futures = {pool.submit(_task, t[0], str(root), *t[1:]): t for t in todo}
        for fut in as_completed(futures):
            try:
                fut.result()
            except Exception:
                log.exception("grid run %s failed", futures[fut])


# -- collecting and rendering ------------------------------------------------------------------
def collect(
    root: Path,
    datasets: Iterable[str],
    noises: Iterable[str],
    methods: Iterable[str],
    seeds: list[int],
) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    """``{(dataset, noise, method or "cleanlab"): [figures per finished seed]}``."""
    from distnoisy.driver.grid import CV_FOLDS, _finished, cv_fold_dir, run_dir

    results: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
    for dataset in datasets:
        for noise in noises:
            for method in methods:
                rows = []
                for seed in seeds:
                    run = run_dir(root, dataset, noise, method, seed)
                    if _finished(run) is not None:
                        rows.append({"seed": seed, **measure_run(run)})
                results[(dataset, noise, method)] = rows
            rows = []
            for seed in seeds:
                folds = [cv_fold_dir(root, dataset, noise, seed, k) for k in range(CV_FOLDS)]
                if all(_finished(f) is not None for f in folds):
                    held = [np.load(f.parent / f"{f.name}-heldout.npy") for f in folds]
                    rows.append({"seed": seed, **measure_cleanlab(folds, held)})
            results[(dataset, noise, "cleanlab")] = rows
    return results


def _ms(values: list[float], pct: bool = True, digits: int = 1) -> str:
    vals = [v for v in values if v is not None and v == v]
    if not vals:
        return "-"
    k = 100 if pct else 1
    if len(vals) == 1:
        return f"{k * vals[0]:.{digits}f}"
    return f"{k * np.mean(vals):.{digits}f} ± {k * np.std(vals):.{digits}f}"


def table(rows_by_method: dict[str, list[dict[str, Any]]], seeds: list[int]) -> str:
    """One dataset x noise: a row per method (mean ± std over its finished seeds)."""
    head = (
        "| method | seeds | estimated noise rate | realised | flagged / corrupted | precision | "
        "recall | F1 | suggestion right (flagged corrupted) | flagged suggesting the given label "
        "| AUROC of the score | early-learning epochs |"
    )
    lines = [head, "|" + "---|" * 12]
    for method, rows in rows_by_method.items():
        name = METHOD_NAMES.get(method, method)
        if not rows:
            lines.append(f"| {name} | 0 of {len(seeds)} (not trained yet) |" + " - |" * 10)
            continue
        windows = [r["window"] for r in rows if r["window"] is not None]
        lines.append(
            f"| {name} | {len(rows)} | {_ms([r['rate_estimated'] for r in rows])} | "
            f"{_ms([r['rate_realised'] for r in rows])} | "
            f"{_ms([r['flagged'] / r['corrupted'] for r in rows], pct=False, digits=2)} | "
            f"{_ms([r['precision'] for r in rows])} | {_ms([r['recall'] for r in rows])} | "
            f"{_ms([r['f1'] for r in rows])} | {_ms([r['suggestion_acc'] for r in rows])} | "
            f"{sum(r['self_suggested'] for r in rows)} of {sum(r['flagged'] for r in rows)} | "
            f"{_ms([r['auroc'] for r in rows], pct=False, digits=3)} | "
            + (f"{min(windows)}-{max(windows)} of {rows[0]['epochs']}" if windows else "-")
            + " |"
        )
    return "\n".join(lines) + "\n"


def bars(results: dict[tuple[str, str, str], list[dict[str, Any]]]) -> str:
    """The issue's bars, checked on the finished runs, each with its margin."""
    lines = []
    for dataset in DATASETS:
        for method in BAR_METHODS:
            rows = results.get((dataset, "symmetric", method)) or []
            if not rows:
                lines.append(f"- {METHOD_NAMES[method]}, {dataset}, symmetric: no finished run.")
                continue
            ratios = [r["flagged"] / r["corrupted"] for r in rows]
            worst = max(ratios, key=lambda x: abs(x - 1))
            sugg = [r["suggestion_acc"] for r in rows]
            ok_count = all(abs(x - 1) <= COUNT_TOLERANCE for x in ratios)
            ok_sugg = all(s >= SUGGESTION_BAR for s in sugg)
            lines.append(
                f"- {METHOD_NAMES[method]}, {dataset}, symmetric ({_seeds(len(rows))}): flag count "
                f"{', '.join(f'{x:.2f}' for x in ratios)} x the corrupted count (worst "
                f"{100 * (worst - 1):+.1f}%; bar ±{100 * COUNT_TOLERANCE:.0f}%: "
                f"{'met' if ok_count else 'NOT met'}); suggestions right on "
                f"{', '.join(f'{100 * s:.1f}%' for s in sugg)} of the flagged corrupted rows "
                f"(bar {100 * SUGGESTION_BAR:.0f}%: {'met' if ok_sugg else 'NOT met'})."
            )
    ours, peer = [], []
    for (dataset, noise, method), rows in results.items():
        if method == "cleanlab":
            continue
        lab = {r["seed"]: r["f1"] for r in results.get((dataset, noise, "cleanlab"), [])}
        for r in rows:
            if r["seed"] in lab:
                ours.append(r["f1"])
                peer.append(lab[r["seed"]])
    if ours:
        diff = np.mean(ours) - np.mean(peer)
        lines.append(
            f"- F1 of the flags over the {len(ours)} runs with a finished cleanlab peer (same "
            f"dataset, noise and seed): {100 * np.mean(ours):.1f}% against cleanlab's "
            f"{100 * np.mean(peer):.1f}% ({100 * diff:+.1f} points; bar: at least cleanlab's: "
            f"{'met' if diff >= 0 else 'NOT met'})."
        )
    flagged = sum(r["flagged"] for k, rs in results.items() if k[2] != "cleanlab" for r in rs)
    selfs = sum(r["self_suggested"] for k, rs in results.items() if k[2] != "cleanlab" for r in rs)
    lines.append(
        f"- Flagged rows suggesting their own given label: {selfs} of {flagged} "
        f"({'met' if selfs == 0 else 'NOT met'})."
    )
    return "\n".join(lines) + "\n"


def _seeds(n: int) -> str:
    return f"{n} seed" if n == 1 else f"{n} seeds"


def shortfalls(results: dict[tuple[str, str, str], list[dict[str, Any]]]) -> str:
    """Every dataset x noise x method that misses a bar of the page (applied beyond the bars'
    CE and ELR under symmetric noise), by how much: a seed's flag count off by more than
    :data:`COUNT_TOLERANCE`, a seed's suggestions right on fewer than :data:`SUGGESTION_BAR` of
    its flagged corrupted rows, the mean F1 below cleanlab's on the same seeds."""
    lines = []
    for (dataset, noise, method), rows in results.items():
        if method == "cleanlab" or not rows:
            continue
        misses = []
        ratios = [r["flagged"] / r["corrupted"] for r in rows]
        off = [x for x in ratios if abs(x - 1) > COUNT_TOLERANCE]
        if off:
            worst = max(off, key=lambda x: abs(x - 1))
            misses.append(
                f"count off by more than {100 * COUNT_TOLERANCE:.0f}% in {len(off)} of "
                f"{_seeds(len(rows))} (worst {worst:.2f}x, {100 * (worst - 1):+.0f}%)"
            )
        sugg = [r["suggestion_acc"] for r in rows if r["suggestion_acc"] == r["suggestion_acc"]]
        low = [x for x in sugg if x < SUGGESTION_BAR]
        if low:
            misses.append(
                f"suggestions right on {100 * min(low):.1f}% (worst seed; bar "
                f"{100 * SUGGESTION_BAR:.0f}%) in {len(low)} of {_seeds(len(sugg))}"
            )
        lab = {r["seed"]: r["f1"] for r in results.get((dataset, noise, "cleanlab"), [])}
        pairs = [(r["f1"], lab[r["seed"]]) for r in rows if r["seed"] in lab]
        if pairs and np.mean([a - b for a, b in pairs]) < 0:
            ours, peer = (100 * float(np.mean(x)) for x in zip(*pairs, strict=True))
            misses.append(
                f"F1 {ours:.1f}% below cleanlab's {peer:.1f}% ({ours - peer:+.1f} points, "
                f"{_seeds(len(pairs))})"
            )
        if misses:
            name = METHOD_NAMES.get(method, method)
            lines.append(f"- {name}, {dataset}, {noise}: " + "; ".join(misses) + ".")
    if not lines:
        return "Every finished run meets every bar.\n"
    return "\n".join(lines) + "\n"


def render(
    out: Path,
    results: dict[tuple[str, str, str], list[dict[str, Any]]],
    seeds: list[int],
    command: str,
    header: str,
) -> None:
    from distnoisy.core.result_docs import write_section

    write_section(out, "How this page is made", header, TITLE)
    write_section(out, "The bars", bars(results), TITLE)
    write_section(out, "Short of the bars", shortfalls(results), TITLE)
    for dataset in DATASETS:
        for noise in NOISES:
            rows = {m: r for (d, n, m), r in results.items() if d == dataset and n == noise}
            if rows:
                title = f"{dataset}, 40% {noise} noise"
                write_section(out, title, table(rows, seeds), TITLE)


HEADER = """Regenerate: `{command}` (trains the runs it does not find finished under `--runs`,
2 at a time, each single-threaded; the label issues are recomputed from each finished run's
per-sample stats, so the figures follow the current code without retraining; this rendering
took {render_s:.0f} s).

Runs: the grid of `distnoisy/driver/grid.py`: digits (the default job, 60 epochs, `small_cnn`)
and Fashion-MNIST (4,000 images, `lenet`, 40 epochs: the set-up of
[fashion_mnist.md](fashion_mnist.md)), each with a 10% validation split, 40% symmetric, pair
(`c -> c+1`) or instance-dependent noise (noise seed 0), every method with its defaults, seeds
{seeds} (the seed sets the initial weights and the data order). One process per run.

Columns (mean ± std over the finished seeds): *estimated noise rate*: the calibrated count of
`find_label_issues` over the samples trained on ([methods.md#flags](../methods.md#flags));
*realised*: the true share of corrupted labels; *flagged / corrupted*: `is_label_issue` count
over the number of corrupted samples (1.00 = exact); *precision / recall / F1* of the flags
against the corruption; *suggestion right*: the share of flagged corrupted rows whose
`suggested_label` is the clean label; *flagged suggesting the given label*: summed over seeds
(0 by construction for distnoisy); *AUROC*: of the method's label-issue score (cleanlab: of
its self-confidence label-quality score); *early-learning epochs*: the window the count is
built on (the whole run where the network does not start fitting wrong labels).

The peer: `cleanlab.filter.find_label_issues(labels, pred_probs)` with its defaults, on 5-fold
cross-validated predicted probabilities (`cv-ce-seed<seed>/fold<k>` under the grid root: CE
trained on 4 folds with `data.exclude_file` = the fifth, the same data, model and epochs as the
CE run of that seed, folds stratified by the given label); its suggestion is the argmax of those
probabilities.
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m distnoisy.issues.experiment",
        description="Regenerate docs/results/label_issues.md from the result grid.",
    )
    parser.add_argument("--runs", type=Path, default=Path("runs/grid"), help="the grid root")
    parser.add_argument("--out", type=Path, default=Path("docs/results/label_issues.md"))
    parser.add_argument("--datasets", nargs="+", default=list(DATASETS), choices=DATASETS)
    parser.add_argument("--noises", nargs="+", default=list(NOISES), choices=NOISES)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--jobs", type=int, default=2, help="trainings at once")
    parser.add_argument(
        "--no-train", action="store_true", help="render from the finished runs only"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if not args.no_train:
        todo = tasks(args.datasets, args.noises, args.methods, args.seeds)
        train_all(args.runs, todo, args.jobs)
    start = time.perf_counter()
    results = collect(args.runs, args.datasets, args.noises, args.methods, args.seeds)
    command = "OMP_NUM_THREADS=1 python -m distnoisy.issues.experiment " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--no-train"
    )
    header = HEADER.format(
        command=command.strip(),
        render_s=time.perf_counter() - start,
        seeds=", ".join(map(str, args.seeds)),
    )
    render(args.out, results, args.seeds, command, header)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
