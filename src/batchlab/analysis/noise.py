"""Measured gradient noise scale over training, beside the fitted critical batch size.

McCandlish et al. 2018 predict B_crit ~ B_simple = tr(Sigma)/|G|^2 at the loss the target asks for;
the noise scale grows as the loss falls, so the summary uses late measurements: the median of the
second half of each run's measurements, then the median over runs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from batchlab.analysis.study import StudyData, column, median_or_inf
from batchlab.engine.spec import HistoryKey as H


@dataclass(frozen=True)
class NoiseSeries:
    """Noise-scale measurements of one run (``low``/``high``: its interval, NaN when not given)."""

    run_id: str
    batch_size: int
    lr: float
    seed: int
    step: tuple[float, ...]
    epoch: tuple[float, ...]
    value: tuple[float, ...]
    low: tuple[float, ...]
    high: tuple[float, ...]

    @property
    def late(self) -> float:
        """Median of the second half of the measurements."""
        values = self.value[len(self.value) // 2 :]
        return float(np.median(values))


@dataclass(frozen=True)
class NoiseSummary:
    """Every run's series, the late noise scale (median over runs, min-max spread over runs) and
    its ratio to the fitted critical batch (NaN without a fit)."""

    series: tuple[NoiseSeries, ...]
    measured: float
    measured_low: float
    measured_high: float
    critical_batch: float
    critical_over_measured: float


def noise_summary(data: StudyData, critical_batch: float = math.nan) -> NoiseSummary | None:
    """Noise-scale series of the finished runs that measured it; None when none did."""
    series = []
    for run in data.runs:
        history = data.history(run)
        if run.status != "ok" or not history:
            continue
        value = column(history, H.NOISE_SCALE)
        keep = np.isfinite(value)
        if not keep.any():
            continue
        pick = {
            name: tuple(column(history, name)[keep].tolist())
            for name in (H.STEP, H.EPOCH, H.NOISE_SCALE, H.NOISE_SCALE_LOW, H.NOISE_SCALE_HIGH)
        }
        series.append(
            NoiseSeries(
                run_id=run.id,
                batch_size=run.batch_size,
                lr=run.lr,
                seed=run.seed,
                step=pick[H.STEP],
                epoch=pick[H.EPOCH],
                value=pick[H.NOISE_SCALE],
                low=pick[H.NOISE_SCALE_LOW],
                high=pick[H.NOISE_SCALE_HIGH],
            )
        )
    if not series:
        return None
    late = [s.late for s in series]
    measured = median_or_inf(late)
    ratio = critical_batch / measured if measured > 0 else math.nan
    return NoiseSummary(
        series=tuple(sorted(series, key=lambda s: (s.batch_size, s.lr, s.seed))),
        measured=measured,
        measured_low=float(min(late)),
        measured_high=float(max(late)),
        critical_batch=critical_batch,
        critical_over_measured=ratio,
    )
