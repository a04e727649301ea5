"""A 16-point LR grid as one vectorized ensemble against the same 16 runs one after another.

At each batch size: wall seconds of ``train_ensemble`` on 16 specs (learning rates spaced
geometrically, SGD with momentum 0.9, one seed, a steps budget) and of the 16 runs trained one after
another with the plain ``DataLoader(TensorDataset(x, y), batch_size=B, shuffle=True)`` loop of
``bench_engine.py`` (same model, optimizer, steps and evaluations). The ratio is measured in one run,
medians of ``--repeats`` alternating repeats, one torch thread by default. Target: >= 8x at batch 64.

    python benchmarks/bench_sweep.py [--task mnist1d-mlp] [--batch-sizes 64,1024] [--points 16]
        [--samples 64000] [--repeats 3] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import time

from _common import alternating_medians, int_list, parse_args, print_json, print_table
from batchlab.engine.spec import RunSpec
from batchlab.engine.tasks import Task, get_task
from batchlab.engine.train import train_ensemble
from bench_engine import plain_loop

TARGET_RATIO = 8.0
LR_RANGE = (1e-3, 0.3)


def lr_grid(points: int) -> list[float]:
    """``points`` learning rates spaced geometrically over ``LR_RANGE``."""
    lo, hi = LR_RANGE
    return [lo * (hi / lo) ** (i / max(points - 1, 1)) for i in range(points)]


def ensemble(task: Task, batch_size: int, steps: int, lrs: list[float]) -> float:
    """The grid through ``train_ensemble`` (evaluating at the start and the end); wall seconds."""
    specs = [
        RunSpec(
            task=task.name,
            batch_size=batch_size,
            lr=lr,
            momentum=0.9,
            budget_unit="steps",
            budget=steps,
            eval_every=steps,
        )
        for lr in lrs
    ]
    start = time.perf_counter()
    results = train_ensemble(specs, task=task, device="cpu", max_members=len(specs))
    wall = time.perf_counter() - start
    assert all(r.extra["ensemble_size"] == len(specs) for r in results if r.status != "failed")
    return wall


def measure(task: Task, batch_size: int, steps: int, points: int, repeats: int) -> dict[str, float]:
    """Median seconds of the ensemble and of the sequential loops, alternating repeats."""
    lrs = lr_grid(points)
    v, s = alternating_medians(
        repeats,
        lambda _: ensemble(task, batch_size, steps, lrs),
        lambda _: sum(plain_loop(task, batch_size, steps, lr, 0) for lr in lrs),
    )
    return {"steps": steps, "ensemble_s": v, "sequential_s": s, "ratio": s / v}


def main() -> None:
    """Parse the options, measure each batch size, print a table (or one JSON object)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--task", default="mnist1d-mlp")
    ap.add_argument("--batch-sizes", default="64,1024")
    ap.add_argument("--points", type=int, default=16, help="learning rates in the grid")
    ap.add_argument("--samples", type=int, default=64000, help="examples per run")
    args, threads = parse_args(ap, repeats=3)
    task = get_task(args.task)
    rows = []
    for b in int_list(args.batch_sizes):
        steps = max(20, args.samples // b)
        rows.append({"batch_size": b, **measure(task, b, steps, args.points, args.repeats)})
    out = {
        "task": args.task,
        "points": args.points,
        "threads": threads,
        "repeats": args.repeats,
        "target_ratio": TARGET_RATIO,
        "rows": rows,
    }
    if args.json:
        print_json(out)
        return
    print_table(
        f"{args.points}-point LR grid on {args.task}, {threads} thread(s), median of {args.repeats}",
        ("batch", "steps", "ensemble s", "one after another s", "speed-up"),
        [
            (
                str(r["batch_size"]),
                str(r["steps"]),
                f"{r['ensemble_s']:.2f}",
                f"{r['sequential_s']:.2f}",
                f"{r['ratio']:.1f}x",
            )
            for r in rows
        ],
    )


if __name__ == "__main__":
    main()
