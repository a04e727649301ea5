"""The (batch size, lr) grid of final results, the best lr per batch size, and lr* ~ B^alpha.

Per batch size and seed the best lr minimises the final objective (``val_loss`` by default;
``val_metric`` is maximised) and is refined between grid points by a parabola in log-lr through the
best point and its neighbours. A diverged run scores worst, a failed run is missing. The batch
size's best lr is the geometric mean over seeds. alpha is the slope of log lr* against log B over
the batch sizes whose best lr is inside the grid (a best lr on the grid's edge is only a bound; edge
points are used only when fewer than two interior ones remain), with a bootstrap interval over
seeds, compared with the linear rule (alpha = 1, Goyal et al. 2017) and the square-root rule
(alpha = 0.5, Hoffer et al. 2017; Malladi et al. 2022 for Adam).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from batchlab.analysis.study import OBJECTIVES, StudyData, objective_value
from batchlab.core.fit import (
    PowerLawFit,
    bootstrap_rows,
    fit_power_law,
    parabolic_argmin,
)
from batchlab.engine.spec import SpecError

RULE_EXPONENTS = {"linear": 1.0, "sqrt": 0.5}
_TOLERANCE = 1e-9  # an interval of zero width (noise-free data) still "contains" its own value


@dataclass(frozen=True)
class GridCell:
    """Final ``metric`` at one (batch size, lr): mean over the seeds that finished, and counts."""

    batch_size: int
    lr: float
    value: float
    n_ok: int
    n_diverged: int
    n_failed: int


def lr_grid(data: StudyData, metric: str = "val_loss") -> tuple[GridCell, ...]:
    """Every (batch size, lr) point of the study with its mean final ``metric`` and status counts."""
    cells = []
    for b in data.batch_sizes:
        for lr in sorted({run.lr for run in data.at(b)}):
            runs = data.at(b, lr)
            values = [float(r.final.get(metric, math.nan)) for r in runs if r.status == "ok"]
            finite = [v for v in values if math.isfinite(v)]
            cells.append(
                GridCell(
                    batch_size=b,
                    lr=lr,
                    value=float(np.mean(finite)) if finite else math.nan,
                    n_ok=len(values),
                    n_diverged=sum(r.status == "diverged" for r in runs),
                    n_failed=sum(r.status == "failed" for r in runs),
                )
            )
    return tuple(cells)


@dataclass(frozen=True)
class BestLrRow:
    """Best lr at one batch size: ``lr`` interpolated (geometric mean over seeds), ``grid_lr`` the
    grid point with the best mean objective, ``value`` that mean (in the objective's own units)."""

    batch_size: int
    lr: float
    lr_low: float
    lr_high: float
    grid_lr: float
    value: float
    per_seed_lr: tuple[float, ...]
    at_edge: bool
    n_diverged: int


@dataclass(frozen=True)
class LrScaling:
    """Best lr per batch size and the fitted exponent alpha of lr* ~ B^alpha.

    ``alpha_interval`` is a bootstrap over seeds (NaN with one seed); ``rules_in_interval`` names
    the rules (``linear``, ``sqrt``) whose exponent lies inside it; ``closest_rule`` the nearer one.
    """

    objective: str
    rows: tuple[BestLrRow, ...]
    fit: PowerLawFit | None
    alpha: float
    alpha_interval: tuple[float, float]
    level: float
    used: tuple[int, ...]
    uses_edge_points: bool
    rules_in_interval: tuple[str, ...]
    closest_rule: str | None

    @property
    def grid_lr(self) -> dict[int, float]:
        """Batch size -> its best grid lr (what curves, gaps and costs are read at)."""
        return {r.batch_size: r.grid_lr for r in self.rows}


def _best_row(data: StudyData, b: int, objective: str) -> BestLrRow | None:
    lrs = sorted({run.lr for run in data.at(b)})
    scores = np.full((len(data.seeds), len(lrs)), math.nan)
    for i, seed in enumerate(data.seeds):
        for j, lr in enumerate(lrs):
            runs = data.at(b, lr, seed)
            if runs and runs[0].status != "failed":
                scores[i, j] = objective_value(runs[0], objective)
    per_seed, edges = [], []
    for row in scores:
        if not np.isfinite(row).any():
            per_seed.append(math.nan)
            continue
        vertex = parabolic_argmin(np.log(lrs), row)
        per_seed.append(math.exp(vertex.x))
        edges.append(vertex.at_edge)
    mean = np.array([_mean_score(scores[:, j]) for j in range(len(lrs))])
    if not np.isfinite(mean).any():
        return None
    j = int(np.nanargmin(np.where(np.isfinite(mean), mean, np.nan)))
    logs = np.log([v for v in per_seed if math.isfinite(v)])
    return BestLrRow(
        batch_size=b,
        lr=float(np.exp(logs.mean())),
        lr_low=float(np.exp(logs.min())),
        lr_high=float(np.exp(logs.max())),
        grid_lr=lrs[j],
        value=-mean[j] if objective == "val_metric" else float(mean[j]),
        per_seed_lr=tuple(per_seed),
        at_edge=any(edges),
        n_diverged=sum(r.status == "diverged" for r in data.at(b)),
    )


def _mean_score(scores: np.ndarray) -> float:
    """Mean over seeds that ran (NaN = no run); one diverged seed makes the lr score +inf."""
    present = scores[~np.isnan(scores)]
    return float(present.mean()) if present.size else math.nan


def _alpha(batch_sizes: np.ndarray, log_lr: np.ndarray) -> float:
    """Exponent of the fit to per-batch geometric-mean lrs (rows: seeds); NaN if a column is empty."""
    counts = np.isfinite(log_lr).sum(axis=0)
    if np.any(counts == 0):
        return math.nan
    means = np.nansum(log_lr, axis=0) / counts
    return fit_power_law(batch_sizes, np.exp(means)).exponent


def best_lr_table(
    data: StudyData,
    objective: str = "val_loss",
    *,
    level: float = 0.95,
    n_boot: int = 1000,
    seed: int = 0,
) -> LrScaling | None:
    """Best lr per batch size and alpha with its seed-bootstrap interval; None without any result."""
    if objective not in OBJECTIVES:
        raise SpecError("objective", f"must be one of {', '.join(OBJECTIVES)}, got {objective!r}")
    rows = tuple(r for b in data.batch_sizes if (r := _best_row(data, b, objective)) is not None)
    if not rows:
        return None
    interior = [r for r in rows if not r.at_edge]
    chosen = interior if len(interior) >= 2 else list(rows)
    fit, interval = None, (math.nan, math.nan)
    if len(chosen) >= 2:
        b = np.array([r.batch_size for r in chosen], dtype=float)
        fit = fit_power_law(b, [r.lr for r in chosen])
        log_lr = np.log(np.array([r.per_seed_lr for r in chosen], dtype=float).T)
        interval = bootstrap_rows(
            log_lr, lambda d: _alpha(b, d), n_boot=n_boot, level=level, seed=seed
        )
    alpha = fit.exponent if fit else math.nan
    inside = tuple(
        name
        for name, ref in RULE_EXPONENTS.items()
        if interval[0] - _TOLERANCE <= ref <= interval[1] + _TOLERANCE
    )
    closest = min(RULE_EXPONENTS, key=lambda n: abs(RULE_EXPONENTS[n] - alpha)) if fit else None
    return LrScaling(
        objective=objective,
        rows=rows,
        fit=fit,
        alpha=alpha,
        alpha_interval=interval,
        level=level,
        used=tuple(r.batch_size for r in chosen) if fit else (),
        uses_edge_points=bool(fit) and len(interior) < 2,
        rules_in_interval=inside,
        closest_rule=closest,
    )
