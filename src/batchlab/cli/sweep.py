"""``batchlab sweep``: train a batch-size x learning-rate grid from a TOML file into a store.

A bad file is one ``error: <key>: ...`` line and exit code 2 before anything is trained or stored.
The live progress bar (stderr) shows runs done / total, the best run so far and the time left.
Ctrl-C stops it, keeping every run stored so far, and prints the command that resumes (exit 130).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from batchlab.cli._app import (
    DEFAULT_DB,
    DEFAULT_MAX_RUNS,
    DEFAULT_MAX_STEPS,
    DbOpt,
    DeviceOpt,
    MaxStepsOpt,
    NamedTaskOpt,
    TrustTaskCodeOpt,
    app,
    console,
    emit_json,
    fail,
    fail_on,
    fail_run,
)
from batchlab.cli._interrupt import finished_runs, stop_on_ctrl_c
from batchlab.engine.spec import SpecError
from batchlab.sweep.store import Store, StoreError

if TYPE_CHECKING:  # the runner and the sweep checks import torch; load them when a sweep runs
    from batchlab.sweep.runner import SweepReport
    from batchlab.sweep.spec import SweepSpec


@contextmanager
def _logs_on_stderr() -> Iterator[None]:
    """Show batchlab's INFO logs (what is planned, where Ray writes) above the progress bar."""
    logger = logging.getLogger("batchlab")
    handler = RichHandler(console=console, show_path=False, show_time=False)
    level = logger.level
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    try:
        yield
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _best(report: SweepReport) -> str:
    best = report.best
    if best is None:
        return "best: -"
    return f"best {best.metric} {best.value:.4g} (B={best.batch_size}, lr={best.lr:g})"


def _kept(sweep: SweepSpec, db: Path) -> str:
    """What an interrupted sweep leaves: its finished runs in the store."""
    from batchlab.sweep.spec import plan

    planned = {s.run_id for s in plan(sweep)}
    stored = len(finished_runs(db, sweep.study) & planned)
    return (
        f"{stored} of {len(planned)} runs of study '{sweep.study}' are stored in {db}; "
        "the runs still training were dropped"
    )


def _summary(report: SweepReport, db: Path) -> Table:
    table = Table(title=escape(f"study {report.study} in {db}"), show_header=False, box=None)
    table.add_column(style="bold")
    table.add_column()
    rows = {
        "planned runs": str(report.planned),
        "already stored": str(report.skipped),
        "trained now": f"{report.ok + report.diverged + report.failed} "
        f"(ok {report.ok}, diverged {report.diverged}, failed {report.failed})",
        "executor": f"{report.executor} x {report.workers}",
        "wall time": f"{report.wall_s:.1f} s",
        "best": _best(report).removeprefix("best "),
    }
    for key, value in rows.items():
        table.add_row(key, escape(value))
    return table


@app.command("sweep")
def sweep_command(
    path: Path = typer.Argument(..., help="Sweep file (TOML), e.g. examples/sweep_minimal.toml."),
    db: DbOpt = DEFAULT_DB,
    workers: int | None = typer.Option(
        None,
        "--workers",
        help="Worker processes (local) or CPUs of a local Ray; default: all cores.",
    ),
    executor: str | None = typer.Option(
        None,
        "--executor",
        help="inline, local (process pool) or ray; default: local with --workers > 1, else inline.",
    ),
    address: str | None = typer.Option(
        None, "--address", help="Ray cluster address (with --executor ray); default: start one."
    ),
    retry_failed: bool = typer.Option(
        False, "--retry-failed", help="Train runs stored as failed again."
    ),
    device: DeviceOpt = None,
    max_runs: int = typer.Option(
        DEFAULT_MAX_RUNS,
        "--max-runs",
        help="Refuse a sweep that plans more runs (raise it to allow).",
    ),
    max_steps: MaxStepsOpt = DEFAULT_MAX_STEPS,
    task_name: NamedTaskOpt = None,
    trust_task_code: TrustTaskCodeOpt = False,
    as_json: bool = typer.Option(False, "--json", help="Print one JSON summary object."),
) -> None:
    """Train every batch size x lr x seed of a sweep file; finished runs are skipped on a rerun.

    A sweep file is data: a user task ``module:function`` it names is imported only when named again
    with --task (or with --trust-task-code)."""
    from batchlab.engine.tasks import refuse_unnamed_code
    from batchlab.sweep.runner import check_executor, run_sweep
    from batchlab.sweep.spec import check, load_sweep

    try:
        executor = check_executor(executor, workers, address)
        sweep = load_sweep(path)
        if task_name is not None and task_name != sweep.task:
            raise SpecError("task", f"the sweep file trains {sweep.task!r}, not {task_name!r}")
        refuse_unnamed_code(
            sweep.task, f"sweep file {path}", named=task_name, trust_code=trust_task_code
        )
        if sweep.n_runs > max_runs:
            fail(
                "runs",
                f"the sweep plans {sweep.n_runs:,} runs ({len(sweep.batch_sizes)} batch sizes x "
                f"their learning rates x {len(sweep.seeds)} seeds), more than --max-runs "
                f"{max_runs:,}; raise --max-runs to train them",
            )
        task = check(sweep, max_steps=max_steps)
    except SpecError as exc:
        fail_on(exc)
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[best]}"),
        TimeRemainingColumn(),
    )
    try:
        with (
            stop_on_ctrl_c(lambda: _kept(sweep, db)),
            _logs_on_stderr(),
            Store(db) as store,
            Progress(*columns, console=console) as bar,
        ):
            job = bar.add_task(escape(sweep.study), total=None, best="")

            def show(report: SweepReport) -> None:
                bar.update(job, total=report.to_run, completed=report.done, best=_best(report))

            report = run_sweep(
                sweep,
                store,
                executor=executor,
                workers=workers,
                address=address,
                retry_failed=retry_failed,
                task=task,
                device=device,
                progress=show,
            )
    except (SpecError, StoreError) as exc:
        fail_on(exc)
    if as_json:
        emit_json({**report.to_dict(), "db": str(db)})
    else:
        Console().print(_summary(report, db))
    if report.failed:
        fail_run(
            f"{report.failed} of {report.planned} runs of study '{sweep.study}' failed",
            f"see `batchlab runs --db {db} --status failed`; after a fix, rerun with --retry-failed",
        )
