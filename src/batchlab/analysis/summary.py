"""``analyze``: one call from a store (or a ``StudyData``) to every table of a study."""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass
from typing import Any

from batchlab.analysis.curves import (
    CostRow,
    Curve,
    GapTable,
    cost_table,
    generalization_gap,
    loss_curves,
)
from batchlab.analysis.lr import GridCell, LrScaling, best_lr_table, lr_grid
from batchlab.analysis.noise import NoiseSummary, noise_summary
from batchlab.analysis.study import StudyData, Target, load_study
from batchlab.analysis.target import ScalingFit, ToTargetRow, fit_scaling, to_target_table
from batchlab.sweep.store import Store


@dataclass(frozen=True)
class DivergedRun:
    """A run that diverged (or failed): shown as such, never fitted."""

    run_id: str
    batch_size: int
    lr: float
    seed: int
    status: str
    at_step: int | None
    error: str | None


@dataclass(frozen=True)
class StudyAnalysis:
    """Every table of one study. ``None`` / empty where the data does not allow it (no target, no
    run reached it, no noise measurements, ...)."""

    study: str | None
    tasks: tuple[str, ...]
    optimizers: tuple[str, ...]
    metric_name: str
    n_runs: int
    n_ok: int
    n_diverged: int
    n_failed: int
    batch_sizes: tuple[int, ...]
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    target: Target | None
    objective: str
    grid: tuple[GridCell, ...]
    best_lr: LrScaling | None
    curves: tuple[Curve, ...]
    to_target: tuple[ToTargetRow, ...]
    scaling: ScalingFit | None
    gap_epochs: GapTable | None
    gap_steps: GapTable | None
    cost: tuple[CostRow, ...]
    noise: NoiseSummary | None
    unfinished: tuple[DivergedRun, ...]

    def to_dict(self, *, series: bool = False) -> dict[str, Any]:
        """JSON-ready nested dict (NaN and inf stay floats; ``emit_json`` turns them into null).

        The per-step loss curves and noise-scale series are left out unless ``series``.
        """
        out = _plain(self)
        if not series:
            out.pop("curves")
            if out["noise"] is not None:
                out["noise"].pop("series")
        return out

    def facts(self) -> list[tuple[str, str]]:
        """What was run, as (label, text) rows: study, task, runs by status, grid, target."""
        return [
            ("study", self.study or "(all runs in the store)"),
            ("task", ", ".join(self.tasks) or "-"),
            ("optimizer", ", ".join(self.optimizers) or "-"),
            (
                "runs",
                f"{self.n_runs} ({self.n_ok} ok, {self.n_diverged} diverged, {self.n_failed} failed)",
            ),
            ("batch sizes", ", ".join(map(str, self.batch_sizes)) or "-"),
            ("learning rates", ", ".join(fmt(v) for v in self.lrs) or "-"),
            ("seeds", ", ".join(map(str, self.seeds)) or "-"),
            (
                "target",
                self.target.describe() if self.target else "none (no steps-to-target, no fit)",
            ),
            ("best lr chosen by", f"final {self.objective}"),
        ]

    def key_numbers(self) -> list[tuple[str, str]]:
        """The headline results as (label, "value [interval]") rows; only those the data allow."""
        rows: list[tuple[str, str]] = []
        if self.scaling is not None:
            s = self.scaling
            rows += [
                (
                    "critical batch B_crit",
                    f"{fmt(s.critical_batch)} [{fmt(s.critical_batch_interval)}]",
                ),
                ("S_min (fewest steps)", f"{fmt(s.s_min)} [{fmt(s.s_min_interval)}]"),
                ("E_min (fewest examples)", f"{fmt(s.e_min)} [{fmt(s.e_min_interval)}]"),
            ]
        if self.best_lr is not None and self.best_lr.fit is not None:
            b = self.best_lr
            rows += [
                ("alpha (lr* ~ B^alpha)", f"{b.alpha:.3f} [{fmt(b.alpha_interval)}]"),
                ("rules inside interval", ", ".join(b.rules_in_interval) or "neither"),
            ]
        if self.noise is not None:
            rows += [
                ("noise scale (late)", fmt(self.noise.measured)),
                ("B_crit / noise scale", fmt(self.noise.critical_over_measured, 2)),
            ]
        return rows


