"""The shared typer ``app``, the helpers every command module uses and the options they share.

Bad input is one line on stderr naming the field and what is allowed, and exit code 2 (``fail``,
``fail_on``); a run that failed while training is one line and exit code 1 (``fail_run``). Only
the CLI prints; library code logs. The ``app``'s group (``OneLineErrors``) holds typer's own
parsing errors (``--batch-size abc``, a missing or unknown option) to the same one line, and
refuses a NaN or infinite value of every float option before the command runs.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from typer._click.exceptions import (
    BadParameter,
    MissingParameter,
    NoArgsIsHelpError,
    NoSuchOption,
    UsageError,
)
from typer.core import TyperGroup

from batchlab.core.rules import check_number
from batchlab.errors import FieldError


def _finite(ctx: typer.Context, param: Any, value: Any) -> Any:
    """The one check of every float option: a NaN or infinite value is ``error: <option>: ...``."""
    for v in value if isinstance(value, list | tuple) else (value,):
        if isinstance(v, float):
            try:
                check_number(param.name, v)
            except FieldError as exc:
                fail_on(exc)
    return value


def _usage_field(exc: UsageError) -> str:
    """The option a typer/click usage error is about (``--batch-size``), else ``usage``."""
    if isinstance(exc, NoSuchOption):
        return exc.option_name
    if isinstance(exc, BadParameter) and exc.param is not None:
        names = [o for o in exc.param.opts if o.startswith("--")] or exc.param.opts
        return names[0] if names else exc.param.human_readable_name
    return "usage"


def _usage_message(exc: UsageError) -> str:
    """What is wrong, on one line (a bad value's own message: the option is already the field)."""
    own = isinstance(exc, BadParameter) and not isinstance(exc, MissingParameter)
    return " ".join((exc.message if own else exc.format_message()).split())


class OneLineErrors(TyperGroup):
    """The ``batchlab`` group: every float option checked finite, parsing errors as one line.

    Typer draws a usage error (``--batch-size abc``) as a multi-line box; here it is
    ``error: --batch-size: <what typer says>`` and exit code 2, like every other bad input.
    """

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        for command in self.commands.values():
            for param in command.params:
                if param.callback is None:
                    param.callback = _finite

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        **extra: Any,
    ) -> Any:
        """Run the CLI; a usage error (except ``batchlab`` alone, which shows help) is one line."""
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, False, **extra)
        try:
            code = super().main(args, prog_name, complete_var, False, **extra)
        except NoArgsIsHelpError as exc:  # typer has printed the help already
            sys.exit(exc.exit_code)
        except UsageError as exc:
            typer.echo(f"error: {_usage_field(exc)}: {_usage_message(exc)}", err=True)
            sys.exit(2)
        except typer.Abort:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=OneLineErrors,
    add_completion=False,
    no_args_is_help=True,
    help="batchlab: what learning rate, warmup, schedule and budget a new batch size needs.",
)
console = Console(stderr=True)


def fail(field: str, message: str) -> NoReturn:
    """Print one clear error line naming the bad field, exit with code 2."""
    typer.echo(f"error: {field}: {message}", err=True)
    raise typer.Exit(code=2)


def fail_run(what: str, reason: str) -> NoReturn:
    """One ``error: run: ...`` line for a run (or runs) that failed while training, exit code 1."""
    typer.echo(f"error: run: {what}: {' '.join(reason.split())}", err=True)
    raise typer.Exit(code=1)


def fail_on(exc: FieldError, rename: Mapping[str, str] | None = None) -> NoReturn:
    """``fail`` with the error's field and message; ``rename`` maps a library field to an option."""
    fail((rename or {}).get(exc.field, exc.field), exc.message)


def check_out_folder(path: Path, field: str = "out") -> None:
    """Refuse, before any work, an output folder that is an existing file or cannot be written.

    An existing folder is fine: the files the command writes there are replaced, others are kept.
    Nothing is created here, so a command that fails later leaves no empty folder behind.
    """
    if path.exists() and not path.is_dir():
        fail(field, f"'{path}' is a file; --{field} names a folder (it is created when missing)")
    parent = path
    while not parent.exists():
        parent = parent.parent
    if not parent.is_dir():
        fail(field, f"cannot create '{path}': '{parent}' is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        fail(field, f"cannot write in '{parent}': permission denied")


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
DEFAULT_MAX_STEPS = 10_000_000
DEFAULT_MAX_RUNS = 10_000
MaxStepsOpt = Annotated[
    int,
    typer.Option(
        "--max-steps", help="Refuse a run that plans more optimizer steps (raise it to allow one)."
    ),
]
NamedTaskOpt = Annotated[
    str | None,
    typer.Option(
        "--task",
        help="The user task module:function the file names, to allow importing it (built-in "
        "tasks need nothing; a store or sweep file alone names no code to run).",
    ),
]
TrustTaskCodeOpt = Annotated[
    bool,
    typer.Option(
        "--trust-task-code",
        help="Import the user task module:function the file names (only for a file you trust).",
    ),
]


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
