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

from distnoisy.config import Config, keys_help
from distnoisy.driver.cli import Command, interrupted_message, run_command
from distnoisy.driver.run import train
from distnoisy.driver.summary import format_summary
from distnoisy.driver.validate import load_run_config, resolve_run_dir

__all__ = ["main", "train"]


def usage() -> str:
    """The ``--help`` text of ``python -m distnoisy.train``: every key with its default."""
    from distnoisy.driver.config_help import run_keys_help

    return (
        "usage: python -m distnoisy.train [--config FILE.yaml ...] [key=value ...]\n\n"
        "Train one model on labels with noise and write its run directory (config.yaml,\n"
        "summary.json, label_issues.parquet, sample_stats.parquet, weights.pt, checkpoints).\n"
        "With no arguments: ELR on scikit-learn's digits with 40% symmetric label noise, 2 Ray\n"
        "Train workers on a local Ray cluster, tracked in ./mlflow.db.\n\n"
        f"{keys_help(keys_below=True)}\n\n"
        f"{run_keys_help()}\n\n"
        "Continue a stopped run with: python -m distnoisy.train output_dir=RUN resume=true\n"
        "List the models (built-in and timm/<name>): python -m distnoisy.train --list-models "
        "'*convnext*'\n"
    )


def _parse(args: list[str]) -> tuple[Config, Path]:
    cfg = load_run_config(args)
    return cfg, resolve_run_dir(cfg)


def _run(parsed: tuple[Config, Path]) -> str:
    cfg, run_dir = parsed
    return format_summary(train(cfg, run_dir=run_dir))


def _interrupted(parsed: tuple[Config, Path] | None) -> str:
    return interrupted_message(parsed[1] if parsed is not None else None)


COMMAND = Command(usage=usage, parse=_parse, run=_run, interrupted=_interrupted)


def list_models(pattern: str) -> str:
    """The text of ``--list-models PATTERN``: built-in and ``timm/<name>`` model names."""
    from distnoisy.models.timm_models import list_models as matching

    builtin, timm_names = matching(pattern)
    lines = [f"{n}" for n in builtin]
    if timm_names is None:
        lines.append("(timm models: not installed; pip install -e '.[timm]')")
    else:
        lines += timm_names
    if not builtin and not timm_names:
        lines.append(f"(no model matches {pattern!r}; patterns are shell-style, e.g. '*resnet*')")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Run ``python -m distnoisy.train ARGS``; returns the exit code.

    0 when the run finished (or for ``--help`` and ``--list-models [PATTERN]``), 2 for bad
    input (one ``distnoisy: error:`` line), 130 when interrupted (Ctrl-C, SIGTERM).
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if args and args[0] == "--list-models" and len(args) <= 2:
        print(list_models(args[1] if len(args) == 2 else "*"))
        return 0
    return run_command(COMMAND, args)


if __name__ == "__main__":
    sys.exit(main())
