"""What every command-line entry point shares: one :func:`run_command` wrapper around a
:class:`Command` (logging, signals, ``--help``, the bad-input line, the interrupt line).

The five commands (``train``, ``tune``, ``posttrain``, ``analyze``, ``compare``) end the same
way:

- ``--help``: the command's help on stdout, exit 0, nothing written;
- bad input (:class:`~distnoisy.core.errors.DistnoisyError`, a bad argument): one line
  ``distnoisy: error: ...`` on stderr, exit 2;
- Ctrl-C or SIGTERM: one line on stderr (the command that resumes the work, where there is
  one), exit 130, no traceback; the command's MLflow run ends KILLED
  (:func:`distnoisy.tracking.lifecycle.tracked_run`).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, NoReturn, TypeVar

from distnoisy.core.errors import ConfigError, DistnoisyError

T = TypeVar("T")


def _terminate_as_interrupt(signum: int, frame: Any) -> None:
    # SIGTERM (ray job stop, Kubernetes, a scheduler's time limit) becomes KeyboardInterrupt, so
    # the run is marked KILLED in MLflow instead of being left RUNNING.
    raise KeyboardInterrupt(f"signal {signum}")


def setup_cli() -> None:
    """Logging and signal handling of the command-line drivers (:func:`run_command` calls it)."""
    import pyarrow

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    # pyarrow cancels a read on SIGINT/SIGTERM with its own handler and sends the signal again
    # afterwards; a signal that arrives in a read could then reach the process a second time,
    # after the command had printed its line, and kill it (exit -2 instead of 130). Python's
    # handler alone raises KeyboardInterrupt once the read returns.
    pyarrow.enable_signal_handlers(False)
    for noisy in ("mlflow", "alembic", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def interrupted_message(run_dir: Path | None) -> str:
    """The line printed on Ctrl-C or SIGTERM: the command that resumes this run, if any."""
    if run_dir is None or not (run_dir / "run.json").exists():
        return "distnoisy: interrupted before the run started; there is nothing to resume"
    arg = shlex.quote(f"output_dir={run_dir}")
    return f"distnoisy: interrupted; resume with: python -m distnoisy.train {arg} resume=true"


class ArgumentParser(argparse.ArgumentParser):
    """argparse with the commands' bad-input convention: a bad argument is a
    :class:`ConfigError` (one ``distnoisy: error:`` line, exit 2), not argparse's usage block."""

    def error(self, message: str) -> NoReturn:
        raise ConfigError(f"{message}; see {self.prog} --help")


@dataclass(frozen=True)
class Command(Generic[T]):
    """One command line, as :func:`run_command` runs it.

    Attributes
    ----------
    usage
        The ``--help`` text.
    parse
        ``argv -> input``: the parsed (and checked) arguments; raises ``DistnoisyError``.
    run
        ``input -> text``: does the work; the text is printed on stdout when it finishes.
    interrupted
        ``input or None -> line``: what to print when Ctrl-C or SIGTERM stops the command
        (None: it stopped while parsing).
    """

    usage: Callable[[], str]
    parse: Callable[[list[str]], T]
    run: Callable[[T], str]
    interrupted: Callable[[T | None], str]


def run_command(command: Command[Any], argv: list[str] | None = None) -> int:
    """Run ``command`` on ``argv`` (default ``sys.argv[1:]``); returns the exit code.

    0 when it finished (or for ``--help``), 2 for bad input (one ``distnoisy: error:`` line),
    130 when interrupted by Ctrl-C or SIGTERM (one line, no traceback).
    """
    args = sys.argv[1:] if argv is None else list(argv)
    if "-h" in args or "--help" in args:
        text = command.usage()
        print(text, end="" if text.endswith("\n") else "\n")
        return 0
    setup_cli()
    parsed = None
    try:
        parsed = command.parse(args)
        text = command.run(parsed)
    except DistnoisyError as e:
        print(f"distnoisy: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C, SIGTERM (setup_cli), or Ray's handlers (SIGTERM: sys.exit(15); Ray Train
        # aborts on SIGINT and the driver sees SystemExit).
        print(command.interrupted(parsed), file=sys.stderr)
        # Done: the line is printed and the MLflow run ended KILLED. A SIGINT that reaches the
        # process while the interpreter tears down (seconds with torch and MLflow loaded) would
        # otherwise kill it by the signal (exit -2, not 130): seen once the handler had been
        # reset by finalization.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        return 130
    if text:
        print(text)
    return 0
