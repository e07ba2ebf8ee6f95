"""Tables of finished pipeline benchmarks: ``python -m distnoisy.bench pipeline-report DIR ...``.

Reads each ``DIR/pipeline.json`` (written by ``python -m distnoisy.bench pipeline``) and prints,
in Markdown: the phases at every size side by side with the growth of the time and CPU time per
sample from the smallest size to the largest, and the checks of the outputs.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from distnoisy.bench.pipeline import PHASES


def _load(dirs: list[Path]) -> list[dict[str, Any]]:
    reports = [json.loads((d / "pipeline.json").read_text()) for d in dirs]
    return sorted(reports, key=lambda r: r["samples"])


def _short(name: str) -> str:
    if name.startswith("ray::"):
        return name.split("(")[0].split(".")[0]
    words = name.split()
    module = next((w for w in words if w.startswith("distnoisy.")), words[0] if words else "?")
    return module


def phase_table(reports: list[dict[str, Any]]) -> str:
    """Per phase and size: wall s, µs per sample (wall and CPU), peak MB (process), disk MB;
    then the growth from the smallest size to the largest."""
    sizes = [r["samples"] for r in reports]
    head = ["phase"]
    for n in sizes:
        head += [f"wall s ({n:,})", f"µs/sample wall, CPU ({n:,})", f"peak MB ({n:,})"]
    head += [f"disk MB ({n:,})" for n in sizes]
    if len(reports) > 1:
        head += ["growth of wall, CPU per sample", "growth of peak MB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for phase in PHASES:
        cells = [f"`{phase}`"]
        figures = [r["phases"][phase] for r in reports]
        for f, n in zip(figures, sizes, strict=True):
            cpu = f.get("cpu_us_per_sample")
            cells += [
                f"{f['wall_s']:,.0f}",
                f"{1e6 * f['wall_s'] / n:,.0f}, " + (f"{cpu:,.0f}" if cpu is not None else "-"),
                f"{f['peak_rss_mb']:,.0f} ({_short(f['peak_process'])})",
            ]
        cells += [f"{f['disk_mb']:,.0f}" for f in figures]
        if len(reports) > 1:
            a, b = figures[0], figures[-1]
            wall = (b["wall_s"] / sizes[-1]) / (a["wall_s"] / sizes[0])
            cpu_a, cpu_b = a.get("cpu_us_per_sample"), b.get("cpu_us_per_sample")
            cpu = f"{cpu_b / cpu_a:.2f}x" if cpu_a and cpu_b else "-"
            cells += [f"{wall:.2f}x, {cpu}", f"{b['peak_rss_mb'] / a['peak_rss_mb']:.2f}x"]
        lines.append("| " + " | ".join(cells) + " |")
    loads = "; ".join(f"{r['samples']:,}: load average {_loads(r)}, {r['date']}" for r in reports)
    return (
        "\n".join(lines)
        + f"\n\nMachine load (1-minute average at each phase's start and end): {loads}.\n"
    )


def _loads(report: dict[str, Any]) -> str:
    vals = [v for p in PHASES for v in (report["phases"][p]["load_avg_start"][0],
                                        report["phases"][p]["load_avg_end"][0])]  # fmt: skip
    return f"{min(vals):.0f}-{max(vals):.0f}"


def checks_table(reports: list[dict[str, Any]]) -> str:
    """The output checks at every size."""
    rows = [
        ("`label_issues` rows (every sample once)", lambda c: f"{c['label_issues']['rows']:,} "
         f"({'yes' if c['label_issues']['every_sample_once'] else 'NO'})"),
        ("trained on / noisy (truth)", lambda c: f"{c['label_issues']['trained']:,} / "
         f"{c['label_issues']['noisy']:,}"),
        ("label-issue AUROC (bench / run summary)", lambda c: f"{c['label_issues']['auroc']:.4f} / "
         f"{c['label_issues']['run_summary_auroc']:.4f}"),
        ("flagged, precision, recall", lambda c: f"{c['label_issues']['flagged']:,}, "
         f"{c['label_issues']['flag_precision']:.3f}, {c['label_issues']['flag_recall']:.3f}"),
        ("clean test accuracy (run)", lambda c: f"{100 * c['label_issues']['test_acc']:.1f}%"),
        ("post-training removed (share)", lambda c: f"{c['posttrain']['removed']:,} "
         f"({100 * c['posttrain']['removed_fraction']:.1f}%)"),
        ("removed-set precision (noise rate)", lambda c: _precision(c["posttrain"])),
        ("removed-set precision after each round tried", lambda c: _tried(c["posttrain"])),
        ("influence ranking AUROC (round 1)", lambda c: _num(c["posttrain"].get("ranking_auroc"))),
        ("post-training test accuracy: before, refit, best round", lambda c: _post_acc(c)),
        ("analysis buckets cover the training set", lambda c: "yes"
         if c["analysis"]["buckets_cover_training_set"] else "NO"),
    ]  # fmt: skip
    head = ["check", *[f"{r['samples']:,}" for r in reports]]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for title, cell in rows:
        lines.append("| " + " | ".join([title, *[cell(r["checks"]) for r in reports]]) + " |")
    return "\n".join(lines) + "\n"


def _precision(p: dict[str, Any]) -> str:
    if p.get("precision_removed") is None:
        return f"- ({100 * p['noise_rate']:.1f}%)"
    return f"{100 * p['precision_removed']:.1f}% ({100 * p['noise_rate']:.1f}%)"


def _num(v: float | None) -> str:
    return "-" if v is None else f"{v:.4f}"


def _tried(p: dict[str, Any]) -> str:
    cells = [
        f"r{r['round']}: {100 * r['precision_removed']:.1f}%"
        for r in p.get("rounds", [])
        if r.get("precision_removed") is not None
    ]
    return ", ".join(cells) or "-"


def _post_acc(c: dict[str, Any]) -> str:
    p = c["posttrain"]
    vals = [p.get("test_acc_before"), p.get("test_acc_refit_only"), p.get("test_acc")]
    return ", ".join("-" if v is None else f"{100 * v:.1f}%" for v in vals)


def knn_agreement(out: Path, k: int = 10, buckets: int = 5) -> dict[str, Any]:
    """The approximate (IVF) frequency score against the exact one on a finished pipeline's
    cached training features, side by side in this process: times, Spearman correlation, the
    share of samples in the same quantile bucket."""
    import time

    import numpy as np
    from scipy.stats import spearmanr

    from distnoisy.analyze.buckets import assign_buckets, bucket_edges
    from distnoisy.analyze.knn import knn_density

    files = sorted((out / "run" / "features").glob("*/train.features.npy"))
    feats = np.load(files[0], mmap_mode="r")
    scores, seconds = {}, {}
    for search in ("ivf", "exact"):
        t0 = time.perf_counter()
        scores[search] = knn_density(feats, None, k=k, search=search)
        seconds[search] = round(time.perf_counter() - t0, 1)
    exact, ivf = scores["exact"], scores["ivf"]
    same = assign_buckets(exact, bucket_edges(exact, buckets)) == assign_buckets(
        ivf, bucket_edges(ivf, buckets)
    )
    return {
        "n": len(feats),
        "d": int(feats.shape[1]),
        "seconds": seconds,
        "spearman": round(float(spearmanr(exact, ivf).statistic), 5),
        "same_bucket": round(float(same.mean()), 4),
        "ivf_below_exact": round(float((ivf <= exact + 1e-6).mean()), 4),
    }


def add_parser(sub: argparse._SubParsersAction) -> None:
    s = sub.add_parser("pipeline-report", help="Markdown tables of finished pipeline benchmarks")
    s.add_argument("dirs", type=Path, nargs="+", help="the --out directories of `bench pipeline`")
    s.add_argument(
        "--knn",
        action="store_true",
        help="also time the exact and the IVF frequency score on each run's cached features",
    )


def main(args: argparse.Namespace, argv: list[str]) -> str:
    reports = _load(args.dirs)
    text = phase_table(reports) + "\n" + checks_table(reports)
    for r in reports:
        text += f"\nAnalysis at {r['samples']:,}:\n\n{r['checks']['analysis']['markdown']}\n"
    if args.knn:
        for d in args.dirs:
            text += f"\nk-NN agreement, {d}: {json.dumps(knn_agreement(d))}\n"
    print(text)
    return text
