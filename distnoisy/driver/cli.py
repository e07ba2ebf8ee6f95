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
import contextlib
import logging
import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, NoReturn, TextIO, TypeVar

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


class _Diverted:
    """A text stream that writes to ``terminal`` until ``stopped`` is set, then to ``log``."""

    def __init__(self, terminal: TextIO, log: TextIO, stopped: threading.Event) -> None:
        self._terminal, self._log, self._stopped = terminal, log, stopped

    def write(self, text: str) -> int:
        return (self._log if self._stopped.is_set() else self._terminal).write(text)

    def flush(self) -> None:
        self._terminal.flush()
        self._log.flush()

    def __getattr__(self, name: str) -> Any:  # fileno, isatty, encoding: the terminal's
        return getattr(self._terminal, name)


@contextlib.contextmanager
def teardown_output_to(log_path: Path) -> Iterator[threading.Event]:
    """What this process prints after a Ctrl-C or SIGTERM, inside the block, goes to
    ``log_path`` instead of the terminal; yields the event set when that signal came.

    A stopped sweep tears its trials down inside Ray Tune's ``fit()``, and Ray forwards what its
    actors print meanwhile (a Train controller whose workers went first prints a traceback) to
    this process's ``sys.stdout``/``sys.stderr``: the user's terminal would show Ray's teardown
    above the one line that says how to continue. The signal is seen through
    :func:`signal.set_wakeup_fd`, which reports every signal whatever handler runs (Tune
    replaces SIGINT's during ``fit()``). Outside the main thread, or where another wakeup fd is
    set, output is left as it is (the event is then never set).
    """
    stopped = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stopped
        return
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    previous = signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    if previous != -1:  # someone else's (an event loop's): keep theirs
        signal.set_wakeup_fd(previous)
        os.close(read_end)
        os.close(write_end)
        yield stopped
        return

    def watch() -> None:
        while data := os.read(read_end, 64):  # b"" once the write end is closed
            if {signal.SIGINT, signal.SIGTERM} & set(data):
                stopped.set()

    watcher = threading.Thread(target=watch, name="distnoisy-teardown-watch", daemon=True)
    watcher.start()
    terminal = sys.stdout, sys.stderr
    with open(log_path, "a") as log:
        sys.stdout, sys.stderr = (_Diverted(t, log, stopped) for t in terminal)  # type: ignore[assignment]
        try:
            yield stopped
        finally:
            sys.stdout, sys.stderr = terminal
            signal.set_wakeup_fd(-1)
            os.close(write_end)
            watcher.join(timeout=5)
            os.close(read_end)


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


def _leave_ray() -> None:
    """Where Ray ran, leave it before the last line: until then its log lines (a worker's epoch
    line, a controller's traceback) may still arrive and be printed after that line."""
    if "distnoisy.launch.cluster" in sys.modules:
        from distnoisy.launch.cluster import leave_ray

        leave_ray()


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
        _leave_ray()
        print(f"distnoisy: error: {e}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, SystemExit):
        # Ctrl-C, SIGTERM (setup_cli), or Ray's handlers (SIGTERM: sys.exit(15); Ray Train
        # aborts on SIGINT and the driver sees SystemExit).
        _leave_ray()
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
