"""``batchlab noise``: train one run, report its gradient noise scale and what it implies.

The noise scale B_noise = tr(Sigma) / |G|^2 estimates the critical batch size (McCandlish et al. 2018,
arXiv:1812.06162): steps to a loss follow S = S_min (1 + B_noise/B) and examples E = E_min (1 +
B/B_noise), so at B = B_noise a run takes twice the fewest steps and twice the fewest examples.
Training is one call to ``batchlab.engine.train.train`` with ``noise_scale`` on; the scaling table comes from
``batchlab.core.rules`` (the ``critical`` rule of ``batchlab advise``).
"""

from __future__ import annotations

import math
from typing import Any

import typer
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from batchlab.cli._app import (
    BatchSizeOpt,
    DeviceOpt,
    JsonOpt,
    RunDbOpt,
    RunStudyOpt,
    TaskOpt,
    TaskOptionsOpt,
    app,
    console,
    emit_json,
    fail,
    fail_on,
    fail_run,
    progress_bar,
)
from batchlab.cli.train import open_store, parse_options, store_result
from batchlab.core.rules import SOURCES, apply_rule, samples_ratio, steps_ratio
from batchlab.engine.spec import OPTIMIZERS, RunResult, RunSpec, SpecError

PHASES = ("start", "middle", "end")
TABLE_FACTORS = (0.25, 0.5, 1, 2, 4, 8, 16)
"""Batch sizes of the scaling table, as multiples of the measured run's."""


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _estimates(result: RunResult) -> dict[str, dict[str, Any]]:
    """Start, middle and end estimates (``value``/``low``/``high``/``step``, None when unmeasured)."""
    measured = result.extra.get("noise_scale", {})
    empty = {"value": None, "low": None, "high": None, "step": None}
    return {phase: measured.get(phase, empty) for phase in PHASES}


def _critical(end: dict[str, Any]) -> float | None:
    """The end estimate as B_crit when it is a finite positive number (else no implication)."""
    value = end["value"]
    return value if value is not None and 0 < value < math.inf else None


def scaling_rows(
    batch_size: int, lr: float, noise_scale: float, optimizer: str
) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """Rule ``critical`` from the measured run to B/4 .. 16B and to B_crit: lr (None at lr 0), steps
    and samples to the same loss relative to the run; plus the rule's warnings."""
    sizes = {max(1, round(batch_size * f)) for f in TABLE_FACTORS} | {round(noise_scale) or 1}
    rows, warnings = [], ()
    for size in sorted(sizes):
        new_lr = None
        if lr > 0:
            rule = apply_rule(
                "critical",
                base_batch=batch_size,
                base_lr=lr,
                batch_size=size,
                optimizer=optimizer,
                noise_scale=noise_scale,
            )
            new_lr, warnings = rule.lr, rule.warnings
        rows.append(
            {
                "batch_size": size,
                "lr": new_lr,
                "steps_ratio": steps_ratio(batch_size, size, noise_scale),
                "samples_ratio": samples_ratio(batch_size, size, noise_scale),
            }
        )
    return rows, warnings


def report(result: RunResult) -> dict[str, Any]:
    """Everything ``batchlab noise`` prints, as one JSON-ready dict."""
    spec = result.spec
    estimates = _estimates(result)
    critical = _critical(estimates["end"])
    out: dict[str, Any] = {
        "id": result.run_id,
        "status": result.status,
        "task": spec.task,
        "batch_size": spec.batch_size,
        "tokens_per_example": result.extra.get("tokens_per_example", 1),
        "lr": spec.lr,
        "optimizer": spec.optimizer,
        "mode": result.extra.get("noise_mode"),
        "fallback": result.extra.get("noise_fallback"),
        "noise_splits": spec.noise_splits if result.extra.get("noise_mode") == "split" else None,
        "micro_batch_size": spec.micro_batch_size,
        "steps": result.steps,
        "samples": result.samples,
        "diverged_at": result.diverged_at,
        "error": result.error,
        "noise_scale": estimates,
        "critical_batch": None,
        "scaling": None,
        "skipped": result.extra.get("noise_skipped", {}),
        "final": result.final,
        "wall_s": result.wall_s,
        "history": [
            {
                "step": row["step"],
                "noise_scale": row["noise_scale"],
                "low": row.get("noise_scale_low"),
                "high": row.get("noise_scale_high"),
            }
            for row in result.history
            if row.get("noise_scale") is not None
        ],
    }
    if critical is not None:
        rows, warnings = scaling_rows(spec.batch_size, spec.lr, critical, spec.optimizer)
        end = estimates["end"]
        out["critical_batch"] = {
            "value": critical,
            "low": end["low"],
            "high": end["high"],
            "steps_over_min": 1 + critical / spec.batch_size,
            "samples_over_min": 1 + spec.batch_size / critical,
        }
        out["scaling"] = {
            "rule": "critical",
            "source": SOURCES["critical"],
            "rows": rows,
            "warnings": list(warnings),
        }
    return out


