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
import sys
import time
from pathlib import Path

from distnoisy.analyze.config import AnalyzeConfig, load_analyze_config
from distnoisy.analyze.pipeline import Analysis, analyse
from distnoisy.analyze.report import write_outputs
from distnoisy.core.errors import DistnoisyError

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


def track(cfg: AnalyzeConfig, result: Analysis, out_dir: Path, paths: list[Path]) -> str | None:
    """An MLflow run of its own: the per-bucket figures, the files, links to the runs."""
    from distnoisy import tracking

    if not cfg.tracking.enabled:
        return None
    uri = cfg.tracking.uri or tracking.default_tracking_uri()
    ids = {label: rid for label, rid in result.run_ids.items() if rid}
    tags = {
        "distnoisy.kind": "analysis",
        "distnoisy.output_dir": str(out_dir),
        "distnoisy.analyzed_runs": ",".join(ids.values()),
        **{
            f"distnoisy.analyzed.{i}": f"{label}={rid}"
            for i, (label, rid) in enumerate(ids.items())
        },
    }
    params = {"dataset": result.dataset, "runs": ",".join(cfg.run), "reference": cfg.reference}
    params.update({f"analysis.{k}": v for k, v in vars(cfg.analysis).items()})
    run_id = tracking.start_run(uri, cfg.tracking.experiment, out_dir.name, params, tags=tags)
    status = "FAILED"
    try:
        metrics = {}
        for i, label in enumerate(result.labels):
            for row in result.rows[label]:
                for key in ("test_acc", "memorized", "excess_error"):
                    if row.get(key) is not None and row[key] == row[key]:  # not NaN
                        metrics[f"run{i}.{key}.bucket{row['bucket']}"] = row[key]
        tracking.RunLogger(uri, run_id, 0).log_metrics(metrics, step=0)
        tracking.log_artifacts(uri, run_id, paths)
        status = "FINISHED"
    finally:
        tracking.end_run(uri, run_id, status)
    return run_id


def main(argv: list[str] | None = None) -> int:
    from distnoisy.driver.cli import setup_cli

    setup_cli()
    parser = argparse.ArgumentParser(
        prog="python -m distnoisy.analyze",
        description=__doc__.replace("``", ""),
        epilog=KEYS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("overrides", nargs="*", help="key=value (see keys below)")
    parser.add_argument("--config", action="append", default=[], help="YAML file of keys")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        argv_cfg = [a for f in args.config for a in ("--config", f)] + args.overrides
        cfg = load_analyze_config(argv_cfg)
        result = analyse(cfg)  # every input check happens in here, before anything is written
        out_dir = Path(cfg.output_dir or f"analyses/{time.strftime('%Y%m%d-%H%M%S')}")
        paths = write_outputs(result, out_dir)
        run_id = track(cfg, result, out_dir, paths)
    except DistnoisyError as e:
        print(f"distnoisy: error: {e}", file=sys.stderr)
        return 2
    print((out_dir / "analysis.md").read_text())
    where = f"; MLflow run {run_id}" if run_id else ""
    print(f"analysis of {len(cfg.run)} run(s) written to {out_dir}{where}")
    logging.getLogger("distnoisy").debug("done")
    return 0
