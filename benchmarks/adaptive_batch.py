"""Adaptive batch size against a fixed small and a fixed large batch: steps and samples to a target.

Three arms on a built-in task (SGD with momentum 0.9, several seeds, one validation every
``--eval-every`` steps):

- ``small``: fixed batch ``--small``, the best lr of ``--lrs`` (fewest mean steps to target);
- ``large``: fixed batch ``--large``, its own best lr of ``--lrs``;
- ``adaptive``: starts at ``--small`` with the small arm's best lr and grows the batch from the
  measured noise scale (``train --adaptive-batch``, rule ``--rule``); it is not tuned itself.

The claim (issue 14 item 3): the adaptive run reaches the target in fewer steps than the fixed
small batch and with fewer samples than the fixed large batch. Both are checked on the means over
seeds; the table gives mean, standard deviation and range over seeds.

    python benchmarks/adaptive_batch.py [--task mnist1d-mlp] [--small 32] [--large 512]
        [--lrs 0.01,0.03,0.1,0.3] [--seeds 5] [--epochs 8] [--target 1.3] [--rule auto]
        [--plot FILE.png] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections.abc import Sequence
from typing import Any

from _common import parse_args, print_json, print_table
from batchlab.core.fit import steps_to_target
from batchlab.engine.spec import RunResult, RunSpec
from batchlab.engine.tasks import get_task
from batchlab.engine.train import train, train_ensemble

CURVE_KEYS = ("step", "samples", "val_loss", "batch_size", "lr")


def reach(result: RunResult, target: float) -> tuple[float, float]:
    """(steps, samples) at the first evaluation with val_loss <= target; (inf, inf) if never."""
    h = result.history
    steps = steps_to_target(
        [r["step"] for r in h], [r["val_loss"] for r in h], target, higher_is_better=False
    )
    if math.isinf(steps):
        return math.inf, math.inf
    return steps, float(next(r["samples"] for r in h if r["step"] == steps))


def spread(values: Sequence[float]) -> dict[str, float]:
    """Mean, standard deviation, min and max over seeds (inf when a seed never reached it)."""
    finite = all(math.isfinite(v) for v in values)
    return {
        "mean": statistics.fmean(values) if finite else math.inf,
        "sd": statistics.stdev(values) if finite and len(values) > 1 else math.nan,
        "min": min(values),
        "max": max(values),
    }


def arm(name: str, batch: int, lr: float, results: list[RunResult], target: float) -> dict:
    """One arm's numbers over seeds, with the validation curves the figure draws."""
    reached = [reach(r, target) for r in results]
    return {
        "name": name,
        "batch_size": batch,
        "lr": lr,
        "steps": spread([s for s, _ in reached]),
        "samples": spread([e for _, e in reached]),
        "per_seed": [{"steps": s, "samples": e} for s, e in reached],
        "curves": [{k: [row[k] for row in r.history] for k in CURVE_KEYS} for r in results],
        "changes": [
            [(c["step"], c["batch_size"]) for c in r.extra["adaptive_batch"]["changes"]]
            for r in results
            if "adaptive_batch" in r.extra
        ],
    }


def fixed_arm(name: str, batch: int, args: argparse.Namespace, task: Any) -> tuple[dict, dict]:
    """The lr grid at one fixed batch (one vectorized ensemble); the arm at its best lr, and the
    mean steps of every lr."""
    specs = [
        RunSpec(batch_size=batch, lr=lr, seed=seed, **common(args))
        for lr in args.lrs
        for seed in range(args.seeds)
    ]
    results = train_ensemble(specs, task=task, device="cpu")
    arms = {
        lr: arm(name, batch, lr, [r for r in results if r.spec.lr == lr], args.target)
        for lr in args.lrs
    }
    best = min(args.lrs, key=lambda lr: arms[lr]["steps"]["mean"])
    return arms[best], {lr: a["steps"]["mean"] for lr, a in arms.items()}


