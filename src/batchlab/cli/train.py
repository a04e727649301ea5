"""``batchlab train``: one run from the command line, optionally stored in the run database."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress
from rich.table import Table

from batchlab.cli._app import (
    DEFAULT_MAX_STEPS,
    BatchSizeOpt,
    DeviceOpt,
    JsonOpt,
    MaxStepsOpt,
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
from batchlab.cli._interrupt import stop_on_ctrl_c
from batchlab.engine.spec import OPTIMIZERS, RunResult, RunSpec, SpecError

log = logging.getLogger(__name__)


def parse_options(pairs: Sequence[str] | None, field: str = "task_option") -> dict[str, Any]:
    """``["n_samples=50000", "norm=batch"]`` -> ``{"n_samples": 50000, "norm": "batch"}`` (JSON values;
    ``None``, an option not given: ``{}``)."""
    out: dict[str, Any] = {}
    for pair in pairs or ():
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            fail(field, f"expected KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def budget_of(epochs: float | None, steps: int | None, samples: int | None) -> tuple[str, float]:
    """The one budget given on the command line (epochs by default: 1 epoch)."""
    pairs = (("epochs", epochs), ("steps", steps), ("samples", samples))
    given = [(u, v) for u, v in pairs if v is not None]
    if len(given) > 1:
        fail("budget", "give one of --epochs, --steps, --samples")
    return given[0] if given else ("epochs", 1.0)


def open_store(db: Path | None) -> Any:
    """The run store at ``db`` (created when missing), or ``None``; an unusable file is exit 2."""
    if db is None:
        return None
    from batchlab.sweep.store import Store, StoreError

    try:
        return Store(db)
    except StoreError as exc:
        fail_on(exc)


def store_result(store: Any, result: RunResult, study: str | None, weights: Any = None) -> None:
    """Put one run in the store and close it; a store error (e.g. still locked) is exit 2."""
    from batchlab.sweep.store import StoreError

    with store:
        try:
            store.put(result, study=study, weights=weights)
        except StoreError as exc:
            fail_on(exc)


def _stopped(spec: RunSpec, bar: Progress, db: Path | None) -> str:
    """What an interrupted ``train`` leaves: nothing stored (a partial run must never look finished,
    so a resumed sweep trains it again)."""
    (task,) = bar.tasks
    stored = f"; nothing was stored in {db}" if db is not None else ""
    return f"run {spec.run_id} stopped at step {task.completed:.0f} of {task.total:.0f}{stored}"


def result_table(result: RunResult) -> Table:
    """The key numbers of one run as a rich table."""
    table = Table(title=f"run {result.run_id}: {result.status}", show_header=False)
    f = result.final
    rows = [
        ("task", result.spec.task),
        ("batch size / lr", f"{result.spec.batch_size} / {result.spec.lr:g}"),
        ("steps / samples", f"{result.steps} / {result.samples}"),
        ("epochs", f"{result.to_dict()['epochs']:.3g}"),
        (
            "train loss / metric",
            f"{f.get('train_loss', float('nan')):.4f} / {f.get('train_metric', float('nan')):.4f}",
        ),
        (
            "val loss / metric",
            f"{f.get('val_loss', float('nan')):.4f} / {f.get('val_metric', float('nan')):.4f}",
        ),
        ("wall time", f"{result.wall_s:.1f} s"),
    ]
    if result.diverged_at is not None:
        rows.append(("diverged at step", str(result.diverged_at)))
    if result.error:
        rows.append(("error", result.error))
    for key, value in result.extra.get("sharpness", {}).items():
        rows.append(
            (f"sharpness: {key}", f"{value:.4g}" if isinstance(value, float) else str(value))
        )
    adaptive = result.extra.get("adaptive_batch")
    if adaptive:
        path = [str(result.spec.batch_size)]
        path += [f"{c['batch_size']} (step {c['step']})" for c in adaptive["changes"]]
        rows.append((f"adaptive batch ({adaptive['rule']})", " -> ".join(path)))
        rows.append(("final lr", f"{result.spec.lr * adaptive['final_lr_scale']:.4g}"))
    for key, label in (("start", "noise scale (start)"), ("end", "noise scale (end)")):
        est = result.extra.get("noise_scale", {}).get(key)
        if est:
            rows.append((label, f"{est['value']:.4g} [{est['low']:.4g}, {est['high']:.4g}]"))
    for name, value in rows:
        table.add_row(name, escape(value))
    return table


def adaptive_options(
    on: bool, rule: str, max_batch: int | None, pairs: Sequence[str]
) -> dict[str, Any]:
    """The ``RunSpec.adaptive_options`` of the command line; any of them without
    ``--adaptive-batch`` is exit 2."""
    out = parse_options(pairs, "adaptive_option")
    if not on:
        if out or rule != "auto" or max_batch is not None:
            fail(
                "adaptive_batch",
                "--adaptive-rule, --max-batch-size and --adaptive-option need --adaptive-batch",
            )
        return {}
    out["rule"] = rule
    if max_batch is not None:
        out["max_batch"] = max_batch
    return out


@app.command()
def train(
    task: TaskOpt,
    batch_size: BatchSizeOpt,
    lr: float = typer.Option(..., help="Peak learning rate (after warmup)."),
    optimizer: str = typer.Option("sgd", help=f"One of {', '.join(OPTIMIZERS)}."),
    momentum: float = typer.Option(0.0, help="SGD momentum."),
    nesterov: bool = typer.Option(False, help="Nesterov momentum (SGD)."),
    weight_decay: float = typer.Option(
        0.0, "--weight-decay", help="L2 (SGD, Adam) or decoupled (AdamW)."
    ),
    beta1: float = typer.Option(0.9, help="Adam beta1."),
    beta2: float = typer.Option(0.999, help="Adam beta2."),
    schedule: str = typer.Option(
        "constant", help="LR schedule: constant, cosine, linear, step, multistep, exponential."
    ),
    schedule_option: list[str] = typer.Option(
        [],
        "--schedule-option",
        help="Schedule parameter KEY=VALUE (repeatable), e.g. milestones=[0.5,0.75].",
    ),
    warmup_epochs: float = typer.Option(0.0, "--warmup-epochs", help="Warmup length in epochs."),
    warmup: str = typer.Option("linear", help="Warmup shape: linear or exponential."),
    epochs: float | None = typer.Option(None, help="Budget in epochs (default 1)."),
    steps: int | None = typer.Option(None, help="Budget in optimizer steps."),
    samples: int | None = typer.Option(None, help="Budget in examples seen."),
    seed: int = typer.Option(0, help="Seed of the initial weights and the batch order."),
    micro_batch_size: int | None = typer.Option(
        None,
        "--micro-batch-size",
        help="Gradient accumulation: micro-batch size dividing --batch-size.",
    ),
    eval_every: int = typer.Option(
        0, "--eval-every", help="Evaluate every N steps (0: about 50 times per run)."
    ),
    task_option: TaskOptionsOpt = None,
    noise_scale: bool = typer.Option(
        False, "--noise-scale", help="Measure the gradient noise scale during training."
    ),
    adaptive_batch: bool = typer.Option(
        False,
        "--adaptive-batch",
        help="Grow the batch from --batch-size as the measured noise scale grows (implies "
        "--noise-scale); each change is logged in the result.",
    ),
    adaptive_rule: str = typer.Option(
        "auto",
        "--adaptive-rule",
        help="LR rule as the batch grows: auto (critical for SGD, seesaw for Adam), constant, "
        "linear, critical, seesaw.",
    ),
    max_batch_size: int | None = typer.Option(
        None, "--max-batch-size", help="Adaptive batch: the largest batch (default: the data set)."
    ),
    adaptive_option: list[str] = typer.Option(
        [],
        "--adaptive-option",
        help="Adaptive batch setting KEY=VALUE (repeatable): factor, patience, every, "
        "max_doublings, shrink, min_batch, use_low.",
    ),
    sharpness: bool = typer.Option(
        False, "--sharpness", help="Measure sharpness (top Hessian eigenvalue, Keskar) at the end."
    ),
    save_weights: bool = typer.Option(
        False, "--save-weights", help="Store the final weights (needs --db)."
    ),
    device: DeviceOpt = None,
    threads: int = typer.Option(
        1, help="Torch CPU threads: 1 is fastest for small models; raise it for large CNN batches."
    ),
    db: RunDbOpt = None,
    study: RunStudyOpt = None,
    max_steps: MaxStepsOpt = DEFAULT_MAX_STEPS,
    json_out: JsonOpt = False,
) -> None:
    """Train one run and print its result (status, steps, final losses and metric, wall time)."""
    from batchlab.engine.data import configure_threads, resolve_device
    from batchlab.engine.tasks import get_task
    from batchlab.engine.train import check_batches, plan
    from batchlab.engine.train import train as run_train

    if not lr > 0:
        fail("lr", f"must be > 0, got {lr}")
    if save_weights and db is None:
        fail("save_weights", "needs --db to store the weights in")
    if threads < 1:
        fail("threads", f"must be >= 1, got {threads}")
    configure_threads(threads)
    unit, amount = budget_of(epochs, steps, samples)
    options = parse_options(task_option)
    adaptive = adaptive_options(adaptive_batch, adaptive_rule, max_batch_size, adaptive_option)
    try:
        spec = RunSpec(
            task=task,
            batch_size=batch_size,
            lr=lr,
            task_options=tuple(options.items()),
            optimizer=optimizer,
            momentum=momentum,
            nesterov=nesterov,
            beta1=beta1,
            beta2=beta2,
            weight_decay=weight_decay,
            schedule=schedule,
            schedule_options=tuple(parse_options(schedule_option, "schedule_option").items()),
            warmup_epochs=warmup_epochs,
            warmup=warmup,
            budget_unit=unit,
            budget=amount,
            eval_every=eval_every,
            seed=seed,
            micro_batch_size=micro_batch_size,
            noise_scale=noise_scale or adaptive_batch,
            adaptive_batch=adaptive_batch,
            adaptive_options=adaptive,
        )
        built = get_task(task, **options)
        p = plan(spec, built.n_train)
        check_batches(spec, built)
        dev = resolve_device(device)
    except SpecError as exc:
        fail_on(exc)
    if p.total_steps > max_steps:
        fail(
            "budget",
            f"{p.total_steps:,} steps planned ({p.total_samples:,} samples), more than --max-steps "
            f"{max_steps:,}; raise --max-steps to train this run",
        )
    store = open_store(db)
    console.print(f"[dim]{escape(p.describe(spec))}[/dim]")
    bar = progress_bar("training", disable=json_out, unit="steps")
    job = bar.add_task("train", total=p.total_steps)
    with stop_on_ctrl_c(lambda: _stopped(spec, bar, db), "rerun"), bar:
        result = run_train(
            spec,
            task=built,
            device=dev,
            progress=lambda done, total: bar.update(job, completed=done),
            keep_weights=save_weights or sharpness,
        )
    if sharpness and result.status == "ok":
        from batchlab.engine.sharpness import run_sharpness

        result.extra["sharpness"] = run_sharpness(spec, result.weights, task=built, device=dev)
    if store is not None:
        store_result(store, result, study, result.weights if save_weights else None)
    if json_out:
        emit_json(result.to_dict())
    else:
        Console().print(result_table(result))
    if result.status == "failed":
        fail_run(f"{result.run_id} failed", result.error or "unknown error")