@app.command()
def noise(
    task: TaskOpt,
    batch_size: BatchSizeOpt,
    lr: float = typer.Option(
        ..., help="Learning rate; 0 measures at the initial weights, averaging every step."
    ),
    steps: int = typer.Option(3000, help="Optimizer steps to train (and measure)."),
    mode: str | None = typer.Option(
        None,
        help="per_example (default), split, or accumulation (default with --micro-batch-size).",
    ),
    micro_batch_size: int | None = typer.Option(
        None,
        "--micro-batch-size",
        help="Gradient accumulation: micro-batch size dividing the batch.",
    ),
    noise_splits: int | None = typer.Option(
        None,
        "--noise-splits",
        help="Slices per batch in split mode and the per_example fall-back (default 4).",
    ),
    optimizer: str = typer.Option("sgd", help=f"One of {', '.join(OPTIMIZERS)}."),
    momentum: float = typer.Option(0.0, help="SGD momentum."),
    seed: int = typer.Option(0, help="Seed of the initial weights and the batch order."),
    task_option: TaskOptionsOpt = None,
    device: DeviceOpt = None,
    db: RunDbOpt = None,
    study: RunStudyOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Gradient noise scale at the start, middle and end of training, with 95% intervals, and the
    batch sizes it implies (critical batch, rule `critical`)."""
    from batchlab.engine.tasks import get_task
    from batchlab.engine.train import plan, train

    if steps < 2:
        fail("steps", f"must be >= 2 (an estimate folds in two measured steps), got {steps}")
    options = parse_options(task_option)
    try:
        spec = RunSpec(
            task=task,
            batch_size=batch_size,
            lr=lr,
            task_options=tuple(options.items()),
            optimizer=optimizer,
            momentum=momentum,
            budget_unit="steps",
            budget=steps,
            seed=seed,
            micro_batch_size=micro_batch_size,
            noise_scale=True,
            noise_mode=mode,
            noise_splits=RunSpec.noise_splits if noise_splits is None else noise_splits,
        )
        if noise_splits is not None and spec.resolved_noise_mode == "accumulation":
            fail("noise_splits", "sets the slices of split (and the per_example fall-back)")
        built = get_task(task, **options)
        plan(spec, built.n_train)
        store = open_store(db)
        with progress_bar("measuring", disable=json_out, unit="steps") as bar:
            job = bar.add_task("noise", total=steps)
            result = train(
                spec,
                task=built,
                device=device,
                progress=lambda done, total: bar.update(job, completed=done),
            )
    except SpecError as exc:  # batch norm is refused by the monitor; the rest before training
        fail_on(exc, {"noise_mode": "mode"})  # RunSpec field -> our --mode
    if store is not None:
        store_result(store, result, study)
    out = report(result)
    if json_out:
        emit_json(out)
    else:
        _print(out)
    if result.status == "failed":
        fail_run(f"{result.run_id} failed", result.error or "unknown error")


def _print(out: dict[str, Any]) -> None:
    """The estimates, notes on the run, what B_crit means for it, and the scaling table."""
    screen = Console()
    how = (out["mode"] or "no measurement") + (
        f" x{out['noise_splits']}" if out["noise_splits"] else ""
    )
    if out["micro_batch_size"]:
        how += f", micro-batch {out['micro_batch_size']}"
    screen.print(
        f"[bold]gradient noise scale[/bold] of {escape(out['task'])} at B={out['batch_size']}"
        f"{_in_tokens(out, out['batch_size'])}, lr={out['lr']:g}, {out['optimizer']}: "
        f"{out['steps']} steps, {how}"
    )
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("", "step", "B_noise", "95% interval"):
        table.add_column(column, justify="right" if column else "left")
    for phase, est in out["noise_scale"].items():
        interval = f"{_num(est['low'])} .. {_num(est['high'])}" if est["value"] is not None else "-"
        table.add_row(phase, _num(est["step"]), _num(est["value"]), interval)
    screen.print(table)
    for note in _notes(out):
        screen.print(note)
    crit = out["critical_batch"]
    if crit is not None:
        screen.print(
            f"[bold]critical batch[/bold] B_crit ~ B_noise at the end = {crit['value']:.4g} "
            f"({_num(crit['low'])} .. {_num(crit['high'])}){_in_tokens(out, crit['value'])}, "
            f"{SOURCES['critical']}: below it, "
            "doubling the batch nearly halves the steps; at B_crit a run takes 2x the fewest "
            f"steps and 2x the fewest examples. This run (B={out['batch_size']}) takes "
            f"{crit['steps_over_min']:.3g}x the fewest steps, {crit['samples_over_min']:.3g}x "
            "the fewest examples.\n"
        )
        _print_scaling(out, screen)


def _in_tokens(out: dict[str, Any], examples: float) -> str:
    """`` sequences = N tokens`` for a sequence task (``tokens_per_example`` > 1), else empty."""
    tokens = out["tokens_per_example"]
    return f" sequences = {examples * tokens:.4g} tokens" if tokens > 1 else ""


def _notes(out: dict[str, Any]) -> list[str]:
    """Why an estimate is missing, partial or measured otherwise than asked."""
    notes = []
    if out["diverged_at"] is not None:
        notes.append(f"run diverged at step {out['diverged_at']}: the estimates stop there")
    if out["error"]:
        notes.append(f"run failed: {out['error']}")
    if out["fallback"]:
        notes.append(f"per_example fell back to split: {out['fallback']}")
    notes += [f"skipped {n} measurement(s): {why}" for why, n in out["skipped"].items()]
    end = out["noise_scale"]["end"]["value"]
    if end is None:
        notes.append("no estimate: it needs two measured steps")
    elif out["critical_batch"] is None:
        notes.append(
            "no critical batch: "
            + ("|G|^2 is lost in the noise, B_crit is beyond this run" if end else "no noise")
        )
    return notes


def _print_scaling(out: dict[str, Any], screen: Console) -> None:
    """Rule ``critical`` from this run to other batch sizes (no lr column at lr 0)."""
    with_lr, base = out["lr"] > 0, out["batch_size"]
    screen.print(
        f"[bold]rule critical[/bold] from B={base}"
        + (f", lr={out['lr']:g}: lr(B) = lr_max / (1 + B_noise/B)" if with_lr else "")
        + f"; steps and examples to the same loss relative to B={base}"
    )
    table = Table(box=box.SIMPLE_HEAD)
    for column in ("B", *(("lr",) if with_lr else ()), "steps x", "samples x", ""):
        table.add_column(column, justify="right" if column else "left")
    crit = round(out["critical_batch"]["value"])
    for row in out["scaling"]["rows"]:
        size = row["batch_size"]
        table.add_row(
            str(size),
            *((_num(row["lr"]),) if with_lr else ()),
            f"{row['steps_ratio']:.3g}",
            f"{row['samples_ratio']:.3g}",
            "~ B_crit" if size == crit else "this run" if size == base else "",
        )
    screen.print(table)
    for warning in out["scaling"]["warnings"]:
        console.print(f"[yellow]warning:[/yellow] {warning}")
