"""``python -m distnoisy.analyze run=[RUN, RUN, ...] [reference=RUN] [key=value ...]``.

Instance-level noise analysis of finished runs (docs/analysis.md): every training and test
sample gets a frequency score (k-NN density in a feature space), samples are bucketed by
frequency quantile, and per bucket and run the command reports the clean test accuracy, the
memorisation of corrupted training labels (from the per-sample prediction history), the test
confidence and, against a clean-label reference run, the excess test error caused by noise.

Writes analysis.md, analysis.csv and analysis.png to output_dir (default
analyses/<timestamp>) and logs them to an MLflow run of their own whose tags link the analysed
runs (distnoisy.analyzed_runs).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from distnoisy.analyze.config import AnalyzeConfig, load_analyze_config
from distnoisy.analyze.pipeline import Analysis, Inputs, analyse, check_inputs
from distnoisy.analyze.report import write_outputs
from distnoisy.driver.cli import ArgumentParser, Command, run_command
from distnoisy.driver.summary import tracked_where

log = logging.getLogger("distnoisy.analyze")

KEYS_HELP = """keys:
  run=[A,B,...]              runs to compare: output directories or MLflow run ids
  reference=R                the same job on clean labels (noise.kind=none): excess error
  analysis.frequency=knn     knn (k-NN density) or subpopulation (data.name=longtail: the truth)
  analysis.k=10              neighbours of the k-NN density
  analysis.metric=cosine     cosine or l2 (on unit-normalised features)
  analysis.buckets=5         frequency quantile buckets (0 = rarest)
  analysis.features_from=reference  reference (else the first run), self, pixels, or a run
  analysis.num_workers=1     Ray tasks for the k-NN search of large sets
  analysis.search=auto       exact, ivf (approximate), auto (exact up to 50,000 training rows)
  analysis.probes=16         ivf: lists searched per query list
  tracking.enabled=true tracking.uri=... tracking.experiment=distnoisy-analysis
  output_dir=DIR             default analyses/<timestamp>
"""


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m distnoisy.analyze",
        description=(__doc__ or "").replace("``", ""),
        epilog=KEYS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="key=value (see keys below)")
    parser.add_argument("--config", action="append", default=[], help="YAML file of keys")
    return parser


def _parse(argv: list[str]) -> AnalyzeConfig:
    args = _parser().parse_args(argv)
    return load_analyze_config([a for f in args.config for a in ("--config", f)] + args.overrides)


def analyse_tracked(cfg: AnalyzeConfig) -> tuple[Analysis, Path, str | None]:
    """Check the inputs, then analyse, write the outputs and log them, all inside the
    analysis's own MLflow run (opened once the inputs are checked: bad input creates none).

    Returns
    -------
    tuple
        The analysis, its output directory and its MLflow run id (None when not tracked).
    """
    from distnoisy import tracking
    from distnoisy.tracking.lifecycle import tracked_run

    inputs = check_inputs(cfg)  # every input check, before anything is computed or written
    out_dir = Path(cfg.output_dir or f"analyses/{time.strftime('%Y%m%d-%H%M%S')}")
    uri = cfg.tracking.uri or tracking.default_tracking_uri()
    with tracked_run(
        uri if cfg.tracking.enabled else None,
        cfg.tracking.experiment,
        out_dir.name,
        _params(cfg, inputs),
        tags=_tags(inputs, out_dir),
        source="python -m distnoisy.analyze",
    ) as run_id:
        log.info("analysing %d run(s) into %s%s", len(cfg.run), out_dir, tracked_where(run_id))
        result = analyse(cfg, inputs)
        paths = write_outputs(result, out_dir)
        if run_id is not None:
            tracking.RunLogger(uri, run_id, 0).log_metrics(_bucket_metrics(result), step=0)
            tracking.log_artifacts(uri, run_id, paths)
    return result, out_dir, run_id


def _run(cfg: AnalyzeConfig) -> str:
    _, out_dir, run_id = analyse_tracked(cfg)
    where = tracked_where(run_id)
    return (
        out_dir / "analysis.md"
    ).read_text() + f"\nanalysis of {len(cfg.run)} run(s) written to {out_dir}{where}"


def _params(cfg: AnalyzeConfig, inputs: Inputs) -> dict[str, Any]:
    params = {
        "dataset": inputs.runs[0].config.data.name,
        "runs": ",".join(cfg.run),
        "reference": cfg.reference,
    }
    params.update({f"analysis.{k}": v for k, v in vars(cfg.analysis).items()})
    return params


def _tags(inputs: Inputs, out_dir: Path) -> dict[str, str]:
    """The run's kind and output directory, and links to the analysed runs."""
    ids = {label: rid for label, rid in inputs.run_ids.items() if rid}
    return {
        "distnoisy.kind": "analysis",
        "distnoisy.output_dir": str(out_dir),
        "distnoisy.analyzed_runs": ",".join(ids.values()),
        **{
            f"distnoisy.analyzed.{i}": f"{label}={rid}"
            for i, (label, rid) in enumerate(ids.items())
        },
    }


def _bucket_metrics(result: Analysis) -> dict[str, float]:
    """``run<i>.<figure>.bucket<b>``: the per-bucket figures of every run (NaN left out)."""
    metrics = {}
    for i, label in enumerate(result.labels):
        for row in result.rows[label]:
            for key in ("test_acc", "memorized", "excess_error"):
                if row.get(key) is not None and row[key] == row[key]:  # not NaN
                    metrics[f"run{i}.{key}.bucket{row['bucket']}"] = row[key]
    return metrics


def _interrupted(cfg: AnalyzeConfig | None) -> str:
    return "distnoisy: analyze interrupted; an analysis does not resume: run the command again"


COMMAND = Command(
    usage=lambda: _parser().format_help(),
    parse=_parse,
    run=_run,
    interrupted=_interrupted,
)


def main(argv: list[str] | None = None) -> int:
    """0 on success or ``--help``, 2 on bad input (one line), 130 when interrupted."""
    return run_command(COMMAND, argv)
