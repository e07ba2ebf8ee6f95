"""``python -m distnoisy.compare``: train several methods on the same data, noise and seeds, and
write a markdown table (mean ± std over seeds) that anyone can regenerate.

Example (the table in ``docs/results/digits.md``)::

    python -m distnoisy.compare --methods ce,elr --seeds 0,1,2 \\
        --out docs/results/digits.md

Every run is an ordinary ``distnoisy.train`` run (same outputs, same MLflow tracking); extra
``key=value`` arguments apply to all of them. Method-specific overrides use ``method:key=value``
(e.g. ``elr:method.lam=7``).
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from distnoisy.config import keys_help, load_config
from distnoisy.core.errors import ConfigError
from distnoisy.core.result_docs import write_section
from distnoisy.driver.cli import ArgumentParser, Command, run_command
from distnoisy.train import train

# (summary key, column title, scale, decimals)
COLUMNS = (
    # Selected by clean validation accuracy (with a validation set; "n/a" without one).
    ("test_acc_at_best_val", "val-selected test acc", 100.0, 1),
    ("test_acc", "final test acc", 100.0, 1),
    ("best_test_acc", "best test acc", 100.0, 1),
    ("memorized", "memorized", 100.0, 1),
    ("label_issue_auroc", "label-issue AUROC", 1.0, 3),
    ("wall_s", "wall s", 1.0, 0),
)


def _mean_std(values: list[float], scale: float, digits: int) -> str:
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "n/a"
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def run_grid(
    methods: list[str],
    seeds: list[int],
    common: list[str],
    per_method: dict[str, list[str]],
    out_root: Path,
) -> dict[str, list[dict[str, Any]]]:
    """Train every (method, seed); returns the summaries grouped by method."""
    results: dict[str, list[dict[str, Any]]] = {m: [] for m in methods}
    for method in methods:
        for seed in seeds:
            args = [
                f"method.name={method}",
                f"seed={seed}",
                f"output_dir={out_root / f'{method}-seed{seed}'}",
                *common,
                *per_method.get(method, []),
            ]
            summary = train(load_config(args))
            results[method].append(summary)
            logging.getLogger("distnoisy").info(
                "%s seed %d: test_acc %.4f memorized %s auroc %s",
                method,
                seed,
                summary["test_acc"],
                summary["memorized"],
                summary["label_issue_auroc"],
            )
    return results


def markdown_table(results: dict[str, list[dict[str, Any]]], command: str) -> str:
    runs_of_first = next(iter(results.values()))
    first = runs_of_first[0]
    lines = [
        f"Dataset `{first['dataset']}` ({first['num_train']} training samples), noise "
        f"`{first['noise_kind']}` (realised rate "
        f"{100 * (first['noise_rate_realised'] or 0):.1f}%), "
        f"{first['epochs']} epochs, {first['num_workers']} worker(s); mean ± std over "
        f"{len(runs_of_first)} seed(s) (the seed sets model initialisation and data order; the "
        f"noise realisation is fixed by `noise.seed`). Accuracies and memorized in %.",
        "",
        "| method | " + " | ".join(c[1] for c in COLUMNS) + " |",
        "|---|" + "---|" * len(COLUMNS),
    ]
    for method, runs in results.items():
        cells = [_mean_std([r.get(k) for r in runs], scale, d) for k, _, scale, d in COLUMNS]
        lines.append(f"| {method} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "`val-selected test acc`: clean test accuracy at the epoch of the best clean validation "
        "accuracy (runs with a validation set). "
        "`memorized`: fraction of training samples whose label was corrupted for which the final "
        "model predicts the corrupted label. `label-issue AUROC`: how well the method's "
        "label-issue score separates corrupted from clean training labels.",
        "",
        f"Regenerate with: `{command}`",
        f"Measured on {platform.machine()} / {platform.system()}, Python "
        f"{platform.python_version()}, {time.strftime('%Y-%m-%d')}.",
    ]
    return "\n".join(lines) + "\n"


@dataclass(frozen=True)
class _Args:
    """The parsed command line: the grid and where its outputs go."""

    methods: list[str]
    seeds: list[int]
    common: list[str]
    per_method: dict[str, list[str]]
    out_root: Path
    out: Path | None
    section: str | None
    command: str


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m distnoisy.compare",
        description=(__doc__ or "").replace("``", "").replace("::", ":"),
        epilog=keys_help(config_files=False),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--methods", default="ce,elr", help="comma-separated method names")
    parser.add_argument("--seeds", default="0,1,2", help="comma-separated seeds")
    parser.add_argument("--out", type=Path, help="markdown file to write the table to")
    parser.add_argument(
        "--section", help="with --out: write the table as this '## ' section, keeping the others"
    )
    parser.add_argument("--runs", type=Path, default=Path("runs/compare"), help="run dirs root")
    parser.add_argument("overrides", nargs="*", help="key=value for all runs, method:key=value")
    return parser


def _parse(argv: list[str]) -> _Args:
    args = _parser().parse_args(argv)
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s]
    except ValueError:
        raise ConfigError(f"--seeds {args.seeds!r}: give comma-separated integers") from None
    per_method: dict[str, list[str]] = {}
    for o in args.overrides:
        if ":" in o.split("=", 1)[0]:
            method, rest = o.split(":", 1)
            per_method.setdefault(method, []).append(rest)
    return _Args(
        methods=[m for m in args.methods.split(",") if m],
        seeds=seeds,
        common=[o for o in args.overrides if ":" not in o.split("=", 1)[0]],
        per_method=per_method,
        out_root=args.runs / time.strftime("%Y%m%d-%H%M%S"),
        out=args.out,
        section=args.section,
        command="python -m distnoisy.compare " + shlex.join(argv),
    )


def _run(args: _Args) -> str:
    results = run_grid(args.methods, args.seeds, args.common, args.per_method, args.out_root)
    table = markdown_table(results, args.command)
    (args.out_root / "results.json").write_text(json.dumps(results, indent=2, default=str))
    if args.out:
        if args.section:
            write_section(args.out, args.section, table)
        else:
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(table)
    return table


def _interrupted(args: _Args | None) -> str:
    if args is None or not args.out_root.exists():
        return "distnoisy: compare interrupted before its first run started"
    return (
        f"distnoisy: compare interrupted; its runs are in {args.out_root} (a comparison does "
        "not resume: run the command again)"
    )


COMMAND = Command(
    usage=lambda: _parser().format_help(), parse=_parse, run=_run, interrupted=_interrupted
)


def main(argv: list[str] | None = None) -> int:
    """0 when every run finished (or ``--help``), 2 on bad input (one line), 130 when
    interrupted (the run in progress ends KILLED in MLflow)."""
    return run_command(COMMAND, argv)


if __name__ == "__main__":
    sys.exit(main())
