"""``batchlab advise``: the new lr, warmup, steps and expected cost of moving a job to another batch size.

One call to ``batchlab.core.rules.advise``; this module only maps errors and prints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.table import Table

from batchlab.cli._app import JsonOpt, app, emit_json, fail
from batchlab.cli.plan import read_throughput
from batchlab.core.plan import advice_costs
from batchlab.core.rules import ADAM_DEFAULTS, RULES, SOURCES, Advice
from batchlab.core.rules import advise as advise_job
from batchlab.errors import FieldError

# Core names the parameters after the rule (base_batch -> batch_size); the CLI after its options.
_CLI_FIELDS = {
    "base_batch": "batch_size",
    "batch_size": "to_batch_size",
    "base_lr": "lr",
    "n_train": "train_size",
}


@app.command()
def advise(
    batch_size: int = typer.Option(..., help="Batch size B0 that trains well today."),
    lr: float = typer.Option(..., help="Its (peak) learning rate lr0."),
    to_batch_size: int = typer.Option(..., help="Batch size B1 you are moving to."),
    train_size: int | None = typer.Option(None, help="Training examples N (adds steps, warmup)."),
    epochs: float | None = typer.Option(None, help="Training length in epochs (adds steps)."),
    optimizer: str = typer.Option("sgd", help="sgd, adam or adamw."),
    momentum: float = typer.Option(0.0, help="SGD momentum m (for the noise temperature)."),
    noise_scale: float | None = typer.Option(
        None, help="Measured gradient noise scale B_noise (batchlab noise)."
    ),
    rule: str = typer.Option("auto", help=f"Scaling rule: {', '.join(RULES)}."),
    warmup_epochs: float | None = typer.Option(
        None, help="Warmup epochs at the new batch size (default 5 when the lr grows, Goyal)."
    ),
    legw: bool = typer.Option(False, "--legw", help="Stretch the warmup epochs by k (LEGW)."),
    beta1: float = typer.Option(ADAM_DEFAULTS["beta1"], help="Adam beta1 at B0."),
    beta2: float = typer.Option(ADAM_DEFAULTS["beta2"], help="Adam beta2 at B0."),
    eps: float = typer.Option(ADAM_DEFAULTS["eps"], help="Adam eps at B0."),
    throughput: Path | None = typer.Option(
        None, "--throughput", help="Throughput table (batchlab plan --save-throughput): time, cost."
    ),
    devices: int = typer.Option(1, help="Data-parallel devices, with --throughput."),
    json_out: JsonOpt = False,
) -> None:
    """New learning rate (betas, eps), warmup and steps for a new batch size, each with its source."""
    if devices < 1:
        fail("devices", f"must be an integer >= 1, got {devices}")
    step_time = read_throughput(throughput).step_time() if throughput is not None else None
    options: dict[str, Any] = {"legw": True} if legw else {}
    if warmup_epochs is not None:
        options["warmup_epochs"] = warmup_epochs
    try:
        advice = advise_job(
            batch_size,
            lr,
            to_batch_size,
            n_train=train_size,
            epochs=epochs,
            optimizer=optimizer,
            rule=rule,
            momentum=momentum,
            noise_scale=noise_scale,
            beta1=beta1,
            beta2=beta2,
            eps=eps,
            **options,
        )
    except FieldError as err:
        fail(_CLI_FIELDS.get(err.field, err.field), err.message)
    costs = advice_costs(advice, step_time, devices) if step_time is not None else None
    if json_out:
        emit_json(advice.to_dict() | ({"costs": costs} if costs else {}))
        return
    _print(advice, costs)


def _print(advice: Advice, costs: dict[str, Any] | None = None) -> None:
    """Rich table of every figure with its source, then the warnings."""
    r, d = advice.result, advice.to_dict()
    table = Table(title=f"batch size {r.base_batch} -> {r.batch_size} (k = {r.k:g}), rule {r.rule}")
    for column in ("quantity", "before", "after", "source"):
        table.add_column(column, no_wrap=column == "before")
    table.add_row("learning rate", f"{r.base_lr:.4g}", f"{r.lr:.4g}", r.source)
    if "beta1" in d:
        table.add_row("beta1", f"{d['base_beta1']:.4g}", f"{r.beta1:.4g}", r.source)
        table.add_row("beta2", f"{d['base_beta2']:.6g}", f"{r.beta2:.6g}", d["beta2_source"])
        table.add_row("eps", f"{d['base_eps']:.3g}", f"{r.eps:.3g}", r.source)
    if r.warmup_epochs:
        steps = "" if advice.warmup_steps is None else f" = {advice.warmup_steps} steps"
        warm = f"{r.warmup_epochs:g} epochs{steps} from lr {d['warmup_start_lr']:.4g}"
    else:
        warm = "none (the lr does not grow)" if r.lr <= r.base_lr else "none"
    table.add_row("warmup", "", warm, r.warmup_source)
    if advice.n_train is not None:
        table.add_row(
            "steps per epoch",
            f"{advice.n_train / r.base_batch:.5g}",
            f"{advice.steps_per_epoch:.5g}",
            "N / B",
        )
    if advice.total_steps is not None:
        table.add_row(
            f"steps for {advice.epochs:g} epochs",
            str(advice.base_total_steps),
            str(advice.total_steps),
            "ceil(epochs N / B)",
        )
    if advice.noise_temperature is not None:
        table.add_row(
            f"noise temperature g (m = {advice.momentum:g})",
            f"{advice.base_noise_temperature:.4g}",
            f"{advice.noise_temperature:.4g}",
            SOURCES["temperature"],
        )
        keep = advice.momentum_for_same_temperature
        table.add_row(
            "momentum that keeps g",
            "",
            "none in [0, 1)" if keep is None else f"{keep:.4g}",
            SOURCES["temperature"],
        )
    if advice.steps_ratio is not None:
        table.add_row(
            "steps to the same loss", "1", f"x{d['steps_ratio']:.3g}", SOURCES["critical"]
        )
        table.add_row(
            "samples to the same loss", "1", f"x{d['samples_ratio']:.3g}", SOURCES["critical"]
        )
        if advice.epochs is not None:
            table.add_row(
                "epochs to the same loss",
                f"{advice.epochs:g}",
                f"{d['epochs_for_same_loss']:.4g}",
                SOURCES["critical"],
            )
        table.add_row("speed-up in steps", "1", f"x{d['speedup']:.3g}", SOURCES["critical"])
        table.add_row(
            "data-parallel efficiency",
            "1",
            f"{d['efficiency']:.3g} (speed-up / k)",
            SOURCES["critical"],
        )
    if costs:
        _cost_rows(table, costs)
    out = Console()
    out.print(table)
    out.print(f"why: {r.reason}", markup=False)
    for warning in advice.warnings:
        out.print(f"warning: {warning}", style="yellow", markup=False)


_COST_ROWS = (
    ("wall_s", "wall time for the epochs", "{:.4g} s"),
    ("same_loss_wall_s", "wall time to the same loss", "{:.4g} s"),
    ("device_hours", "device-hours for the epochs", "{:.3g}"),
    ("same_loss_device_hours", "device-hours to the same loss", "{:.3g}"),
)


def _cost_rows(table: Table, costs: dict[str, Any]) -> None:
    """Time per step, and wall time / device-hours where the advice has steps, from a throughput
    table (``batchlab.core.plan.advice_costs``)."""
    source = f"throughput table, {costs['devices']} device(s)"
    t0, t1 = costs["step_time_s"]
    table.add_row("time per step", f"{1e3 * t0:.3g} ms", f"{1e3 * t1:.3g} ms", source)
    for key, label, fmt in _COST_ROWS:
        if key in costs:
            table.add_row(label, *(fmt.format(v) for v in costs[key]), source)
