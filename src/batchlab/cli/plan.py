"""``batchlab plan``: which batch size reaches a target soonest, or cheapest, on this hardware.

Three inputs meet (``batchlab.core.plan``): the critical batch size with its interval (given, fitted
on a stored study, or measured now as the noise scale of a short run), a throughput table (read
from ``--throughput FILE`` or measured now) and a target in steps (at a reference batch, or S_min).
Given numbers and files only, the command is arithmetic and never imports torch; ``--task`` is
what trains.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import typer
from rich import box
from rich.console import Console
from rich.table import Table

from batchlab.cli._app import (
    DeviceOpt,
    JsonOpt,
    TaskOptionsOpt,
    app,
    console,
    emit_json,
    fail,
    fail_on,
    progress_bar,
)
from batchlab.core.plan import (
    Target,
    ThroughputTable,
    candidate_batches,
    device_counts,
    predict,
    recommend,
)
from batchlab.core.rules import ADAM_DEFAULTS, OPTIMIZERS, SOURCES
from batchlab.errors import FieldError

NOISE_BATCH = 64
NOISE_LR = 0.05
NOISE_STEPS = 1000
THROUGHPUT_POINTS = 5
"""Defaults of the quick measurement ``--task`` makes when no critical batch or table is given."""


def _unit(seconds: float) -> tuple[str, float]:
    """The unit a table of wall times up to ``seconds`` reads best in, and its length in s."""
    if seconds < 120:
        return "s", 1.0
    return ("min", 60.0) if seconds < 7200 else ("h", 3600.0)


def _hours(seconds: float) -> str:
    if not math.isfinite(seconds):
        return "-"
    if seconds < 120:
        return f"{seconds:.3g} s"
    if seconds < 7200:
        return f"{seconds / 60:.3g} min"
    return f"{seconds / 3600:.3g} h"


def _parse_sizes(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        sizes = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        fail("batch_sizes", f"expected comma-separated integers, got {text!r}")
    if not sizes or sizes[0] < 1:
        fail("batch_sizes", f"must be integers >= 1, got {text!r}")
    return sizes


def read_throughput(path: Path) -> ThroughputTable:
    """A throughput table written by ``plan --save-throughput``; a bad file is exit 2."""
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        fail("throughput", f"cannot read {path}: {exc}")
    try:
        return ThroughputTable.from_dict(data)
    except FieldError as exc:
        fail("throughput", f"{path}: {exc.message}")


def _study_inputs(db: Path, study: str | None) -> dict[str, Any]:
    """S_min and B_crit (with interval) of the critical-batch fit of a stored study."""
    from batchlab.analysis.study import load_study
    from batchlab.analysis.target import fit_scaling, to_target_table
    from batchlab.engine.spec import SpecError
    from batchlab.sweep.store import StoreError

    if not db.exists():
        fail("db", f"no store at {db}")
    try:
        data = load_study(db, study)
    except (SpecError, StoreError) as exc:
        fail_on(exc)
    if data.target is None:
        fail("study", f"study {data.name!r} has no target; sweep files set one ([target])")
    fit = fit_scaling(to_target_table(data, data.target))
    if fit is None:
        fail(
            "study", f"fewer than two batch sizes of {data.name!r} reached {data.target.describe()}"
        )
    # The target as the fitted steps at the middle measured batch size: the same curve at the
    # fitted B_crit, and the interval pinches where the study measured (S_min and B_crit move
    # together; holding S_min fixed while B_crit moves would not).
    sizes = sorted(fit.fit.batch_sizes)
    middle = sizes[len(sizes) // 2]
    return {
        "source": f"study {data.name!r} in {db}: fit of steps to {data.target.describe()}",
        "critical_batch": fit.critical_batch,
        "interval": fit.critical_batch_interval,
        "target": Target(float(fit.fit.predict_steps(middle)), reference_batch=middle),
    }


def _measure_noise(
    task: str,
    options: dict[str, Any],
    device: str | None,
    steps: int,
    quiet: bool,
    base: tuple[int, float, str] | None = None,
) -> dict[str, Any]:
    """B_noise at the end of a short run (its interval too); the run's steps are the target.

    The run trains at ``base`` (batch, lr, optimizer: the user's known setting, so the noise is
    measured where they train) or else with SGD at batch 64, lr 0.05.
    """
    from batchlab.engine.spec import RunSpec, SpecError
    from batchlab.engine.train import train

    batch, lr, optimizer = base or (NOISE_BATCH, NOISE_LR, "sgd")
    try:
        spec = RunSpec(
            task=task,
            batch_size=batch,
            lr=lr,
            optimizer=optimizer,
            task_options=tuple(options.items()),
            budget_unit="steps",
            budget=steps,
            noise_scale=True,
        )
        with progress_bar("noise scale", disable=quiet, unit="steps") as bar:
            job = bar.add_task("noise", total=steps)
            result = train(spec, device=device, progress=lambda d, t: bar.update(job, completed=d))
    except SpecError as exc:
        fail_on(exc)
    end = result.extra.get("noise_scale", {}).get("end", {})
    value = end.get("value")
    if result.status != "ok" or value is None or not 0 < value < math.inf:
        fail("task", f"no finite noise scale from {steps} steps of {task} ({result.status})")
    low, high = end.get("low"), end.get("high")
    interval = None
    if low is not None:  # high is None when |G|^2 is not resolved from zero: unbounded
        interval = (min(low, value), math.inf if high is None else max(high, value))
    return {
        "source": f"noise scale at the end of {steps} {optimizer} steps of {task} at B={batch}, "
        f"lr={lr:g} (B_crit ~ B_noise, {SOURCES['critical']})",
        "critical_batch": float(value),
        "interval": interval,
        "target": Target(float(result.steps), reference_batch=batch),
        "base": (batch, lr),
    }


def n_train_of(task: str | None, options: dict[str, Any]) -> int:
    """Training examples of the task (a batch never exceeds them)."""
    from batchlab.engine.spec import SpecError
    from batchlab.engine.tasks import get_task

    try:
        return get_task(str(task), **options).n_train
    except SpecError as exc:
        fail_on(exc)


def _measure_throughput(
    task: str, options: dict[str, Any], device: str | None, sizes: list[int], optimizer: str
) -> ThroughputTable:
    from batchlab.engine.spec import SpecError
    from batchlab.engine.tasks import get_task
    from batchlab.engine.throughput import measure_throughput

    try:
        built = get_task(task, **options)
        return measure_throughput(built, sizes, device=device, optimizer=optimizer)
    except SpecError as exc:
        fail_on(exc)


def _spread(sizes: list[int], points: int) -> list[int]:
    """``points`` sizes spread geometrically over ``sizes`` (all of them when there are few)."""
    if len(sizes) <= points:
        return sizes
    picks = {sizes[round(i * (len(sizes) - 1) / (points - 1))] for i in range(points)}
    return sorted(picks)


@app.command()
def plan(
    task: str | None = typer.Option(
        None, "--task", help="Measure what is not given on this task (noise scale, throughput)."
    ),
    critical_batch: float | None = typer.Option(
        None, "--critical-batch", "--noise-scale", help="B_crit (or the noise scale B_noise)."
    ),
    critical_low: float | None = typer.Option(None, help="Low end of the B_crit interval."),
    critical_high: float | None = typer.Option(None, help="High end of the B_crit interval."),
    db: Path | None = typer.Option(
        None, "--db", help="Take S_min and B_crit from the fit of a stored study."
    ),
    study: str | None = typer.Option(None, help="Study in --db (default: the only one)."),
    target_steps: float | None = typer.Option(
        None, help="Steps to the target at --reference-batch (or S_min without it)."
    ),
    target_samples: float | None = typer.Option(
        None, help="Examples to the target at --reference-batch."
    ),
    reference_batch: int | None = typer.Option(None, help="Batch size the target was measured at."),
    throughput: Path | None = typer.Option(
        None, "--throughput", help="Throughput table JSON (from --save-throughput)."
    ),
    save_throughput: Path | None = typer.Option(
        None, help="Write the measured throughput table to this JSON file."
    ),
    devices: int = typer.Option(1, help="Data-parallel devices (B is split across them)."),
    batch_sizes: str | None = typer.Option(
        None, help="Candidate batch sizes, comma-separated (default: powers of 2)."
    ),
    batch_size: int | None = typer.Option(
        None, "--batch-size", help="Base batch B0 whose lr is known (for the lr advice)."
    ),
    lr: float | None = typer.Option(None, help="Base lr at --batch-size (for the lr advice)."),
    optimizer: str = typer.Option("sgd", help=f"One of {', '.join(OPTIMIZERS)}."),
    beta2: float = typer.Option(ADAM_DEFAULTS["beta2"], help="Adam beta2 at --batch-size."),
    train_size: int | None = typer.Option(None, help="Training examples N (for warmup steps)."),
    warmup_epochs: float | None = typer.Option(
        None, help="Warmup epochs of the lr advice (default 5 when the lr grows, Goyal)."
    ),
    task_option: TaskOptionsOpt = None,
    device: DeviceOpt = None,
    plot: Path | None = typer.Option(None, "--plot", help="Save time and cost against B (PNG)."),
    noise_steps: int = typer.Option(
        NOISE_STEPS, help="Steps of the --task run that measures the noise scale (and the target)."
    ),
    json_out: JsonOpt = False,
) -> None:
    """Steps, samples, wall time and device-hours to a target for each batch size; the fastest and
    the cheapest batch size with the lr for each."""
    from batchlab.cli.train import parse_options

    sizes = _parse_sizes(batch_sizes)
    options = parse_options(task_option)
    if optimizer not in OPTIMIZERS:
        fail("optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if devices < 1:
        fail("devices", f"must be an integer >= 1, got {devices}")
    if noise_steps < 2:
        fail(
            "noise_steps",
            f"must be >= 2 (an estimate folds in two measured steps), got {noise_steps}",
        )
    if warmup_epochs is not None and not warmup_epochs >= 0:
        fail("warmup_epochs", f"must be a number >= 0, got {warmup_epochs}")
    if (batch_size is None) != (lr is None):
        fail("lr", "the lr advice needs both --batch-size and --lr")
    if target_steps is not None and target_samples is not None:
        fail("target_samples", "give --target-steps or --target-samples, not both")
    if target_samples is not None and reference_batch is None:
        fail("reference_batch", "--target-samples needs the batch size it was measured at")
    given_target = target_steps is not None or target_samples is not None
    if db is not None and (critical_batch is not None or given_target):
        fail("db", "a study gives B_crit and the target; drop --critical-batch/--target-*")
    if (critical_low is None) != (critical_high is None):
        fail("critical_low", "give both ends of the B_crit interval or neither")
    if task is None and throughput is None:
        fail("throughput", "give --throughput FILE or --task to measure it")
    if task is None and db is None and critical_batch is None:
        fail("critical_batch", "give --critical-batch, --db (a stored study) or --task")
    if db is None and not given_target and (task is None or critical_batch is not None):
        fail("target_steps", "give --target-steps or --target-samples (or --task to measure both)")
    if plot is not None and plot.suffix.lower() != ".png":
        fail("plot", f"must be a .png file, got {plot}")
    table = read_throughput(throughput) if throughput is not None else None

    target = None
    try:
        if target_samples is not None:
            target = Target.from_samples(target_samples, reference_batch)
        elif target_steps is not None:
            target = Target(target_steps, reference_batch)
    except FieldError as exc:
        fail_on(exc)
    if critical_batch is not None and not (math.isfinite(critical_batch) and critical_batch > 0):
        fail("critical_batch", f"must be a number > 0, got {critical_batch!r}")
    if db is not None:
        inputs = _study_inputs(db, study)
    elif critical_batch is not None:
        inputs = {"source": "given", "critical_batch": critical_batch}
        if critical_low is not None and critical_high is not None:
            inputs["interval"] = (critical_low, critical_high)
    else:
        assert task is not None
        known = (batch_size, lr, optimizer) if batch_size is not None and lr is not None else None
        inputs = _measure_noise(task, options, device, noise_steps, json_out, known)
        if known is None and optimizer != "sgd":  # the run's lr is an SGD lr: no base for Adam
            inputs.pop("base")
    if target is not None:
        inputs["target"] = target
    bc = inputs["critical_batch"]
    if sizes is None:  # powers of 2 around B_crit, up to the training set or the memory limit
        low = max(devices, min(8, 2 ** math.floor(math.log2(max(bc, 1)))))
        high = table.max_batch * devices if table is not None else n_train_of(task, options)
        sizes = candidate_batches(low, max(low, min(round(16 * bc), high)))
    if table is None:
        assert task is not None
        table = _measure_throughput(
            task, options, device, _spread(sizes, THROUGHPUT_POINTS), optimizer
        )
        if save_throughput is not None:
            save_throughput.write_text(json.dumps(table.to_dict(), indent=2) + "\n")
    base = (batch_size, lr) if batch_size is not None else inputs.get("base")
    if train_size is None and task is not None:
        train_size = n_train_of(task, options)
    try:
        out = plan_report(
            sizes,
            inputs=inputs,
            table=table,
            devices=devices,
            base=base,
            optimizer=optimizer,
            n_train=train_size,
            beta2=beta2,
            warmup_epochs=warmup_epochs,
        )
    except FieldError as exc:
        fail_on(exc)
    if plot is not None:
        _save_plot(out, plot)
    if json_out:
        emit_json(out)
    else:
        _print(out)


def plan_report(
    sizes: list[int],
    *,
    inputs: dict[str, Any],
    table: ThroughputTable,
    devices: int,
    base: tuple[int, float] | None,
    optimizer: str,
    n_train: int | None,
    beta2: float,
    warmup_epochs: float | None = None,
) -> dict[str, Any]:
    """Everything ``batchlab plan`` prints, as one JSON-ready dict (arithmetic only, no torch)."""
    fit = table.step_time()
    bc = float(inputs["critical_batch"])
    interval = inputs.get("interval")
    if interval is not None and not (math.isfinite(interval[0]) and interval[1] == interval[1]):
        interval = None  # no lower end (or NaN): no interval; an upper end may be inf
    if interval is not None:  # an interval from a bootstrap may miss the point estimate
        interval = (min(interval[0], bc), max(interval[1], bc))
    preds = predict(
        sizes,
        target=inputs["target"],
        critical_batch=bc,
        step_time=fit,
        devices=devices,
        critical_interval=interval,
    )
    options: dict[str, Any] = {"beta2": beta2} if optimizer != "sgd" else {}
    if warmup_epochs is not None:
        options["warmup_epochs"] = warmup_epochs
    fewer = [
        p
        for d in device_counts(devices)[:-1]
        for p in predict(
            sizes,
            target=inputs["target"],
            critical_batch=bc,
            step_time=fit,
            devices=d,
            critical_interval=interval,
        )
    ]
    fast, cheap = recommend(
        preds + fewer,
        critical_batch=bc,
        base_batch=base[0] if base else None,
        base_lr=base[1] if base else None,
        optimizer=optimizer,
        n_train=n_train,
        **options,
    )
    target: Target = inputs["target"]
    return {
        "critical_batch": bc,
        "critical_interval": list(interval) if interval else None,
        "critical_source": inputs["source"],
        "target": {
            "steps": target.steps,
            "reference_batch": target.reference_batch,
            "s_min": target.s_min(bc),
            "e_min": target.s_min(bc) * bc,
        },
        "devices": devices,
        "throughput": {
            "device": table.device,
            "task": table.task,
            "max_batch": table.max_batch,
            "max_batch_source": table.max_batch_source,
            "overhead_s": fit.overhead_s,
            "per_example_s": fit.per_example_s,
            "fit_max_residual": fit.max_residual,
            "fit_ok": fit.ok,
            "measured": [
                {"batch_size": b, "seconds": s}
                for b, s in zip(table.batch_sizes, table.seconds, strict=True)
            ],
        },
        "predictions": [p.to_dict() for p in preds],
        "fastest": fast.to_dict(),
        "cheapest": cheap.to_dict(),
        "source": SOURCES["critical"],
    }


def _interval(low: float, high: float, fmt: Any) -> str:
    return "" if math.isclose(low, high, rel_tol=1e-9) else f" ({fmt(low)}-{fmt(high)})"


def _print(out: dict[str, Any]) -> None:
    """The inputs, the per-B table, then the two recommendations (at least 110 columns wide)."""
    screen = Console(width=max(Console().width, 110))
    ci = out["critical_interval"]
    tp = out["throughput"]
    screen.print(
        f"[bold]B_crit[/bold] = {out['critical_batch']:.4g}"
        + (f" ({ci[0]:.4g} .. {'inf' if ci[1] is None else f'{ci[1]:.4g}'})" if ci else "")
        + f" from {out['critical_source']}",
        markup=True,
        highlight=False,
    )
    t = out["target"]
    ref = f" at B={t['reference_batch']:g}" if t["reference_batch"] else " (S_min)"
    screen.print(
        f"target: {t['steps']:.5g} steps{ref}; S_min = {t['s_min']:.4g}, E_min = {t['e_min']:.4g}"
    )
    screen.print(
        f"throughput on {tp['device']} ({tp['task']}): t(b) = {1e3 * tp['overhead_s']:.3g} ms + "
        f"{1e6 * tp['per_example_s']:.3g} us x b, worst fit error {tp['fit_max_residual']:.0%}; "
        f"largest batch {tp['max_batch']} ({tp['max_batch_source']}); {out['devices']} device(s)",
        markup=False,  # the task is a user's name
    )
    if not tp["fit_ok"]:
        console.print(
            "[yellow]warning:[/yellow] the affine step-time model misses a measurement by more "
            "than 25%; predictions interpolate the measurements instead"
        )
    unit, scale = _unit(max(p["wall_s"] for p in out["predictions"]))
    table = Table(box=box.SIMPLE_HEAD, caption="(low-high): over the B_crit interval")
    for column in ("B", "ms/step", "steps", "samples", f"wall ({unit})", "device-h", ""):
        table.add_column(column, justify="left" if column == "" else "right", no_wrap=True)
    fast, cheap = ((out[g]["batch_size"], out[g]["devices"]) for g in ("fastest", "cheapest"))
    for p in out["predictions"]:
        mark = " ".join(
            name
            for name, pick in (("fastest", fast), ("cheapest", cheap))
            if pick == (p["batch_size"], p["devices"])
        )
        size = str(p["batch_size"])
        if p["accumulation"] > 1:  # micro-batches per device and step
            size += f" (x{p['accumulation']})"
        table.add_row(
            size,
            f"{1e3 * p['step_time_s']:.3g}",
            f"{p['steps']:.4g}" + _interval(*p["steps_interval"], lambda v: f"{v:.4g}"),
            f"{p['samples']:.3g}",
            f"{p['wall_s'] / scale:.3g}"
            + _interval(*p["wall_interval"], lambda v: f"{v / scale:.3g}"),
            f"{p['device_hours']:.2g}",
            mark,
        )
    screen.print(table)
    for rec in (out["fastest"], out["cheapest"]):
        line = (
            f"[bold]{rec['goal']}[/bold]: B = {rec['batch_size']} on {rec['devices']} device(s), "
            f"{_hours(rec['wall_s'])}, "
            f"{rec['device_hours']:.3g} device-hours, {rec['steps']:.4g} steps"
        )
        advice = rec.get("advice")
        if advice is not None:
            line += f"; lr {advice['lr']:.4g} (rule {advice['rule']}"
            if advice.get("beta2") is not None:
                line += f", beta2 {advice['beta2']:.6g}"
            if advice["warmup_epochs"]:
                steps = advice["warmup_steps"]
                line += f", warmup {advice['warmup_epochs']:g} epochs"
                line += f" = {steps} steps" if steps is not None else ""
            line += ")"
        screen.print(line, highlight=False)
    if out["fastest"].get("advice") is None:
        screen.print("lr advice: give --batch-size and --lr (a batch size whose lr you know)")
    notes = {
        w
        for rec in (out["fastest"], out["cheapest"])
        for w in rec.get("advice", {}).get("warnings", [])
    }
    for warning in sorted(notes):
        console.print(f"[yellow]warning:[/yellow] {warning}", markup=True, highlight=False)


def _save_plot(out: dict[str, Any], path: Path) -> None:
    """Wall time and device-hours against B with their intervals, the recommendations marked."""
    from batchlab.report.figures import plan_figure

    try:
        plan_figure(out).savefig(path, dpi=120)
    except OSError as exc:
        fail("plot", f"cannot write {path}: {exc}")