def fmt(value: Any, digits: int = 3) -> str:
    """Compact text for a table cell: ``digits`` significant digits (whole numbers below 1e7 in
    full), '-' for NaN, 'never' for inf.

    >>> fmt(0.0123456), fmt(float("nan")), fmt(float("inf")), fmt(12), fmt((1.5, 2.25))
    ('0.0123', '-', 'never', '12', '1.5 - 2.25')
    >>> fmt(23360.4), fmt(2.5e8)
    ('23360', '2.5e+08')
    """
    if isinstance(value, bool) or value is None:
        return "-" if value is None else ("yes" if value else "no")
    if isinstance(value, tuple) and len(value) == 2:
        if all(isinstance(v, int | float) and not math.isfinite(v) for v in value):
            return "-"
        return f"{fmt(value[0], digits)} - {fmt(value[1], digits)}"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if math.isinf(value):
            return "never" if value > 0 else "-inf"
        if 10**digits <= abs(value) < 1e7:
            return f"{value:.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def _plain(obj: Any) -> Any:
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _plain(getattr(obj, f.name)) for f in dataclasses.fields(obj) if f.repr}
    if isinstance(obj, tuple) and hasattr(obj, "_asdict"):
        return {k: _plain(v) for k, v in obj._asdict().items()}
    if isinstance(obj, dict):
        return {str(k): _plain(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_plain(v) for v in obj]
    return obj


def analyze(
    source: Store | str | os.PathLike[str] | StudyData,
    study: str | None = None,
    *,
    target: Target | None = None,
    objective: str = "val_loss",
    level: float = 0.95,
    n_boot: int = 200,
    seed: int = 0,
) -> StudyAnalysis:
    """All tables of ``study`` (the store's only study when None); ``target`` defaults to the
    study's saved one. Bootstraps are seeded by ``seed``, so the same data gives the same numbers."""
    data = source if isinstance(source, StudyData) else load_study(source, study, target=target)
    if target is None:
        target = data.target
    best = best_lr_table(data, objective, level=level, n_boot=n_boot, seed=seed)
    lr_by_batch = best.grid_lr if best else {}
    reach = to_target_table(data, target) if target is not None else ()
    scaling = fit_scaling(reach, level=level, n_boot=n_boot, seed=seed) if reach else None
    runs = data.runs
    return StudyAnalysis(
        study=data.name,
        tasks=tuple(sorted({r.spec.task for r in runs})),
        optimizers=tuple(sorted({r.spec.optimizer for r in runs})),
        metric_name=next((str(r.extra["metric"]) for r in runs if "metric" in r.extra), "metric"),
        n_runs=len(runs),
        n_ok=sum(r.status == "ok" for r in runs),
        n_diverged=sum(r.status == "diverged" for r in runs),
        n_failed=sum(r.status == "failed" for r in runs),
        batch_sizes=data.batch_sizes,
        lrs=data.lrs,
        seeds=data.seeds,
        target=target,
        objective=objective,
        grid=lr_grid(data),
        best_lr=best,
        curves=loss_curves(data, lr_by_batch),
        to_target=reach,
        scaling=scaling,
        gap_epochs=generalization_gap(data, lr_by_batch, "epochs"),
        gap_steps=generalization_gap(data, lr_by_batch, "steps"),
        cost=cost_table(data, lr_by_batch, reach or None),
        noise=noise_summary(data, scaling.critical_batch if scaling else math.nan),
        unfinished=tuple(
            DivergedRun(r.id, r.batch_size, r.lr, r.seed, r.status, r.diverged_at, r.error)
            for r in runs
            if r.status != "ok"
        ),
    )
