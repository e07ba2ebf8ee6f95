"""``python -m distnoisy.tune SPACE.yaml [key=value ...] [--out DIR] [--resume]``: a Ray Tune sweep.

The command line; see :mod:`distnoisy.tune` for the search space file.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

from distnoisy.config import keys_help
from distnoisy.core.errors import DistnoisyError
from distnoisy.tune.run import format_report, run_sweep


def _description() -> str:
    """The package docstring (what a sweep does, the space file) as plain text."""
    import distnoisy.tune

    paragraphs = (distnoisy.tune.__doc__ or "").strip().split("\n\n")[1:-1]  # not the modules
    text = "Run a Ray Tune sweep of distnoisy training runs.\n\n" + "\n\n".join(paragraphs)
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "").replace("::", ":")


def main(argv: list[str] | None = None) -> int:
    from distnoisy.driver.cli import setup_cli

    setup_cli()  # SIGTERM -> KeyboardInterrupt: the sweep ends like Ctrl-C, resumable
    parser = argparse.ArgumentParser(
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
    args = parser.parse_intermixed_args(sys.argv[1:] if argv is None else argv)
    try:
        report = run_sweep(args.space, args.overrides, args.out, args.resume)
    except DistnoisyError as e:
        print(f"distnoisy: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(
            f"distnoisy: sweep interrupted; continue it with: python -m distnoisy.tune "
            f"{args.space} --resume" + (f" --out {args.out}" if args.out else ""),
            file=sys.stderr,
        )
        return 130
    print(format_report(report))
    return 0
