"""Engine throughput against the loop a user would write, as ratios measured in one run.

For each task and batch size: samples/s of ``batchlab.engine.train.train`` (device-resident tensors,
index slices of a seeded permutation) and of the plain loop over
``DataLoader(TensorDataset(x, y), batch_size=B, shuffle=True)`` with the same model, optimizer (SGD,
momentum 0.9), number of steps and the same evaluations (validation set at the start and the end, then
validation and training sets for the final numbers). Medians of ``--repeats`` alternating repeats.

    python benchmarks/bench_engine.py [--tasks mnist1d-mlp,fashion-mlp] [--batch-sizes 32,256,2048]
        [--samples 60000] [--repeats 3] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import time

import torch
from torch.utils.data import DataLoader, TensorDataset

from _common import alternating_medians, int_list, parse_args, print_json
from batchlab.engine.spec import RunSpec
from batchlab.engine.tasks import Task, get_task
from batchlab.engine.train import train


def evaluate(model: torch.nn.Module, task: Task, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean loss over a full set, as the engine does at the start, the end and for ``final``."""
    with torch.no_grad():
        model.eval()
        loss = task.loss_fn(model(x), y).item()
        model.train()
    return loss


def plain_loop(task: Task, batch_size: int, steps: int, lr: float, seed: int) -> float:
    """The DataLoader loop a user would write, doing the engine's evaluations; returns seconds."""
    start = time.perf_counter()
    torch.manual_seed(seed)
    model = task.make_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    evaluate(model, task, task.x_val, task.y_val)
    loader = DataLoader(
        TensorDataset(task.x_train, task.y_train), batch_size=batch_size, shuffle=True
    )
    done = 0
    while done < steps:
        for x, y in loader:
            opt.zero_grad(set_to_none=True)
            loss = task.loss_fn(model(x), y)
            loss.backward()
            opt.step()
            done += 1
            if done == steps:
                break
    for x, y in ((task.x_val, task.y_val), (task.x_val, task.y_val), (task.x_train, task.y_train)):
        evaluate(model, task, x, y)
    return time.perf_counter() - start


def engine_run(task: Task, batch_size: int, steps: int, lr: float, seed: int) -> float:
    """The same work through ``train``; returns wall seconds."""
    spec = RunSpec(
        task=task.name,
        batch_size=batch_size,
        lr=lr,
        momentum=0.9,
        budget_unit="steps",
        budget=steps,
        eval_every=steps,
        seed=seed,
    )
    start = time.perf_counter()
    result = train(spec, task=task, device="cpu")
    assert result.status == "ok", result.error
    return time.perf_counter() - start


def measure(task: Task, batch_size: int, samples: int, repeats: int) -> dict[str, float]:
    """Median samples/s of both loops at one point, alternating to share the machine's noise."""
    steps = max(20, samples // batch_size)
    plain, engine = alternating_medians(
        repeats,
        lambda r: plain_loop(task, batch_size, steps, 0.01, r),
        lambda r: engine_run(task, batch_size, steps, 0.01, r),
    )
    n = steps * batch_size
    p, e = n / plain, n / engine
    return {"steps": steps, "plain_samples_per_s": p, "engine_samples_per_s": e, "ratio": e / p}


def main() -> None:
    """Parse the options, run every point, print a table (or one JSON object)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tasks", default="mnist1d-mlp,fashion-mlp")
    ap.add_argument("--batch-sizes", default="32,256,2048")
    ap.add_argument("--samples", type=int, default=120000, help="examples per measurement")
    args, threads = parse_args(ap, repeats=3)
    rows = []
    for name in args.tasks.split(","):
        task = get_task(name)
        for b in int_list(args.batch_sizes):
            rows.append(
                {"task": name, "batch_size": b, **measure(task, b, args.samples, args.repeats)}
            )
            if not args.json:
                r = rows[-1]
                print(
                    f"{name:<14} B={b:<5} plain {r['plain_samples_per_s']:>10.0f}/s  "
                    f"engine {r['engine_samples_per_s']:>10.0f}/s  ratio {r['ratio']:.2f}x",
                    flush=True,
                )
    out = {"threads": threads, "repeats": args.repeats, "points": rows}
    if args.json:
        print_json(out)
    else:
        print(
            f"min ratio {min(r['ratio'] for r in rows):.2f}x (target >= 1.3x), {threads} thread(s)"
        )


if __name__ == "__main__":
    main()
