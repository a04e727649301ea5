"""``batchlab runs`` and ``batchlab export``: read a store (never create one).

Both open the database read-only, so a missing or foreign file is one ``error: db: ...`` line
and exit code 2, and a sweep writing to the same file meanwhile is not disturbed (WAL). A run whose
row cannot be decoded is one ``warning: run <id>: <field>: ...; skipped`` line; the others are read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from batchlab.cli._app import DEFAULT_DB, DbOpt, app, check_out_folder, emit_json, fail, fail_on
from batchlab.sweep.store import Damage, RunRecord, Store, StoreError, StudyInfo

StudyOpt = Annotated[str | None, typer.Option("--study", help="Only the runs of this study.")]
_GRID_KEYS = ("task", "batch_size", "lr", "seed", "optimizer", "budget_unit", "budget")


def _run_json(record: RunRecord, study: str | None) -> dict[str, Any]:
    """A run for ``--json``: the grid coordinates first, then every stored field."""
    row = record.to_dict()
    first = record.studies[0] if record.studies else None
    head = {"id": record.id, "study": study if study is not None else first}
    head.update((k, row["spec"][k]) for k in _GRID_KEYS)
    return head | row


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _table(title: str, rows: list[Any], columns: dict[str, Callable[[Any], str]]) -> Table:
    """A compact rich table (fits 80 columns): text columns left, numbers right; every cell is
    shown as it is (a study named ``mk[/red]`` is not rich markup)."""
    table = Table(
        title=escape(title),
        box=box.SIMPLE_HEAD,
        pad_edge=False,
        show_edge=False,
        collapse_padding=True,
    )
    for name in columns:
        left = name in ("id", "study", "task", "status", "created")
        table.add_column(name, justify="left" if left else "right", no_wrap=name == "id")
    for row in rows:
        table.add_row(*(escape(cell(row)) for cell in columns.values()))
    return table


def _studies_table(db: Path, infos: list[StudyInfo]) -> Table:
    return _table(
        f"studies in {db}",
        infos,
        {
            "study": lambda s: s.name,
            "runs": lambda s: str(s.n_runs),
            "ok": lambda s: str(s.n_ok),
            "diverged": lambda s: str(s.n_diverged),
            "failed": lambda s: str(s.n_failed),
            "created": lambda s: s.created_at[:19],
        },
    )


def _runs_table(records: list[RunRecord], study: str | None) -> Table:
    """Runs as a table; a study or task shared by every run goes in the title, not a column."""
    labels = {r.id: study or ",".join(r.studies) or "-" for r in records}
    columns: dict[str, Callable[[RunRecord], str]] = {"id": lambda r: r.id}
    title = [f"{len(records)} runs"]
    shared: dict[str, Callable[[RunRecord], str]] = {
        "study": lambda r: labels[r.id],
        "task": lambda r: r.task,
    }
    for name, value in shared.items():
        distinct = {value(r) for r in records}
        if len(distinct) == 1:
            title.append(f"{name} {distinct.pop()}")
        else:
            columns[name] = value
    columns.update(
        {
            "status": lambda r: r.status,
            "B": lambda r: str(r.batch_size),
            "lr": lambda r: f"{r.lr:g}",
            "seed": lambda r: str(r.seed),
            "steps": lambda r: str(r.steps),
            "val_loss": lambda r: _num(r.final.get("val_loss")),
            "val_metric": lambda r: _num(r.final.get("val_metric")),
            "wall_s": lambda r: f"{r.wall_s:.1f}",
        }
    )
    return _table(", ".join(title), records, columns)


def warn_damaged(damage: Damage) -> None:
    """One ``warning:`` line on stderr for a stored row that cannot be read (the rest go on)."""
    typer.echo(f"warning: {damage}; skipped", err=True)


def open_store(db: Path) -> Store:
    """The store at ``db`` read-only, damaged rows warned about; a StoreError is one line, exit 2."""
    try:
        return Store(db, readonly=True, on_damage=warn_damaged)
    except StoreError as exc:
        fail_on(exc)


@contextmanager
def _reading(db: Path, study: str | None) -> Iterator[Store]:
    """The store at ``db`` opened read-only, ``study`` checked; a StoreError is the one-line error."""
    store = open_store(db)
    try:
        with store:
            names = [s.name for s in store.studies()]
            if study is not None and study not in names:
                known = ", ".join(names) or "none"
                fail("study", f"no study {study!r} in '{db}'; studies: {known}")
            yield store
    except StoreError as exc:
        fail_on(exc)


@app.command("runs")
def runs_command(
    db: DbOpt = DEFAULT_DB,
    study: StudyOpt = None,
    status: str | None = typer.Option(
        None, "--status", help="Only runs with this status: ok, diverged or failed."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print a JSON list of runs."),
) -> None:
    """List the studies and runs in a store."""
    with _reading(db, study) as store:
        records = store.runs(study, status=status)
        infos = [s for s in store.studies() if study is None or s.name == study]
    if as_json:
        emit_json([_run_json(r, study) for r in records])
        return
    out = Console()
    if not out.is_terminal:  # a file or pipe gets whole rows, never truncated cells
        out = Console(width=10_000)
    out.print(_studies_table(db, infos))
    out.print()
    out.print(_runs_table(records, study))


@app.command("export")
def export_command(
    db: DbOpt = DEFAULT_DB,
    fmt: str = typer.Option("csv", "--format", help="csv or parquet (parquet needs pyarrow)."),
    out: Path = typer.Option(
        Path("export"), "--out", help="Folder for runs.<format> and history.<format>."
    ),
    study: StudyOpt = None,
    as_json: bool = typer.Option(False, "--json", help='Print {"files": [...], "runs": N}.'),
) -> None:
    """Export runs and their histories to CSV or Parquet files."""
    check_out_folder(out)
    with _reading(db, study) as store:
        try:
            paths = store.export(out, fmt=fmt, study=study)
        except OSError as exc:
            fail("out", f"cannot write in '{out}': {exc.strerror or exc}")
        n_runs = len(store.runs(study))
    if as_json:
        emit_json({"files": [str(p) for p in paths], "runs": n_runs})
        return
    Console().print(f"exported {n_runs} runs: " + ", ".join(str(p) for p in paths))
