"""``batchlab tasks``: the built-in tasks (or the named ones) with sizes and parameter counts."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.table import Table

from batchlab.cli._app import JsonOpt, app, emit_json, fail_on
from batchlab.engine.spec import SpecError

if TYPE_CHECKING:  # the tasks import torch; load them when the command runs
    from batchlab.engine.tasks import TaskInfo


def _sizes_table(infos: list[TaskInfo]) -> Table:
    table = Table(title="batchlab tasks")
    table.add_column("task", no_wrap=True)
    for column in ("train", "val", "input", "params"):
        table.add_column(column, justify="right")
    table.add_column("description")
    for info in infos:
        if info.error is not None:
            table.add_row(info.name, "-", "-", "-", "-", f"[red]unavailable[/red]: {info.error}")
            continue
        table.add_row(
            info.name,
            f"{info.n_train:,}",
            f"{info.n_val:,}",
            "x".join(str(d) for d in info.input_shape or ()),
            f"{info.n_params:,}",
            info.description,
        )
    return table


def _defaults_table(infos: list[TaskInfo]) -> Table:
    """One row per task: its own options with defaults (the norm options every task shares aside)."""
    from batchlab.engine.tasks import COMMON_OPTIONS, NORMS

    table = Table(
        title="default options",
        caption=f"the classifiers also take norm={'|'.join(NORMS)} and ghost_batch_size=32",
    )
    table.add_column("task", no_wrap=True)
    table.add_column("options")
    for info in infos:
        own = {k: v for k, v in info.options.items() if k not in COMMON_OPTIONS}
        table.add_row(info.name, "  ".join(f"{k}={v}" for k, v in own.items()))
    return table


def _options_table(info: TaskInfo) -> Table:
    title = f"{info.name} options"
    table = Table(title=title, min_width=len(title))
    table.add_column("option")
    table.add_column("value")
    if info.option_help:
        table.add_column("meaning")
    for key, value in info.options.items():
        meaning = [info.option_help.get(key, "")] if info.option_help else []
        table.add_row(key, str(value), *meaning)
    return table


@app.command("tasks")
def tasks_command(
    names: list[str] = typer.Argument(
        None, help="Tasks to describe (built-in names or module:function); default: all built-ins."
    ),
    json_output: JsonOpt = False,
) -> None:
    """List tasks with train/validation sizes, input shape, parameter count and options."""
    from batchlab.engine.tasks import list_tasks, task_info

    try:
        infos = [task_info(name) for name in names] if names else list_tasks()
    except SpecError as exc:
        fail_on(exc)
    if json_output:
        emit_json({"tasks": [info.to_dict() for info in infos]})
        return
    console = Console()
    console.print(_sizes_table(infos))
    if names:
        for info in infos:
            if info.options:
                console.print(_options_table(info))
    else:
        console.print(_defaults_table(infos))
