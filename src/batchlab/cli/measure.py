"""``batchlab lr-find`` (LR range test) and ``batchlab sharpness`` (of a stored run's weights)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from batchlab.cli._app import (
    DEFAULT_DB,
    DbOpt,
    DeviceOpt,
    JsonOpt,
    NamedTaskOpt,
    TaskOpt,
    TaskOptionsOpt,
    TrustTaskCodeOpt,
    app,
    console,
    emit_json,
    fail,
    fail_on,
    progress_bar,
)
from batchlab.cli._interrupt import stop_on_ctrl_c
from batchlab.cli.train import parse_options
from batchlab.core.range_test import SUGGESTIONS
from batchlab.core.rules import check_number
from batchlab.engine.spec import OPTIMIZERS, SpecError, check_integer

if TYPE_CHECKING:
    from batchlab.engine.lr_finder import LRFindResult


def _num(value: float | None, fmt: str = ".3g") -> str:
    return "-" if value is None else format(value, fmt)


def _batch_sizes(batch_size: int | None, batch_sizes: str | None) -> list[int]:
    """``--batch-size`` and ``--batch-sizes 64,256`` merged, sorted, without repeats."""
    sizes = [] if batch_size is None else [batch_size]
    for part in (batch_sizes or "").split(","):
        if part.strip():
            try:
                sizes.append(int(part))
            except ValueError:
                fail("batch_sizes", f"expected comma-separated integers, got {batch_sizes!r}")
    if not sizes:
        fail("batch_size", "give --batch-size B or --batch-sizes B1,B2,...")
    if min(sizes) < 1:
        fail("batch_size", f"every batch size must be >= 1, got {min(sizes)}")
    return sorted(set(sizes))


def _optimizer_options(
    optimizer: str, momentum: float, weight_decay: float, beta1: float, beta2: float
) -> dict[str, Any]:
    if optimizer not in OPTIMIZERS:
        fail("optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if optimizer == "sgd":
        return {"momentum": momentum, "weight_decay": weight_decay}
    if momentum:
        fail("momentum", f"applies to sgd only, not {optimizer} (use --beta1)")
    return {"betas": (beta1, beta2), "weight_decay": weight_decay}


_SHORT = {
    "steepest": "steepest",
    "valley": "valley",
    "min_over_10": "min/10",
    "divergence": "diverges",
}


def _lr_table(result: LRFindResult) -> Table:
    """Geometric means over seeds per batch size; ``*`` marks the suggestion reported."""
    n_seeds = len(result.settings["seeds"])
    table = Table(
        title=escape(
            f"LR range test: {result.task}, {result.settings['optimizer']}, "
            f"geometric mean of {n_seeds} seeds"
        ),
        box=box.SIMPLE_HEAD,
    )
    table.add_column("B", justify="right")
    for name in SUGGESTIONS:
        table.add_column(_SHORT[name] + ("*" if name == result.method else ""), justify="right")
    table.add_column("spread x", justify="right")
    for entry in result.per_batch_size:
        table.add_row(
            str(entry.batch_size),
            *(_num(entry.suggestions[name].lr) for name in SUGGESTIONS),
            _num(entry.consensus.spread, ".2f"),
        )
    return table


def _check_plot(path: Path) -> None:
    """Refuse, before any work, a ``--plot`` file of an image type matplotlib cannot write."""
    from matplotlib.figure import Figure

    types = Figure().canvas.get_supported_filetypes()
    if path.suffix.lower().lstrip(".") not in types:
        what = f"unknown image type {path.suffix!r}" if path.suffix else "no image type (suffix)"
        fail("plot", f"{what}; use one of {', '.join(types)}")


def _save_plot(result: LRFindResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    result.plot(ax)
    ax.set_title(f"LR range test: {result.task}")
    fig.tight_layout()
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        fail("plot", f"cannot write '{path}': {exc}")
    finally:
        plt.close(fig)


@app.command("lr-find")
def lr_find_command(
    task: TaskOpt,
    batch_size: int | None = typer.Option(None, "--batch-size", "-b", help="Batch size."),
    batch_sizes: str | None = typer.Option(
        None, "--batch-sizes", help="Several batch sizes, e.g. 64,256,1024: fits lr ~ B^exponent."
    ),
    seeds: int = typer.Option(
        3, "--seeds", help="Seeds per batch size (0..N-1): model and data order."
    ),
    optimizer: str = typer.Option("sgd", help=f"One of {', '.join(OPTIMIZERS)}."),
    momentum: float = typer.Option(0.0, help="SGD momentum."),
    weight_decay: float = typer.Option(0.0, "--weight-decay", help="Weight decay."),
    beta1: float = typer.Option(0.9, help="Adam beta1."),
    beta2: float = typer.Option(0.999, help="Adam beta2."),
    start_lr: float = typer.Option(1e-6, "--start-lr", help="First LR of the exponential ramp."),
    end_lr: float = typer.Option(
        10.0, "--end-lr", help="Last LR (the test stops earlier if the loss diverges)."
    ),
    steps: int = typer.Option(100, help="Optimizer steps of the ramp."),
    method: str = typer.Option("valley", help=f"Suggestion to report: {', '.join(SUGGESTIONS)}."),
    task_option: TaskOptionsOpt = None,
    device: DeviceOpt = None,
    plot: Path | None = typer.Option(
        None, "--plot", help="Also draw every curve into this image file."
    ),
    json_out: JsonOpt = False,
) -> None:
    """LR range test: suggested learning rates per batch size, their spread over seeds and, with
    several batch sizes, the exponent of lr ~ B^exponent."""
    from batchlab.engine.lr_finder import check_ramp, lr_find

    sizes = _batch_sizes(batch_size, batch_sizes)
    if seeds < 1:
        fail("seeds", f"must be >= 1, got {seeds}")
    if plot is not None:
        _check_plot(plot)
    try:
        check_ramp(start_lr, end_lr, steps)
    except SpecError as exc:
        fail_on(exc)
    options = _optimizer_options(optimizer, momentum, weight_decay, beta1, beta2)
    bar = progress_bar("range tests", disable=json_out)
    job = bar.add_task("lr-find", total=len(sizes) * seeds)
    kept = f"of {len(sizes) * seeds} range tests were done; lr-find stores nothing"
    with stop_on_ctrl_c(lambda: f"{bar.tasks[job].completed:.0f} {kept}", "rerun"), bar:
        try:
            result = lr_find(
                task,
                batch_sizes=sizes,
                seeds=seeds,
                task_options=parse_options(task_option),
                optimizer=optimizer,
                start_lr=start_lr,
                end_lr=end_lr,
                steps=steps,
                method=method,
                device=device,
                progress=lambda done, total: bar.update(job, completed=done),
                **options,
            )
        except SpecError as exc:
            fail_on(exc)
    if plot is not None:
        _save_plot(result, plot)
    if json_out:
        emit_json(result.to_dict() | {"plot": None if plot is None else str(plot)})
        return
    out = Console()
    out.print(_lr_table(result))
    ramp = result.settings
    out.print(
        f"ramp: lr {ramp['start_lr']:g} -> {ramp['end_lr']:g} in {ramp['steps']} steps; "
        "*: reported; spread x: std over seeds"
    )
    fit = result.exponent
    if fit is not None:
        out.print(
            f"suggested lr ~ B^{fit.exponent:.2f} (R^2 {fit.r_squared:.2f}, "
            f"{len(result.per_batch_size)} batch sizes)"
        )
    if plot is not None:
        out.print(f"plot: {plot}")


@app.command("sharpness")
def sharpness_command(
    db: DbOpt = DEFAULT_DB,
    run: str = typer.Option(..., "--run", help="Run id (see `batchlab runs`)."),
    task: NamedTaskOpt = None,
    trust_task_code: TrustTaskCodeOpt = False,
    iters: int = typer.Option(100, help="Most Hessian-vector products for the top eigenvalue."),
    epsilon: float = typer.Option(1e-3, help="Keskar box size: |z_i| <= epsilon (|x_i| + 1)."),
    keskar: bool = typer.Option(
        True, "--keskar/--no-keskar", help="Also measure Keskar sharpness."
    ),
    device: DeviceOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Sharpness of a stored run's final weights on its training set: top Hessian eigenvalue
    against the stability edge 2/lr, and Keskar et al. (2017) sharpness. A user task stored with
    the run is imported only when named with --task (or with --trust-task-code)."""
    from batchlab.cli.store import open_store
    from batchlab.engine.sharpness import run_sharpness
    from batchlab.engine.tasks import stored_task
    from batchlab.sweep.store import StoreError

    try:  # the options first: nothing is read, built or printed for a bad one
        check_integer("iters", iters, 1)
        check_number("epsilon", epsilon, low=0.0, low_open=True, error=SpecError)
    except SpecError as exc:
        fail_on(exc)
    try:
        with open_store(db) as store:
            record = store.get(run)
            weights = None if record is None else store.weights(run)
    except StoreError as exc:
        fail_on(exc)
    if record is None:
        fail("run", f"no run {run!r} in '{db}' (list them with `batchlab runs --db {db}`)")
    if weights is None:
        fail(
            "run",
            f"run {run} has no saved weights; rerun it with "
            f"`batchlab train ... --db {db} --save-weights`",
        )
    try:
        built = stored_task(record.spec, run, named=task, trust_code=trust_task_code)
        with console.status(escape(f"sharpness of run {run} ({record.spec.task})")):
            report = run_sharpness(
                record.spec,
                weights,
                task=built,
                device=device,
                iters=iters,
                epsilon=epsilon,
                keskar=keskar,
            )
    except SpecError as exc:
        fail_on(exc)
    summary = {
        "run": run,
        "task": record.spec.task,
        "batch_size": record.spec.batch_size,
        "lr": record.spec.lr,
        "status": record.status,
    } | report
    if json_out:
        emit_json(summary)
        return
    table = Table(title=f"sharpness of run {run}", show_header=False, box=box.SIMPLE_HEAD)
    rows = [
        (
            "task / batch size / lr",
            escape(f"{record.spec.task} / {record.spec.batch_size} / {record.spec.lr:g}"),
        ),
        ("training loss", _num(report["loss"], ".4f")),
        ("top Hessian eigenvalue", _num(report["top_eigenvalue"], ".4g")),
        ("stability edge 2/lr", _num(report["stability_edge"], ".4g")),
        ("eigenvalue / edge", _num(report["edge_ratio"], ".3f")),
        (f"Keskar sharpness (eps {epsilon:g})", _num(report["keskar"], ".4g")),
        ("examples / parameters", f"{report['n_examples']} / {report['n_params']}"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    Console().print(table)
