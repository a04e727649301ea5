"""What the benchmark scripts share: the common options, alternating timed repeats, the output.

Imported as ``from _common import ...``: a script run as ``python benchmarks/bench_x.py`` has its
own folder first on ``sys.path`` (as ``bench_sweep.py`` importing ``bench_engine`` relies on).
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from rich.console import Console
from rich.table import Table

from batchlab.engine.data import configure_threads


def parse_args(ap: argparse.ArgumentParser, *, repeats: int) -> tuple[argparse.Namespace, int]:
    """Add the options every benchmark takes (``--repeats``, ``--threads``: torch CPU threads,
    default 1, and ``--json``), parse the command line, configure torch's threads.

    Returns the options and the number of threads.
    """
    ap.add_argument("--repeats", type=int, default=repeats)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    return args, configure_threads(args.threads)


def int_list(text: str) -> list[int]:
    """``"32,256"`` -> ``[32, 256]``."""
    return [int(s) for s in text.split(",")]


def alternating_medians(repeats: int, *runs: Callable[[int], float]) -> list[float]:
    """Median of each timed run over ``repeats`` rounds; in each round every run goes once, in
    turn, so all share the machine's noise. A run gets the round number (e.g. as its seed)."""
    times: list[list[float]] = [[] for _ in runs]
    for r in range(repeats):
        for measured, run in zip(times, runs, strict=True):
            measured.append(run(r))
    return [statistics.median(measured) for measured in times]


def print_json(out: dict[str, Any]) -> None:
    """The whole result as one indented JSON object (``--json``)."""
    print(json.dumps(out, indent=2))


def print_table(
    title: str,
    columns: Sequence[str],
    rows: Iterable[Sequence[str]],
    *,
    left: Sequence[str] = (),
    width: int | None = None,
) -> None:
    """A rich table on stdout: the ``left`` columns left-justified, the others (numbers) right."""
    table = Table(title=title)
    for name in columns:
        table.add_column(name, justify="left" if name in left else "right")
    for row in rows:
        table.add_row(*row)
    Console(width=width).print(table)
