"""Steps and samples to a target per batch size, and the critical-batch fit over them.

Following Shallue et al. 2019, a run's steps-to-target is the first *evaluated* step at which the
target is met (so it is only as fine as the eval cadence). Per batch size and seed the best learning
rate is the one that gets there in the fewest steps (ties: the smaller lr); the batch size's number
is the median over seeds, counting a seed that never reached the target as infinite, so a batch
size "reaches" the target only when at least half its seeds do. Diverged and failed runs never
reach it. The fit is S = S_min (1 + B_crit/B) of McCandlish et al. 2018 (``batchlab.core.fit``);
its interval is a bootstrap over seeds when there are at least two, else a residual bootstrap.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np

from batchlab.analysis.study import StudyData, Target, column, median_or_inf
from batchlab.core.fit import (
    StepsFit,
    bootstrap_draws,
    fit_steps_vs_batch,
    percentile_interval,
    steps_to_target,
)
from batchlab.engine.spec import HistoryKey as H
from batchlab.sweep.store import RunRecord


@dataclass(frozen=True)
class Reach:
    """Where one run first met the target (``inf`` everywhere when it never did)."""

    steps: float
    samples: float
    epochs: float
    wall_s: float


NEVER = Reach(math.inf, math.inf, math.inf, math.inf)


def run_reach(run: RunRecord, history: list[dict], target: Target) -> Reach:
    """First evaluated history row of ``run`` meeting ``target``; ``NEVER`` for unfinished runs."""
    if run.status != "ok" or not history:
        return NEVER
    step = steps_to_target(
        column(history, H.STEP),
        column(history, target.metric),
        target.value,
        higher_is_better=target.higher_is_better,
    )
    if not math.isfinite(step):
        return NEVER
    row = next(r for r in history if r[H.STEP] == step)
    return Reach(step, float(row[H.SAMPLES]), float(row[H.EPOCH]), float(row[H.WALL_S]))


@dataclass(frozen=True)
class ToTargetRow:
    """Steps/samples/epochs/wall seconds to the target at one batch size (medians over seeds).

    ``per_seed_steps`` and ``per_seed_lr`` follow ``StudyData.seeds`` (inf / NaN: not reached,
    NaN steps: the seed has no run at this batch size). ``best_lr`` is the most common fastest lr.
    """

    batch_size: int
    steps: float
    samples: float
    epochs: float
    wall_s: float
    steps_low: float
    steps_high: float
    best_lr: float
    n_seeds: int
    n_reached: int
    per_seed_steps: tuple[float, ...]
    per_seed_lr: tuple[float, ...]

    @property
    def reached(self) -> bool:
        """Whether at least half the seeds reached the target."""
        return math.isfinite(self.steps)


def _best_reach(runs: list[RunRecord], data: StudyData, target: Target) -> tuple[Reach, float]:
    """Fastest run among ``runs`` (one batch size and seed) and its lr; ``NEVER`` and NaN if none."""
    best, lr = NEVER, math.nan
    for run in runs:
        reach = run_reach(run, data.history(run), target)
        if reach.steps < best.steps:
            best, lr = reach, run.lr
    return best, lr


def to_target_table(data: StudyData, target: Target) -> tuple[ToTargetRow, ...]:
    """One row per batch size: the fastest lr per seed, then the median over seeds."""
    rows = []
    for b in data.batch_sizes:
        reaches, lrs = [], []
        for seed in data.seeds:
            runs = data.at(b, seed=seed)
            reach, lr = _best_reach(runs, data, target) if runs else (None, math.nan)
            reaches.append(reach)
            lrs.append(lr)
        present = [r for r in reaches if r is not None]
        steps = [math.nan if r is None else r.steps for r in reaches]
        finite = [s for s in steps if math.isfinite(s)]
        common = Counter(lr for lr in lrs if math.isfinite(lr)).most_common()
        rows.append(
            ToTargetRow(
                batch_size=b,
                steps=median_or_inf(steps),
                samples=median_or_inf([r.samples for r in present]),
                epochs=median_or_inf([r.epochs for r in present]),
                wall_s=median_or_inf([r.wall_s for r in present]),
                steps_low=min(finite, default=math.inf),
                steps_high=max(finite, default=math.inf)
                if len(finite) == len(present)
                else math.inf,
                best_lr=min(lr for lr, n in common if n == common[0][1]) if common else math.nan,
                n_seeds=len(present),
                n_reached=len(finite),
                per_seed_steps=tuple(steps),
                per_seed_lr=tuple(lrs),
            )
        )
    return tuple(rows)


@dataclass(frozen=True)
class ScalingFit:
    """S = S_min (1 + B_crit/B) over the batch sizes that reached the target, with intervals.

    ``interval_method`` is ``"seeds"`` (bootstrap over seeds, >= 2 seeds) or ``"residuals"``.
    ``regions`` labels every batch size of the study perfect_scaling / diminishing_returns /
    maximal_parallelism with bounds ``region_bounds`` (sample or step efficiency >= 0.8).
    """

    fit: StepsFit
    s_min: float
    e_min: float
    critical_batch: float
    s_min_interval: tuple[float, float]
    e_min_interval: tuple[float, float]
    critical_batch_interval: tuple[float, float]
    interval_method: str
    level: float
    region_bounds: tuple[float, float]
    regions: tuple[tuple[int, str], ...]
    unreached: tuple[int, ...]


def _fit_columns(batch_sizes: np.ndarray, per_seed: np.ndarray) -> np.ndarray:
    """[s_min, B_crit] of the fit over seed rows ``per_seed`` (NaNs when < 2 columns reach)."""
    medians = np.array([median_or_inf(col) for col in per_seed.T])
    ok = np.isfinite(medians)
    if np.unique(batch_sizes[ok]).size < 2:
        return np.array([math.nan, math.nan])
    fit = fit_steps_vs_batch(batch_sizes[ok], medians[ok], n_boot=0)
    return np.array([fit.s_min, fit.critical_batch])


def fit_scaling(
    rows: tuple[ToTargetRow, ...], *, level: float = 0.95, n_boot: int = 200, seed: int = 0
) -> ScalingFit | None:
    """Fit the critical batch size to the reached rows; None when fewer than 2 reached."""
    reached = [r for r in rows if r.reached]
    if len(reached) < 2:
        return None
    b = np.array([r.batch_size for r in reached], dtype=float)
    per_seed = np.array([r.per_seed_steps for r in rows], dtype=float).T  # seeds x batch sizes
    by_seeds = per_seed.shape[0] >= 2 and n_boot > 0
    fit = fit_steps_vs_batch(
        b, [r.steps for r in reached], level=level, n_boot=0 if by_seeds else n_boot, seed=seed
    )
    if by_seeds:
        all_b = np.array([r.batch_size for r in rows], dtype=float)
        draws = bootstrap_draws(
            per_seed, lambda d: _fit_columns(all_b, d), n_boot=n_boot, seed=seed
        ).reshape(-1, 2)
        method = "seeds"
        s_int = percentile_interval(draws[:, 0], level)
        c_int = percentile_interval(draws[:, 1], level)
        e_int = percentile_interval(draws[:, 0] * draws[:, 1], level)
    else:
        method = "residuals"
        s_int, c_int, e_int = fit.s_min_interval, fit.critical_batch_interval, fit.e_min_interval
    return ScalingFit(
        fit=fit,
        s_min=fit.s_min,
        e_min=fit.e_min,
        critical_batch=fit.critical_batch,
        s_min_interval=s_int,
        e_min_interval=e_int,
        critical_batch_interval=c_int,
        interval_method=method,
        level=level,
        region_bounds=fit.region_bounds(),
        regions=tuple((r.batch_size, fit.region(r.batch_size)) for r in rows),
        unreached=tuple(r.batch_size for r in rows if not r.reached),
    )
