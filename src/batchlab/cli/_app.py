"""The shared typer ``app`` and the helpers every command module uses.

Bad input is one line on stderr naming the field and what is allowed, and exit code 2 (``fail``).
Only the CLI prints; library code logs.
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

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