def common(args: argparse.Namespace) -> dict[str, Any]:
    """The RunSpec fields every arm shares."""
    return {
        "task": args.task,
        "momentum": 0.9,
        "budget_unit": "epochs",
        "budget": args.epochs,
        "eval_every": args.eval_every,
    }


def adaptive_arm(lr: float, args: argparse.Namespace, task: Any) -> dict:
    """The adaptive run from the small batch and lr, one per seed."""
    results = [
        train(
            RunSpec(
                batch_size=args.small,
                lr=lr,
                seed=seed,
                noise_scale=True,
                adaptive_batch=True,
                adaptive_options={"rule": args.rule},
                **common(args),
            ),
            task=task,
            device="cpu",
        )
        for seed in range(args.seeds)
    ]
    out = arm("adaptive", args.small, lr, results, args.target)
    out["rule"] = results[0].extra["adaptive_batch"]["rule"]
    return out


def fmt(s: dict[str, float], digits: str = ".0f") -> str:
    """``mean ± sd (min-max)``."""
    if not math.isfinite(s["mean"]):
        return "not reached"
    return f"{s['mean']:{digits}} ± {s['sd']:{digits}} ({s['min']:{digits}}-{s['max']:{digits}})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--task", default="mnist1d-mlp")
    ap.add_argument("--small", type=int, default=32)
    ap.add_argument("--large", type=int, default=512)
    ap.add_argument("--lrs", type=lambda s: [float(x) for x in s.split(",")],
                    default=[0.01, 0.03, 0.1, 0.3])  # fmt: skip
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=float, default=8.0)
    ap.add_argument("--eval-every", type=int, default=4)
    ap.add_argument("--target", type=float, default=1.3, help="val_loss to reach")
    ap.add_argument("--rule", default="auto", help="adaptive lr rule (auto: critical for SGD)")
    ap.add_argument("--plot", help="Save the figure here (PNG).")
    args, threads = parse_args(ap, repeats=1)
    if args.seeds < 3:
        raise SystemExit("error: seeds: the evidence needs at least 3 seeds")
    task = get_task(args.task)
    small, small_grid = fixed_arm("small", args.small, args, task)
    large, large_grid = fixed_arm("large", args.large, args, task)
    adaptive = adaptive_arm(small["lr"], args, task)
    checks = {
        "fewer_steps_than_small": adaptive["steps"]["mean"] < small["steps"]["mean"],
        "fewer_samples_than_large": adaptive["samples"]["mean"] < large["samples"]["mean"],
    }
    out = {
        "task": args.task,
        "target": {"metric": "val_loss", "value": args.target},
        "seeds": args.seeds,
        "epochs": args.epochs,
        "rule": adaptive["rule"],
        "arms": [small, large, adaptive],
        "lr_grid_steps": {"small": small_grid, "large": large_grid},
        "checks": checks,
        "pass": all(checks.values()),
        "threads": threads,
    }
    if args.plot:
        from batchlab.report.figures import adaptive_figure

        adaptive_figure(out).savefig(args.plot, dpi=120)
    if args.json:
        print_json(out)
        return
    print_table(
        f"to val_loss <= {args.target:g} on {args.task}: mean ± sd (min-max) over {args.seeds} seeds",
        ["arm", "batch", "lr", "steps", "samples"],
        [
            [
                a["name"],
                f"{a['batch_size']}" + (" -> grows" if a["name"] == "adaptive" else ""),
                f"{a['lr']:g}",
                fmt(a["steps"]),
                fmt(a["samples"]),
            ]
            for a in out["arms"]
        ],
        left=["arm", "batch"],
        width=100,
    )
    finals = [path[-1][1] if path else args.small for path in adaptive["changes"]]
    print(f"adaptive final batch per seed: {finals} (rule {out['rule']})")
    for key, ok in checks.items():
        print(f"{key.replace('_', ' ')}: {'PASS' if ok else 'FAIL'}")


if __name__ == "__main__":
    main()
