"""Accuracy baselines of the built-in tasks, trained with a plain torch loop (no batchlab engine).

Each task is trained from ``make_model(seed)`` with Adam on batches sliced from a shuffled copy of the
training tensors (reshuffled every epoch), then its accuracy on the held-out set is compared with the
baseline the task must hold:

- MNIST-1D (Greydanus 2020's recipe): Adam lr 1e-2, batch 100, 6000 steps on the default 4000/1000
  split; CNN >= 90%, MLP >= 60% (the paper reports about 94% and 68%).
- Fashion-MNIST (60,000 / 10,000): Adam lr 1e-3 with cosine decay to 0, batch 128, 10 epochs (MLP) or
  5 epochs (CNN); MLP >= 88%, CNN >= 90%.
- digits-mlp and teacher-mlp: quick sanity baselines for the small tasks.

Usage: ``python benchmarks/baselines.py [--tasks mnist1d-mlp,mnist1d-cnn] [--seed 0] [--json]``.
Runs one torch thread per process (the machine is shared); CUDA when present.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass

import torch
from rich.console import Console
from rich.table import Table

from batchlab.engine.data import default_device
from batchlab.engine.tasks import Task, get_task


@dataclass(frozen=True)
class Recipe:
    """How a baseline is trained and what test accuracy it must reach."""

    lr: float
    batch_size: int
    steps: int
    cosine: bool
    target: float


RECIPES = {
    "mnist1d-mlp": Recipe(lr=1e-2, batch_size=100, steps=6000, cosine=False, target=0.60),
    "mnist1d-cnn": Recipe(lr=1e-2, batch_size=100, steps=6000, cosine=False, target=0.90),
    "fashion-mlp": Recipe(lr=1e-3, batch_size=128, steps=4690, cosine=True, target=0.88),
    "fashion-cnn": Recipe(lr=1e-3, batch_size=128, steps=2345, cosine=True, target=0.90),
    "digits-mlp": Recipe(lr=1e-2, batch_size=64, steps=500, cosine=False, target=0.95),
    "teacher-mlp": Recipe(lr=1e-2, batch_size=100, steps=3000, cosine=True, target=0.80),
}


def evaluate(task: Task, model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    """Mean metric over ``x`` in chunks of 1000 examples (bounded memory), in eval mode."""
    model.eval()
    with torch.no_grad():
        total = sum(
            float(task.metric(model(xb), yb)) * len(yb)
            for xb, yb in zip(x.split(1000), y.split(1000), strict=True)
        )
    model.train()
    return total / len(y)


def train_baseline(name: str, recipe: Recipe, seed: int, device: torch.device) -> dict:
    """Train ``name`` with ``recipe`` in a plain loop; return its figures."""
    task = get_task(name)
    x_train, y_train = task.x_train.to(device), task.y_train.to(device)
    model = task.make_model(seed).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=recipe.lr)
    generator = torch.Generator().manual_seed(seed)
    order, pos = torch.randperm(task.n_train, generator=generator).to(device), 0
    start = time.perf_counter()
    for step in range(recipe.steps):
        if pos + recipe.batch_size > task.n_train:
            order, pos = torch.randperm(task.n_train, generator=generator).to(device), 0
        idx = order[pos : pos + recipe.batch_size]
        pos += recipe.batch_size
        if recipe.cosine:
            for group in optimizer.param_groups:
                group["lr"] = recipe.lr * 0.5 * (1 + math.cos(math.pi * step / recipe.steps))
        loss = task.loss_fn(model(x_train[idx]), y_train[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    wall = time.perf_counter() - start
    test = evaluate(task, model, task.x_val.to(device), task.y_val.to(device))
    return {
        "task": name,
        "n_train": task.n_train,
        "n_val": task.n_val,
        **asdict(recipe),
        "epochs": recipe.steps * recipe.batch_size / task.n_train,
        "test_accuracy": test,
        "passed": test >= recipe.target,
        "wall_s": wall,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default=",".join(RECIPES), help="comma-separated task names")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()
    names = [n.strip() for n in args.tasks.split(",") if n.strip()]
    unknown = [n for n in names if n not in RECIPES]
    if unknown:
        parser.error(f"--tasks: unknown {', '.join(unknown)}; choose from {', '.join(RECIPES)}")
    torch.set_num_threads(1)
    device = default_device()
    results = [train_baseline(name, RECIPES[name], args.seed, device) for name in names]
    if args.json:
        print(json.dumps({"device": str(device), "seed": args.seed, "results": results}, indent=2))
        return
    table = Table(title=f"Baselines: plain torch loop, Adam, seed {args.seed}, {device}")
    for column in (
        "task",
        "train/val",
        "lr",
        "batch",
        "steps",
        "epochs",
        "test acc",
        "target",
        "ok",
        "s",
    ):
        table.add_column(column, justify="left" if column == "task" else "right")
    for r in results:
        table.add_row(
            r["task"],
            f"{r['n_train']}/{r['n_val']}",
            f"{r['lr']:g}{' cos' if r['cosine'] else ''}",
            str(r["batch_size"]),
            str(r["steps"]),
            f"{r['epochs']:.1f}",
            f"{100 * r['test_accuracy']:.1f}%",
            f">= {100 * r['target']:.0f}%",
            "yes" if r["passed"] else "NO",
            f"{r['wall_s']:.0f}",
        )
    Console(width=max(Console().width, 100)).print(table)
    print("lr 'cos': cosine decay from lr to 0 over the steps; test acc on the held-out set")


if __name__ == "__main__":
    main()
