"""Where one vectorized ensemble step's time goes, phase by phase, against a bare ``torch.bmm`` step.

The ensemble is ``K`` SGD-momentum members of a task's model at one batch size (``engine.train``'s
``_Ensemble``, stepped as ``_run`` steps it); the bare step is the same MLP written with stacked
``(K, in, out)`` weights and ``baddbmm`` (forward, backward, momentum update; no evaluation), the
lower bound of the per-step work. Phases are timed with ``perf_counter`` around each part of the
step (means over every timed step; the totals are medians of ``--repeats`` alternating repeats),
one torch thread by default. mnist1d-mlp only (the bare step is its
40 -> 100 -> 100 -> 10 residual MLP).

    python benchmarks/profile_ensemble.py [--batch-size 64] [--members 16] [--steps 600]
        [--repeats 3] [--threads 1] [--json]
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Callable

import torch
from torch import nn

from _common import alternating_medians, parse_args, print_json, print_table
from batchlab.engine.data import BatchStream
from batchlab.engine.spec import RunSpec
from batchlab.engine.tasks import Task, get_task
from batchlab.engine.train import _Ensemble

PHASES = (
    "lrs and batch slice",
    "vmap(grad_and_value)",
    "cat grads to (K, P)",
    "lr tensor",
    "vectorized update",
    "losses to host",
    "divergence check",
)


def lr_grid(members: int) -> list[float]:
    """``members`` learning rates spaced geometrically over [1e-3, 0.3]."""
    return [1e-3 * 300 ** (i / max(members - 1, 1)) for i in range(members)]


def bare_step(task: Task, batch_size: int, lrs: list[float]) -> Callable[[], None]:
    """One SGD-momentum step of K stacked MNIST-1D MLPs written with ``baddbmm``."""
    k = len(lrs)
    gen = torch.Generator().manual_seed(0)
    dims = [(40, 100), (100, 100), (100, 10)]
    weights = [(torch.randn(k, i, o, generator=gen) / i**0.5).requires_grad_() for i, o in dims]
    biases = [torch.zeros(k, 1, o, requires_grad=True) for _, o in dims]
    params = weights + biases
    buffers = [torch.zeros_like(p) for p in params]
    lr = torch.tensor(lrs)[:, None, None]
    stream = BatchStream(task.n_train, 0, torch.device("cpu"))

    def step() -> None:
        idx = stream.next(batch_size)
        x, y = task.x_train[idx], task.y_train[idx]
        h = torch.baddbmm(biases[0], x.expand(k, -1, -1), weights[0]).relu()
        h = h + torch.baddbmm(biases[1], h, weights[1]).relu()
        out = torch.baddbmm(biases[2], h, weights[2])
        loss = nn.functional.cross_entropy(out.flatten(0, 1), y.repeat(k), reduction="sum")
        grads = torch.autograd.grad(loss / batch_size, params)
        with torch.no_grad():
            for p, buf, g in zip(params, buffers, grads, strict=True):
                buf.mul_(0.9).add_(g)
                p.sub_(lr * buf)

    return step


def ensemble_step(task: Task, batch_size: int, lrs: list[float], times: list[float]) -> Callable:
    """``_Ensemble.step`` and the loop's per-step work, each phase's seconds added to ``times``."""
    specs = [RunSpec(task=task.name, batch_size=batch_size, lr=lr, momentum=0.9) for lr in lrs]
    ens = _Ensemble(task, specs, torch.device("cpu"))
    stream = BatchStream(task.n_train, 0, torch.device("cpu"))
    clock = time.perf_counter

    def step() -> None:
        marks = [clock()]
        idx = stream.next(batch_size)
        x, y = task.x_train[idx], task.y_train[idx]
        marks.append(clock())
        grads, losses = ens._grad(ens.params, x, y)
        marks.append(clock())
        g = torch.cat([grads[name].reshape(len(lrs), -1) for name, _ in ens.layout], 1)
        marks.append(clock())
        lr = torch.tensor(lrs)[:, None]
        marks.append(clock())
        ens.opt.step(ens.flat, g, lr)
        marks.append(clock())
        values = ens._scatter(losses.detach()).tolist()
        marks.append(clock())
        all(math.isfinite(v) for v in values)
        marks.append(clock())
        for i in range(len(PHASES)):
            times[i] += marks[i + 1] - marks[i]

    return step


def mean_ms(step: Callable[[], None], steps: int, warmup: int = 50) -> float:
    """Mean milliseconds per call of ``step`` after ``warmup`` calls."""
    for _ in range(warmup):
        step()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--members", type=int, default=16)
    parser.add_argument("--steps", type=int, default=600)
    args, threads = parse_args(parser, repeats=3)
    task = get_task("mnist1d-mlp")
    lrs = lr_grid(args.members)
    bare = bare_step(task, args.batch_size, lrs)
    times = [0.0] * len(PHASES)
    ensemble = ensemble_step(task, args.batch_size, lrs, times)
    for _ in range(50):  # warm up before the phase clocks count
        ensemble()
    times[:] = [0.0] * len(PHASES)
    bare_ms, ensemble_ms = alternating_medians(
        args.repeats, lambda _: mean_ms(bare, args.steps), lambda _: mean_ms(ensemble, args.steps)
    )
    counted = args.repeats * (args.steps + 50)
    phases = {name: t / counted * 1e3 for name, t in zip(PHASES, times, strict=True)}
    out = {
        "members": args.members,
        "batch_size": args.batch_size,
        "threads": threads,
        "bare_ms": bare_ms,
        "ensemble_ms": ensemble_ms,
        "ratio": ensemble_ms / bare_ms,
        "phases_ms": phases,
    }
    if args.json:
        print_json(out)
        return
    print_table(
        f"mnist1d-mlp, {args.members} members, batch {args.batch_size}, {threads} thread(s): "
        f"bare bmm {bare_ms:.3f} ms, ensemble {ensemble_ms:.3f} ms per step ({out['ratio']:.2f}x)",
        ("phase", "ms per step"),
        [(name, f"{ms:.3f}") for name, ms in phases.items()],
        left=("phase",),
        width=100,
    )


if __name__ == "__main__":
    main()
