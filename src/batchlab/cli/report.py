"""``batchlab report`` (HTML page + figures) and ``batchlab summary`` (key numbers in the terminal).

Both read the store read-only: a missing or foreign file is one ``error: db: ...`` line, exit 2.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from batchlab.cli._app import (
    DEFAULT_DB,
    DbOpt,
    app,
    check_out_folder,
    console,
    emit_json,
    fail,
    fail_on,
)
from batchlab.cli.store import open_store
from batchlab.engine.spec import SpecError
from batchlab.sweep.store import StoreError

if TYPE_CHECKING:  # the analysis loads when a command runs, keeping `batchlab --help` quick
    from batchlab.analysis import StudyAnalysis, Target

StudyOpt = Annotated[
    str | None, typer.Option("--study", help="Study to analyse (default: the store's only study).")
]
TargetOpt = Annotated[
    str | None,
    typer.Option(
        "--target", help="Override the study's target, e.g. val_metric=0.9 or val_loss=0.3."
    ),
]


def _target(text: str | None) -> Target | None:
    """``METRIC=VALUE`` -> ``Target`` (None when not given)."""
    from batchlab.analysis import Target

    if text is None:
        return None
    metric, sep, value = text.partition("=")
    if not sep:
        fail("target", f"expected METRIC=VALUE, got {text!r}")
    try:
        number = float(value)
    except ValueError:
        fail("target", f"value must be a number, got {value!r}")
    try:
        return Target(metric.strip(), number)
    except SpecError as exc:
        fail_on(exc)


def _analysis(db: Path, study: str | None, target: str | None) -> StudyAnalysis:
    from batchlab.analysis import analyze

    goal = _target(target)
    try:
        with open_store(db) as store:
            return analyze(store, study, target=goal)
    except (StoreError, SpecError) as exc:
        fail_on(exc)


@app.command("report")
def report_command(
    db: DbOpt = DEFAULT_DB,
    out: Path = typer.Option(Path("report"), "--out", help="Folder for index.html and figures/."),
    study: StudyOpt = None,
    target: TargetOpt = None,
    as_json: bool = typer.Option(False, "--json", help='Print {"index": ..., "figures": [...]}.'),
) -> None:
    """Write a self-contained HTML report of a study (figures embedded, also saved as PNG/SVG)."""
    from batchlab.report import write_report

    check_out_folder(out)
    analysis = _analysis(db, study, target)
    with console.status("drawing figures"):
        try:
            page = write_report(analysis, out)
        except OSError as exc:
            fail("out", f"cannot write in '{out}': {exc.strerror or exc}")
    figures = sorted(str(p) for p in (page.parent / "figures").glob("*.png"))
    if as_json:
        emit_json({"index": str(page), "figures": figures})
        return
    _stdout().print(
        f"report written to {page} ({len(figures)} figures, PNG and SVG in {page.parent / 'figures'})",
        markup=False,
    )


def _stdout() -> Console:
    """Console on stdout; a file or pipe gets whole lines, never wrapped or truncated."""
    out = Console()
    return out if out.is_terminal else Console(width=10_000)


def _key_table(a: StudyAnalysis) -> Table:
    t = Table(
        title=escape(f"study {a.study or '(all runs)'}"), show_header=False, box=box.SIMPLE_HEAD
    )
    facts = dict(a.facts())
    for name, value in [*((k, facts[k]) for k in ("task", "runs", "target")), *a.key_numbers()]:
        t.add_row(name, escape(value))
    return t


def _batch_table(a: StudyAnalysis) -> Table:
    from batchlab.analysis.summary import fmt

    t = Table(title="per batch size", box=box.SIMPLE_HEAD)
    columns = (
        "B",
        "best lr",
        "steps to target",
        "samples",
        "speed-up",
        "efficiency",
        "region",
        "gap (eq. epochs)",
        "diverged",
    )
    for name in columns:
        t.add_column(name, justify="left" if name == "region" else "right")
    best = {r.batch_size: r for r in (a.best_lr.rows if a.best_lr else ())}
    reach = {r.batch_size: r for r in a.to_target}
    cost = {r.batch_size: r for r in a.cost}
    gap = {r.batch_size: r for r in (a.gap_epochs.rows if a.gap_epochs else ())}
    regions = dict(a.scaling.regions) if a.scaling else {}
    for b in a.batch_sizes:
        t.add_row(
            str(b),
            fmt(best[b].lr) if b in best else "-",
            fmt(reach[b].steps) if b in reach else "-",
            fmt(reach[b].samples) if b in reach else "-",
            fmt(cost[b].speedup) if b in cost else "-",
            fmt(cost[b].efficiency, 2) if b in cost else "-",
            regions.get(b, "-").replace("_", " "),
            fmt(gap[b].gap_loss) if b in gap else "-",
            str(sum(r.batch_size == b and r.status == "diverged" for r in a.unfinished)),
        )
    return t


@app.command("summary")
def summary_command(
    db: DbOpt = DEFAULT_DB,
    study: StudyOpt = None,
    target: TargetOpt = None,
    as_json: bool = typer.Option(False, "--json", help="Print every table as one JSON object."),
) -> None:
    """Print a study's key numbers: critical batch size, lr exponent, cost per batch size."""
    a = _analysis(db, study, target)
    if as_json:
        emit_json(a.to_dict())
        return
    out = _stdout()
    out.print(_key_table(a))
    out.print(_batch_table(a))
