"""Predicted against measured steps to a target, per batch size: the check behind ``batchlab plan``.

A small sweep (SGD with momentum 0.9, an lr grid per batch size, a few seeds) goes into a store as
one study with a target; the store's steps-to-target (``analysis.target``: best lr per batch size
and seed, median over seeds) is the measurement. Two predictions of it:

- ``leave-one-out``: S = S_min (1 + B_crit/B) fitted (``core.fit``) on the other batch sizes only,
  then predicted at the left-out one through ``core.plan`` (what ``plan --db`` does, held out);
- ``noise``: the plan a user gets before any sweep (``plan --task``): B_crit = the gradient noise
  scale of one short run, the target at the reference batch taken from the sweep, the other batch
  sizes predicted. B_simple only approximates B_crit (McCandlish et al. 2018, Sec. 2.2), so this
  one is reported, not required.

Target: leave-one-out within 30% of measured at every batch size. ``--db`` reads a finished store
instead of training (the study needs a target and at least three batch sizes that reach it).

    python benchmarks/bench_plan.py [--task mnist1d-mlp] [--batch-sizes 16,32,64,128,256,512]
        [--lrs 0.003,0.01,0.03,0.1,0.3] [--seeds 2] [--epochs 20] [--target 1.3]
        [--db FILE] [--study NAME] [--plot FILE.png] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

from _common import int_list, parse_args, print_json, print_table
from batchlab.analysis.study import load_study
from batchlab.analysis.target import to_target_table
from batchlab.core.fit import fit_steps_vs_batch
from batchlab.core.plan import StepTimeFit, Target, predict
from batchlab.engine.spec import RunSpec
from batchlab.engine.tasks import get_task
from batchlab.engine.train import train, train_ensemble
from batchlab.sweep.store import Store

TOLERANCE = 0.30
STUDY = "bench-plan"
NOISE_BATCH, NOISE_LR, NOISE_STEPS = 64, 0.05, 1000
# Steps only: a constant step time makes predict's wall time the steps themselves.
UNIT_TIME = StepTimeFit(1.0, 0.0, (1.0,), (1.0,), 0.0)


def run_sweep(args: argparse.Namespace, store: Store) -> None:
    """Train the grid (one vectorized ensemble per batch size and seed) into ``store``."""
    task = get_task(args.task)
    store.set_study(STUDY, {"target": {"metric": "val_loss", "value": args.target}})
    for b in args.batch_sizes:
        steps = math.ceil(args.epochs * task.n_train / b)
        for seed in range(args.seeds):
            specs = [
                RunSpec(
                    task=args.task,
                    batch_size=b,
                    lr=lr,
                    momentum=0.9,
                    budget_unit="epochs",
                    budget=args.epochs,
                    eval_every=max(1, steps // 100),
                    seed=seed,
                )
                for lr in args.lrs
            ]
            store.put_many(train_ensemble(specs, task=task, device="cpu"), study=STUDY)


def noise_scale(task: str) -> float:
    """B_noise at the end of the short run ``batchlab plan --task`` makes."""
    spec = RunSpec(
        task=task,
        batch_size=NOISE_BATCH,
        lr=NOISE_LR,
        budget_unit="steps",
        budget=NOISE_STEPS,
        noise_scale=True,
    )
    return float(train(spec, device="cpu").extra["noise_scale"]["end"]["value"])


def compare(measured: dict[int, float], b_noise: float | None, reference: int) -> list[dict]:
    """Per batch size: measured steps, leave-one-out and noise-scale predictions, their errors."""
    rows = []
    for b, steps in measured.items():
        others = {k: v for k, v in measured.items() if k != b}
        fit = fit_steps_vs_batch(list(others), list(others.values()), n_boot=0)
        (loo,) = predict(
            [b], target=Target(fit.s_min), critical_batch=fit.critical_batch, step_time=UNIT_TIME
        )
        row = {
            "batch_size": b,
            "measured": steps,
            "loo": loo.steps,
            "loo_error": loo.steps / steps - 1,
        }
        if b_noise is not None:
            target = Target(measured[reference], reference_batch=reference)
            (noise,) = predict([b], target=target, critical_batch=b_noise, step_time=UNIT_TIME)
            row.update(noise=noise.steps, noise_error=noise.steps / steps - 1)
        rows.append(row)
    return rows


def plot(rows: list[dict], path: Path, b_noise: float | None) -> None:
    """Measured and predicted steps against batch size (log-log)."""
    from matplotlib.figure import Figure

    from batchlab.report.figures import _batch_axis

    fig = Figure(figsize=(6.4, 4.6), layout="constrained")
    ax = fig.subplots()
    sizes = [r["batch_size"] for r in rows]
    ax.plot(sizes, [r["measured"] for r in rows], "ko", ms=7, label="measured (sweep)")
    ax.plot(sizes, [r["loo"] for r in rows], "s--", label="predicted, leave-one-out fit")
    if b_noise is not None:
        ax.plot(
            sizes, [r["noise"] for r in rows], "^:", label=f"predicted, B_noise = {b_noise:.3g}"
        )
    _batch_axis(ax, sizes)
    ax.set_yscale("log")
    ax.set_ylabel("steps to target")
    ax.legend(fontsize="small")
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="mnist1d-mlp")
    ap.add_argument("--batch-sizes", type=int_list, default=[16, 32, 64, 128, 256, 512])
    ap.add_argument("--lrs", type=lambda s: [float(x) for x in s.split(",")],
                    default=[0.003, 0.01, 0.03, 0.1, 0.3])  # fmt: skip
    ap.add_argument("--seeds", type=int, default=2)
    ap.add_argument("--epochs", type=float, default=20.0)
    ap.add_argument("--target", type=float, default=1.3, help="val_loss to reach")
    ap.add_argument("--db", type=Path, help="Read this store instead of training.")
    ap.add_argument("--study", default=None)
    ap.add_argument("--no-noise", action="store_true", help="Skip the noise-scale prediction.")
    ap.add_argument("--plot", type=Path)
    args, threads = parse_args(ap, repeats=1)
    if args.db is None:
        args.db = Path(tempfile.mkdtemp()) / "bench_plan.sqlite"
        with Store(args.db) as store:
            run_sweep(args, store)
        study = STUDY
    else:
        study = args.study
    data = load_study(args.db, study)
    if data.target is None:
        raise SystemExit(f"error: study: {data.name!r} in {args.db} has no target")
    table = to_target_table(data, data.target)
    measured = {r.batch_size: r.steps for r in table if r.reached}
    if len(measured) < 3:
        raise SystemExit(f"error: study: fewer than 3 batch sizes reached {data.target.describe()}")
    task = data.runs[0].spec.task
    b_noise = None if args.no_noise else noise_scale(task)
    reference = min(measured, key=lambda b: abs(math.log(b / NOISE_BATCH)))
    rows = compare(measured, b_noise, reference)
    ok = all(abs(r["loo_error"]) <= TOLERANCE for r in rows)  # the required check
    out = {
        "task": task,
        "target": data.target.describe(),
        "seeds": len(data.seeds),
        "noise_scale": b_noise,
        "reference_batch": reference,
        "fit_all": dict(zip(("s_min", "critical_batch"), _fit(measured), strict=True)),
        "rows": rows,
        "tolerance": TOLERANCE,
        "pass": ok,
        "threads": threads,
    }
    if args.plot is not None:
        plot(rows, args.plot, b_noise)
    if args.json:
        print_json(out)
        return
    columns = ["B", "measured", "leave-one-out", "error"]
    if b_noise is not None:
        columns += [f"B_noise={b_noise:.3g}", "error"]
    print_table(
        f"steps to {out['target']} on {task} ({out['seeds']} seeds; noise prediction from "
        f"B={reference})",
        columns,
        [
            [
                str(r["batch_size"]),
                f"{r['measured']:.0f}",
                f"{r['loo']:.0f}",
                f"{r['loo_error']:+.0%}",
            ]
            + ([f"{r['noise']:.0f}", f"{r['noise_error']:+.0%}"] if b_noise is not None else [])
            for r in rows
        ],
    )
    s_min, b_crit = _fit(measured)
    print(f"fit on all: S_min = {s_min:.4g}, B_crit = {b_crit:.4g}; runs in {args.db}")
    for key, name in (("loo_error", "leave-one-out"), ("noise_error", "from the noise scale")):
        if key in rows[0]:
            worst = max(abs(r[key]) for r in rows)
            verdict = "PASS" if worst <= TOLERANCE else "FAIL"
            print(
                f"{name} within {TOLERANCE:.0%} at every batch size: {verdict} (worst {worst:.0%})"
            )


def _fit(measured: dict[int, float]) -> tuple[float, float]:
    fit = fit_steps_vs_batch(list(measured), list(measured.values()), n_boot=0)
    return fit.s_min, fit.critical_batch


if __name__ == "__main__":
    main()
