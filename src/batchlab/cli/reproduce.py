"""``batchlab reproduce``: test the classic claims on real data, print the verdicts, write the report."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.console import Console
from rich.table import Table

from batchlab.cli._app import (
    DEFAULT_DB,
    DeviceOpt,
    JsonOpt,
    TaskOptionsOpt,
    app,
    check_out_folder,
    console,
    emit_json,
    fail,
    fail_on,
    progress_bar,
)
from batchlab.cli._interrupt import finished_runs, stop_on_ctrl_c
from batchlab.cli.train import parse_options
from batchlab.engine.spec import SpecError
from batchlab.sweep.store import StoreError

STYLE = {"supported": "green", "not_supported": "red", "inconclusive": "yellow"}


def parse_claims(text: str) -> list[int]:
    """``"1,2,7"`` -> ``[1, 2, 7]``; anything else is exit 2 naming ``claims``."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        fail("claims", f"must be comma-separated numbers in 1..8, got {text!r}")


def _kept(db: Path, before: int) -> str:
    """What an interrupted reproduce leaves: the runs it stored (a rerun reuses them)."""
    stored = len(finished_runs(db))
    return (
        f"{stored - before} runs stored in {db} by this command ({stored} finished runs there); "
        "the runs still training were dropped"
    )


@app.command()
def reproduce(
    claims: str = typer.Option("1,2,3,4,5,6,7,8", help="Claims to test, e.g. 1,2,7."),
    quick: bool = typer.Option(
        False, "--quick", help="Small studies: <= 10 minutes on 2 CPU cores."
    ),
    smoke: bool = typer.Option(
        False, "--smoke", help="Tiny studies (seconds): checks that a task runs, not the claims."
    ),
    seeds: int | None = typer.Option(None, help="Seeds per study (default: 3 quick, 5 full)."),
    first_seed: int = typer.Option(
        0, "--first-seed", help="First seed (another seed set: another value)."
    ),
    task: str = typer.Option("mnist1d-mlp", help="Task of every study, e.g. my_module:make_task."),
    task_option: TaskOptionsOpt = None,
    db: Path = typer.Option(DEFAULT_DB, help="Run store: runs already there are reused."),
    out: Path = typer.Option(Path("report"), help="Report folder (index.html + figures/)."),
    workers: int | None = typer.Option(None, help="Worker processes (default: one per core)."),
    executor: str = typer.Option("local", help="inline, local or ray."),
    device: DeviceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Run the studies of the chosen claims, judge each by its pre-registered rule, write the report."""
    from batchlab.reproduce.claims import Setup
    from batchlab.reproduce.run import check_claims, seeds_from
    from batchlab.reproduce.run import reproduce as run_reproduce

    numbers = parse_claims(claims)
    check_out_folder(out)
    try:
        check_claims(numbers)  # before the progress bar draws anything
        setup = Setup(
            mode="smoke" if smoke else "quick" if quick else "full",
            seeds=seeds_from(
                seeds if seeds is not None else 3 if quick or smoke else 5, first_seed
            ),
            task=task,
            task_options=tuple(parse_options(task_option).items()),
        )
        before = len(finished_runs(db))
        with (
            stop_on_ctrl_c(lambda: _kept(db, before)),
            progress_bar("reproduce", disable=json_out, unit="runs") as bar,
        ):
            job = bar.add_task("runs", total=None)

            def show(label: str, report) -> None:
                bar.update(job, completed=report.done, total=report.to_run)

            result = run_reproduce(
                numbers,
                setup=setup,
                db=db,
                out=out,
                executor=executor,
                workers=workers,
                device=device,
                progress=show,
            )
    except (SpecError, StoreError) as exc:
        fail_on(exc)
    if json_out:
        emit_json(result.to_dict())
        return
    table = Table(title=f"batchlab reproduce ({setup.mode}, seeds {list(setup.seeds)})")
    for col in ("claim", "verdict", "why"):
        table.add_column(col)
    for c in result.claims:
        table.add_row(
            f"{c.claim.number}. {c.claim.title}",
            f"[{STYLE[c.verdict]}]{c.verdict}[/]",
            c.judgement.outcome.reason,
        )
    out_console = Console()
    out_console.print(table)
    out_console.print(
        f"{result.runs_trained} runs trained, {result.runs_reused} reused from {result.db}, "
        f"{result.wall_s:.0f} s; report: {result.report}"
    )
    console.print("[dim]the numbers behind each verdict: --json, or the report[/dim]")
