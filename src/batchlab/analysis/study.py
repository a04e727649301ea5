"""A study as the analysis sees it: its runs, their histories, its target; and small shared helpers.

Runs of one study are indexed by (batch size, lr, seed). Anything else that varies between runs of
a study (two tasks, two budgets) is not a grid axis: the analysis warns and keeps the first run of
each grid point, so mix arms in separate studies.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from batchlab.engine.spec import SpecError
from batchlab.sweep.store import RunRecord, Store

log = logging.getLogger(__name__)

TARGET_METRICS = ("val_metric", "val_loss", "train_loss")
OBJECTIVES = ("val_loss", "val_metric", "train_loss")


@dataclass(frozen=True)
class Target:
    """When a run has reached its goal: ``metric`` (a history column) crosses ``value``.

    Losses reach the target when ``<= value``; ``val_metric`` (higher is better) when ``>= value``.
    """

    metric: str
    value: float

    def __post_init__(self) -> None:
        if self.metric not in TARGET_METRICS:
            raise SpecError(
                "target", f"metric must be one of {', '.join(TARGET_METRICS)}, got {self.metric!r}"
            )
        if not (isinstance(self.value, int | float) and math.isfinite(self.value)):
            raise SpecError("target", f"value must be a finite number, got {self.value!r}")

    @property
    def higher_is_better(self) -> bool:
        """True for the metric, False for losses."""
        return self.metric == "val_metric"

    def describe(self) -> str:
        """``val_metric >= 0.9`` style text."""
        return f"{self.metric} {'>=' if self.higher_is_better else '<='} {self.value:g}"

    @classmethod
    def from_config(cls, config: Mapping[str, Any] | None) -> Target | None:
        """The target of a study config (``{"target": {"metric": ..., "value": ...}}``), or None."""
        raw = (config or {}).get("target")
        if not raw:
            return None
        if not isinstance(raw, Mapping) or set(raw) - {"metric", "value"} or "value" not in raw:
            raise SpecError("target", f"must be {{metric, value}}, got {raw!r}")
        return cls(str(raw.get("metric", "val_metric")), float(raw["value"]))


@dataclass(frozen=True)
class StudyData:
    """Everything the analysis needs of a study, read once from the store."""

    name: str | None
    runs: tuple[RunRecord, ...]
    histories: Mapping[str, list[dict[str, Any]]]
    target: Target | None = None
    config: Mapping[str, Any] | None = None
    grid: Mapping[tuple[int, float, int], RunRecord] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        grid: dict[tuple[int, float, int], RunRecord] = {}
        for run in self.runs:
            key = (run.batch_size, run.lr, run.seed)
            if key in grid:
                log.info(
                    "study %s: runs %s and %s share batch %d, lr %g, seed %d; keeping the first",
                    self.name,
                    grid[key].id,
                    run.id,
                    *key,
                )
                continue
            grid[key] = run
        object.__setattr__(self, "grid", grid)

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        """Batch sizes of the grid, ascending."""
        return tuple(sorted({k[0] for k in self.grid}))

    @property
    def lrs(self) -> tuple[float, ...]:
        """Learning rates of the grid, ascending."""
        return tuple(sorted({k[1] for k in self.grid}))

    @property
    def seeds(self) -> tuple[int, ...]:
        """Seeds of the grid, ascending."""
        return tuple(sorted({k[2] for k in self.grid}))

    def at(
        self, batch_size: int, lr: float | None = None, seed: int | None = None
    ) -> list[RunRecord]:
        """Runs at one batch size (and lr, seed when given), ordered by lr then seed."""
        return [
            self.grid[k]
            for k in sorted(self.grid)
            if k[0] == batch_size and lr in (None, k[1]) and seed in (None, k[2])
        ]

    def history(self, run: RunRecord) -> list[dict[str, Any]]:
        """History rows of ``run`` ([] when none were stored)."""
        return list(self.histories.get(run.id, []))


def resolve_study(store: Store, study: str | None) -> str | None:
    """The study to analyse: ``study`` when it exists, the only one when None, else an error.

    A store without studies is analysed as a whole (``None``).
    """
    names = [s.name for s in store.studies()]
    if study is not None:
        if study not in names:
            known = ", ".join(names) if names else "none"
            raise SpecError("study", f"no study {study!r} in {store.path} (studies: {known})")
        return study
    if len(names) > 1:
        raise SpecError(
            "study", f"{store.path} holds several studies ({', '.join(names)}); pass one"
        )
    return names[0] if names else None


def load_study(
    source: Store | str | os.PathLike[str],
    study: str | None = None,
    *,
    target: Target | None = None,
) -> StudyData:
    """Read a study's runs and histories; ``target`` defaults to the one saved with the study."""
    if isinstance(source, Store):
        return _read(source, study, target)
    with Store(Path(source), readonly=True) as store:
        return _read(store, study, target)


def _read(store: Store, study: str | None, target: Target | None) -> StudyData:
    name = resolve_study(store, study)
    runs, histories = store.runs_with_histories(name)
    config = store.study_config(name) if name is not None else None
    if target is None:
        target = Target.from_config(config)
    return StudyData(name, tuple(runs), histories, target, config)


def column(rows: Iterable[Mapping[str, Any]], name: str) -> np.ndarray:
    """One history column as floats (None and missing keys become NaN)."""
    return np.array([_float(row.get(name)) for row in rows], dtype=float)


def _float(value: Any) -> float:
    return math.nan if value is None else float(value)


def objective_value(run: RunRecord, objective: str) -> float:
    """A run's final ``objective`` as a loss (lower is better); diverged runs score +inf."""
    if run.status == "diverged":
        return math.inf
    value = _float(run.final.get(objective))
    return -value if objective == "val_metric" else value


def median_or_inf(values: Sequence[float]) -> float:
    """Median that counts ``inf`` (never reached) as a value and ignores NaN (no run).

    >>> median_or_inf([10.0, 30.0, float("inf")]), median_or_inf([10.0, float("inf")])
    (30.0, inf)
    """
    arr = np.asarray(values, dtype=float)
    arr = arr[~np.isnan(arr)]
    return float(np.median(arr)) if arr.size else math.nan
