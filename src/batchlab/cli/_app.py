"""The shared typer ``app``, the helpers every command module uses and the options they share.

Bad input is one line on stderr naming the field and what is allowed, and exit code 2 (``fail``,
``fail_on``). Only the CLI prints; library code logs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

from batchlab.errors import FieldError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="batchlab: what learning rate, warmup, schedule and budget a new batch size needs.",
)
console = Console(stderr=True)


def fail(field: str, message: str) -> NoReturn:
    """Print one clear error line naming the bad field, exit with code 2."""
    typer.echo(f"error: {field}: {message}", err=True)
    raise typer.Exit(code=2)


def fail_on(exc: FieldError, rename: Mapping[str, str] | None = None) -> NoReturn:
    """``fail`` with the error's field and message; ``rename`` maps a library field to an option."""
    fail((rename or {}).get(exc.field, exc.field), exc.message)


# Options several commands share, declared once: name and help here, the default in the signature
# (``task_option: TaskOptionsOpt = None``); a required option has no default.
DEFAULT_DB = Path("batchlab.sqlite")
TaskOpt = Annotated[
    str, typer.Option("--task", help="Built-in task (see `batchlab tasks`) or module:function.")
]
BatchSizeOpt = Annotated[
    int, typer.Option("--batch-size", "-b", help="Examples per optimizer update.")
]
TaskOptionsOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--task-option",
        "-o",
        help="Task option KEY=VALUE (repeatable), e.g. n_samples=20000.",
    ),
]
DeviceOpt = Annotated[
    str | None,
    typer.Option("--device", help="cpu, cuda, cuda:1 ... (default: CUDA when present)."),
]
DbOpt = Annotated[Path, typer.Option("--db", help="SQLite store of runs.")]
RunDbOpt = Annotated[Path | None, typer.Option("--db", help="Store the run in this SQLite file.")]
RunStudyOpt = Annotated[
    str | None, typer.Option("--study", help="Study name the stored run belongs to.")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]


def progress_bar(label: str, *, disable: bool = False, unit: str = "") -> Progress:
    """A transient progress bar on stderr (hidden with ``--json``): ``label [bar] done/total ETA``."""
    return Progress(
        TextColumn(label),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}" + (f" {unit}" if unit else "")),
        TimeRemainingColumn(),
        console=console,
        disable=disable,
        transient=True,
    )


def emit_json(obj: Any) -> None:
    """Print one JSON object on stdout (NaN/inf become null so any JSON parser reads it)."""
    typer.echo(json.dumps(_json_safe(obj), indent=2, sort_keys=False))


def _json_safe(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if obj == obj and obj not in (float("inf"), float("-inf")) else None
    if isinstance(obj, dict):
        return {str(k): _json_safe(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_json_safe(v) for v in obj]
    return obj


def main() -> None:
    """Entry point for ``python -m batchlab``."""
    app(prog_name="batchlab")


def _print_version(value: bool) -> None:
    """``--version``: ``batchlab <version>`` of the installed distribution, then exit 0."""
    if not value:
        return
    from importlib.metadata import PackageNotFoundError, version

    try:
        number = version("batchlab")
    except PackageNotFoundError:  # run from a source tree that was never installed
        from batchlab import __version__ as number
    typer.echo(f"batchlab {number}")
    raise typer.Exit()


@app.callback()
def _arm_ctrl_c(
    ctx: typer.Context,
    _version: bool = typer.Option(
        False,
        "--version",
        is_eager=True,
        callback=_print_version,
        help="Print the version and exit.",
    ),
) -> None:
    # every command: Ctrl-C stops it, even where SIGINT was inherited ignored (see _interrupt)
    from batchlab.cli._interrupt import arm

    ctx.call_on_close(arm())
