"""Ctrl-C in the command line: the first stops the command cleanly, a second exits at once.

Every command arms the handler when it starts (the app callback in ``_app``). The first Ctrl-C
(SIGINT) raises ``KeyboardInterrupt`` where the work is: the sweep runner drops the units in training
and stops its workers, what is stored stays stored (one transaction per unit), and a long command
(``stop_on_ctrl_c``) prints what it kept and the command that goes on, then exits 130. A second
Ctrl-C while that happens exits 130 at once: every committed run is still in the store (SQLite's WAL
ignores a transaction that never committed) and process-pool workers die with the driver.

The handler replaces an inherited "ignore SIGINT" too: a POSIX shell ignores SIGINT for ``cmd &`` in
a script, which is why Ctrl-C once seemed to do nothing. ``setsid batchlab ...`` keeps a background
command out of reach of the terminal's Ctrl-C.
"""

from __future__ import annotations

import os
import shlex
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import typer

EXIT_INTERRUPTED = 130
"""Exit code after Ctrl-C: 128 + SIGINT, what shells report for a command stopped by it."""


def _first(signum: int, frame: FrameType | None) -> None:
    """First Ctrl-C: arm the second, then stop the work where it is."""
    signal.signal(signal.SIGINT, _second)
    raise KeyboardInterrupt


def _second(signum: int, frame: FrameType | None) -> None:
    """Second Ctrl-C: exit now (raw writes: this may run in the middle of another print)."""
    if sys.stderr.isatty():
        os.write(2, b"\x1b[?25h")  # a progress bar hides the cursor: show it again
    os.write(2, b"\ninterrupted again: stopped at once; every run stored so far is kept\n")
    os._exit(EXIT_INTERRUPTED)


def arm() -> Callable[[], None]:
    """Install the Ctrl-C handler (main thread only); returns what puts the previous one back.

    The returned function leaves an armed second Ctrl-C in place: after a first one the process is
    on its way out, and a second must still stop it at once.
    """
    if threading.current_thread() is not threading.main_thread():
        return lambda: None
    previous = signal.signal(signal.SIGINT, _first)

    def disarm() -> None:
        if signal.getsignal(signal.SIGINT) is _first:
            signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)

    return disarm


def rerun_command() -> str:
    """The command line this process was started with, as ``batchlab ...``, quoted for a shell."""
    return shlex.join(["batchlab", *sys.argv[1:]])


@contextmanager
def stop_on_ctrl_c(kept: Callable[[], str], then: str = "resume") -> Iterator[None]:
    """Ctrl-C inside the block ends the command: ``interrupted: <kept()>``, ``<then>: <command>``
    on stderr, exit code 130. ``kept`` says what is stored; it runs after the block's cleanup."""
    try:
        yield
    except KeyboardInterrupt:
        typer.echo(f"interrupted: {kept()}", err=True)
        typer.echo(f"{then}: {rerun_command()}", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None


def finished_runs(db: Path, study: str | None = None) -> set[str]:
    """Ids of the runs stored as finished in ``db`` (of ``study``); none when there is no file."""
    from batchlab.sweep.store import Store

    if not db.is_file():
        return set()
    with Store(db, readonly=True) as store:
        return store.finished_ids(study)
