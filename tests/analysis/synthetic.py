"""Synthetic sweeps with known answers, written to a real ``Store`` (shared by analysis/report/CLI tests).

Each run's validation metric rises as 0.95 (1 - exp(-step ln19 / S)), so it reaches 0.9 exactly at
S = S_min (1 + B_crit/B) (1 + 0.5 log(lr/lr*)^2) (seed factor), and its final validation loss is
0.3 + 0.1 log(lr/lr*)^2 with lr* = lr0 (B/B0)^alpha: both ground truths are closed forms.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from batchlab.engine.spec import RunResult, RunSpec
from batchlab.sweep.store import Store

N_TRAIN = 1000
TARGET = {"metric": "val_metric", "value": 0.9}


@dataclass(frozen=True)
class Truth:
    """The parameters a synthetic sweep is generated from."""

    s_min: float = 200.0
    b_crit: float = 100.0
    alpha: float = 0.5
    lr0: float = 0.05
    b0: int = 16
    gap_slope: float = 0.02
    diverge_above: float = 6.0  # runs with lr > diverge_above * lr* diverge
    seed_spread: float = 0.02
    lr_jitter: float = 0.0  # per (seed, batch size) log-scatter of lr*, deterministic

    def best_lr(self, batch_size: int, seed: int = 0) -> float:
        jitter = self.lr_jitter * math.sin(3.7 * seed + 1.3 * math.log2(batch_size))
        return self.lr0 * (batch_size / self.b0) ** self.alpha * math.exp(jitter)

    def steps_needed(self, batch_size: int, lr: float, seed: int) -> float:
        off = math.log(lr / self.best_lr(batch_size, seed))
        seed_factor = 1 + self.seed_spread * (seed - 1)
        return self.s_min * (1 + self.b_crit / batch_size) * (1 + 0.5 * off**2) * seed_factor

    def final_val_loss(self, batch_size: int, lr: float, seed: int) -> float:
        return 0.3 + 0.1 * math.log(lr / self.best_lr(batch_size, seed)) ** 2

    def gap(self, batch_size: int) -> float:
        return 0.05 + self.gap_slope * math.log2(batch_size / self.b0)


def synthetic_result(
    truth: Truth,
    batch_size: int,
    lr: float,
    seed: int,
    *,
    steps: int,
    eval_every: int,
    task: str = "digits-mlp",
    noise_scale: bool = False,
) -> RunResult:
    """One run of the synthetic sweep, as the engine would return it."""
    spec = RunSpec(
        task=task,
        batch_size=batch_size,
        lr=lr,
        seed=seed,
        budget_unit="steps",
        budget=float(steps),
        eval_every=eval_every,
        noise_scale=noise_scale,
    )
    extra = {"metric": "accuracy", "n_train": N_TRAIN}
    if lr > truth.diverge_above * truth.best_lr(batch_size, seed):
        row = _row(truth, batch_size, lr, seed, 0, steps, noise_scale)
        nan = {k: math.nan for k in ("train_loss", "train_metric", "val_loss", "val_metric")}
        return RunResult(spec, "diverged", 5, 5 * batch_size, 0.01, [row], nan, 5, None, extra)
    grid = [*range(0, steps, eval_every), steps]
    history = [_row(truth, batch_size, lr, seed, s, steps, noise_scale) for s in grid]
    last = history[-1]
    final = {
        "train_loss": last["train_loss"],
        "val_loss": last["val_loss"],
        "val_metric": last["val_metric"],
        "train_metric": last["val_metric"] + truth.gap(batch_size) / 2,
    }
    return RunResult(
        spec, "ok", steps, steps * batch_size, last["wall_s"], history, final, None, None, extra
    )


def _row(truth: Truth, b: int, lr: float, seed: int, step: int, total: int, noise: bool) -> dict:
    rate = math.log(19) / truth.steps_needed(b, lr, seed)
    val_loss = truth.final_val_loss(b, lr, seed) + 1.5 * (
        math.exp(-rate * step) - math.exp(-rate * total)
    )
    row = {
        "step": step,
        "samples": step * b,
        "epoch": step * b / N_TRAIN,
        "lr": lr,
        "batch_size": b,
        "train_loss": math.nan if step == 0 else val_loss - truth.gap(b),
        "val_loss": val_loss,
        "val_metric": 0.95 * (1 - math.exp(-rate * step)),
        "wall_s": step * (1e-3 + b * 1e-5),
        "noise_scale": None,
    }
    if noise:
        value = truth.b_crit * (0.3 + 0.7 * step / total)
        row.update(noise_scale=value, noise_scale_low=0.9 * value, noise_scale_high=1.1 * value)
    return row


def lr_grid_for(truth: Truth, batch_sizes: Sequence[int], points: int = 9) -> list[float]:
    """A log grid (factor 2) wide enough to bracket lr* at every batch size and to diverge."""
    low = truth.best_lr(min(batch_sizes)) / 8
    high = truth.best_lr(max(batch_sizes)) * 8
    n = max(points, math.ceil(math.log2(high / low)) + 1)
    return [low * 2.0**i for i in range(n)]


def write_study(
    store: Store,
    name: str,
    truth: Truth,
    batch_sizes: Sequence[int],
    seeds: Sequence[int] = (0, 1, 2),
    *,
    lrs: Sequence[float] | None = None,
    steps: int = 4000,
    eval_every: int = 20,
    task: str = "digits-mlp",
    noise_scale: bool = False,
    target: dict | None = None,
) -> list[RunResult]:
    """Write the full (batch size x lr x seed) grid of ``truth`` as study ``name``; returns the runs."""
    grid = list(lrs) if lrs is not None else lr_grid_for(truth, batch_sizes)
    results = [
        synthetic_result(
            truth, b, lr, s, steps=steps, eval_every=eval_every, task=task, noise_scale=noise_scale
        )
        for b in batch_sizes
        for lr in grid
        for s in seeds
    ]
    store.put_many(results, study=name)
    store.set_study(name, {"study": name, "target": target if target is not None else TARGET})
    return results
