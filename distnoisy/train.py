"""``python -m distnoisy.train [--config FILE.yaml] [key=value ...]``: one training run.

With no arguments it trains ELR on scikit-learn's digits with 40% symmetric label noise, on a
local Ray cluster with 2 CPU workers, tracked in ``./mlflow.db``. Outputs go to ``output_dir``
(default ``runs/<name or timestamp>``): ``config.yaml``, ``summary.json``,
``label_issues.parquet``, ``sample_stats.parquet``. The run itself is
:func:`distnoisy.driver.run.train`, importable from here.
"""

from __future__ import annotations

import sys
from pathlib import Path

from distnoisy.config import keys_help
from distnoisy.core.errors import DistnoisyError
from distnoisy.driver.cli import interrupted_message, setup_cli
from distnoisy.driver.run import train
from distnoisy.driver.summary import format_summary
from distnoisy.driver.validate import load_run_config, resolve_run_dir

__all__ = ["main", "train"]


def usage() -> str:
    """The ``--help`` text of ``python -m distnoisy.train``."""
    return (
        "usage: python -m distnoisy.train [--config FILE.yaml ...] [key=value ...]\n\n"
        "Train one model on labels with noise and write its run directory (config.yaml,\n"
        "summary.json, label_issues.parquet, sample_stats.parquet, weights.pt, checkpoints).\n"
        "With no arguments: ELR on scikit-learn's digits with 40% symmetric label noise, 2 Ray\n"
        "Train workers on a local Ray cluster, tracked in ./mlflow.db.\n\n"
        f"{keys_help()}\n\n"
        "Continue a stopped run with: python -m distnoisy.train output_dir=RUN resume=true\n"
    )


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m distnoisy.train ARGS``; returns the exit code.

    0 when the run finished (or for ``--help``), 2 for bad input (one ``distnoisy: error:``
    line), 130 when interrupted (Ctrl-C, SIGTERM).
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if "-h" in args or "--help" in args:
        print(usage(), end="")
        return 0
    setup_cli()
    run_dir: Path | None = None
    try:
        cfg = load_run_config(args)
        run_dir = resolve_run_dir(cfg)
        summary = train(cfg, run_dir=run_dir)
    except DistnoisyError as e:
        print(f"distnoisy: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):
        # Ray's handlers turn a signal into SystemExit (SIGTERM: sys.exit(15)) once it runs.
        print(interrupted_message(run_dir), file=sys.stderr)
        return 130
    print(format_summary(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
