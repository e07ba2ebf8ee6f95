"""``python -m distnoisy.tune SPACE.yaml [key=value ...] [--out DIR] [--resume]``: a Ray Tune sweep.

The command line; see :mod:`distnoisy.tune` for the search space file.
"""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

from distnoisy.config import keys_help
from distnoisy.driver.cli import ArgumentParser, Command, run_command
from distnoisy.tune.run import format_report, run_sweep


def _description() -> str:
    """The package docstring (what a sweep does, the space file) as plain text."""
    import distnoisy.tune

    paragraphs = (distnoisy.tune.__doc__ or "").strip().split("\n\n")[1:-1]  # not the modules
    text = "Run a Ray Tune sweep of distnoisy training runs.\n\n" + "\n\n".join(paragraphs)
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "").replace("::", ":")


def _parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="python -m distnoisy.tune",
        description=_description(),
        epilog=keys_help(config_files=False),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("space", type=Path, help="search space YAML (see tune_spaces/)")
    parser.add_argument("overrides", nargs="*", help="key=value: base config or sweep keys")
    parser.add_argument("--out", type=Path, help="sweep directory (default runs/tune/<space>)")
    parser.add_argument(
        "--resume", action="store_true", help="continue the sweep in --out; finished trials stay"
    )
    return parser


def _run(args: argparse.Namespace) -> str:
    return format_report(run_sweep(args.space, args.overrides, args.out, args.resume))


def _interrupted(args: argparse.Namespace | None) -> str:
    if args is None:
        return "distnoisy: interrupted before the sweep started; there is nothing to resume"
    out = f" --out {shlex.quote(str(args.out))}" if args.out else ""
    space = shlex.quote(str(args.space))
    return (
        "distnoisy: sweep interrupted; continue it with: python -m distnoisy.tune "
        f"{space} --resume{out}"
    )


COMMAND = Command(
    usage=lambda: _parser().format_help(),
    parse=lambda argv: _parser().parse_intermixed_args(argv),
    run=_run,
    interrupted=_interrupted,
)


def main(argv: list[str] | None = None) -> int:
    """0 when the sweep finished (or ``--help``), 2 on bad input (one line), 130 when
    interrupted (SIGTERM too: the sweep ends like Ctrl-C, resumable)."""
    return run_command(COMMAND, argv)
