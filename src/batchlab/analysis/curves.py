"""Per batch size at its best grid lr: loss curves, the generalization gap, and what training cost.

Generalization gap (Keskar et al. 2017): val - train loss, and train - val metric, so a positive gap
always means "worse on held-out data". It is compared at equal epochs and at equal steps (Hoffer
et al. 2017: large batches take fewer steps per epoch, which alone can explain a gap). The common
point is the smallest end point of the compared runs; a run ending there (within one step: an
epoch budget ends at the first full batch past it) is read from its final full-set numbers, any other run
is interpolated in its history, whose train loss is a noisy mean over the batches since the previous
evaluation (no train metric there).

Cost (Shallue et al. 2019): steps, samples and wall seconds, to the target when one is given,
else to the end of the budget; speed-up is steps at the smallest batch over steps at B, and
efficiency is speed-up / (B / B_smallest): 1 is perfect scaling, lower means wasted samples.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np

from batchlab.analysis.study import StudyData, column, median_or_inf
from batchlab.analysis.target import ToTargetRow
from batchlab.core.fit import mean_se
from batchlab.engine.spec import HistoryKey as H
from batchlab.sweep.store import RunRecord

GapBasis = Literal["epochs", "steps"]
_X_COLUMN = {"epochs": H.EPOCH, "steps": H.STEP}
FINAL_KEYS = ("train_loss", "val_loss", "train_metric", "val_metric")


@dataclass(frozen=True)
class Curve:
    """History of one batch size at its best grid lr, averaged over seeds at shared eval steps."""

    batch_size: int
    lr: float
    n_seeds: int
    step: tuple[float, ...]
    epoch: tuple[float, ...]
    train_loss: tuple[float, ...]
    val_loss: tuple[float, ...]
    val_metric: tuple[float, ...]


def loss_curves(data: StudyData, lr_by_batch: Mapping[int, float]) -> tuple[Curve, ...]:
    """One mean curve per batch size over its finished (ok) runs at ``lr_by_batch[B]``."""
    curves = []
    for b, lr in sorted(lr_by_batch.items()):
        histories = [data.history(r) for r in data.at(b, lr) if r.status == "ok"]
        histories = [h for h in histories if h]
        if not histories:
            continue
        shared = set.intersection(*({row[H.STEP] for row in h} for h in histories))
        rows = [[row for row in h if row[H.STEP] in shared] for h in histories]
        mean = {
            name: tuple(np.mean([column(r, name) for r in rows], axis=0).tolist())
            for name in (H.STEP, H.EPOCH, H.TRAIN_LOSS, H.VAL_LOSS, H.VAL_METRIC)
        }
        curves.append(
            Curve(
                batch_size=b,
                lr=lr,
                n_seeds=len(rows),
                step=mean[H.STEP],
                epoch=mean[H.EPOCH],
                train_loss=mean[H.TRAIN_LOSS],
                val_loss=mean[H.VAL_LOSS],
                val_metric=mean[H.VAL_METRIC],
            )
        )
    return tuple(curves)


@dataclass(frozen=True)
class GapRow:
    """Generalization gap at one batch size: mean and standard error over seeds.

    ``source`` says where the numbers come from: ``final`` (full-set evaluation at the end),
    ``history`` (interpolated eval rows) or ``mixed``.
    """

    batch_size: int
    lr: float
    train_loss: float
    val_loss: float
    gap_loss: float
    gap_loss_se: float
    gap_metric: float
    gap_metric_se: float
    n_runs: int
    source: str


@dataclass(frozen=True)
class GapTable:
    """Gaps of every batch size compared at the same ``at`` epochs or steps (``basis``)."""

    basis: GapBasis
    at: float
    rows: tuple[GapRow, ...]


def _gap_point(
    run: RunRecord, history: list[dict], basis: GapBasis, at: float
) -> tuple[float, ...]:
    """(train_loss, val_loss, gap_metric, from_final) of one run at ``at``."""
    end = run.epochs if basis == "epochs" else run.steps
    one_step = run.epochs / max(run.steps, 1) if basis == "epochs" else 0.5
    if abs(end - at) <= one_step:
        f = {k: float(run.final.get(k, math.nan)) for k in FINAL_KEYS}
        return f["train_loss"], f["val_loss"], f["train_metric"] - f["val_metric"], 1.0
    x = column(history, _X_COLUMN[basis])
    train, val = column(history, H.TRAIN_LOSS), column(history, H.VAL_LOSS)
    ok = np.isfinite(x) & np.isfinite(train) & np.isfinite(val)
    if not ok.any():
        return math.nan, math.nan, math.nan, 0.0
    return (
        float(np.interp(at, x[ok], train[ok])),
        float(np.interp(at, x[ok], val[ok])),
        math.nan,
        0.0,
    )


def generalization_gap(
    data: StudyData, lr_by_batch: Mapping[int, float], basis: GapBasis
) -> GapTable | None:
    """Gap per batch size at its best grid lr, all read at the same epoch or step count."""
    chosen = {
        b: [r for r in data.at(b, lr) if r.status == "ok"] for b, lr in sorted(lr_by_batch.items())
    }
    ends = [r.epochs if basis == "epochs" else r.steps for runs in chosen.values() for r in runs]
    if not ends:
        return None
    at = float(min(ends))
    rows = []
    for b, runs in chosen.items():
        if not runs:
            continue
        points = np.array([_gap_point(r, data.history(r), basis, at) for r in runs], dtype=float)
        train, val, metric, final = points.T
        loss_gap, loss_se = mean_se(val - train)
        metric_gap, metric_se = mean_se(metric)
        rows.append(
            GapRow(
                batch_size=b,
                lr=lr_by_batch[b],
                train_loss=mean_se(train)[0],
                val_loss=mean_se(val)[0],
                gap_loss=loss_gap,
                gap_loss_se=loss_se,
                gap_metric=metric_gap,
                gap_metric_se=metric_se,
                n_runs=len(runs),
                source="final" if final.all() else "history" if not final.any() else "mixed",
            )
        )
    return GapTable(basis, at, tuple(rows))


@dataclass(frozen=True)
class CostRow:
    """What one batch size costs: to the target (``basis="target"``) or to the end of the budget."""

    batch_size: int
    basis: str
    steps: float
    samples: float
    wall_s: float
    speedup: float
    wall_speedup: float
    efficiency: float


def cost_table(
    data: StudyData,
    lr_by_batch: Mapping[int, float],
    to_target: tuple[ToTargetRow, ...] | None = None,
) -> tuple[CostRow, ...]:
    """Steps, samples, wall seconds, speed-up and efficiency per batch size (medians over seeds)."""
    raw: list[tuple[int, float, float, float]] = []
    if to_target is not None:
        basis = "target"
        raw = [(r.batch_size, r.steps, r.samples, r.wall_s) for r in to_target]
    else:
        basis = "budget"
        for b, lr in sorted(lr_by_batch.items()):
            runs = [r for r in data.at(b, lr) if r.status == "ok"]
            if runs:
                raw.append(
                    (
                        b,
                        median_or_inf([r.steps for r in runs]),
                        median_or_inf([r.samples for r in runs]),
                        median_or_inf([r.wall_s for r in runs]),
                    )
                )
    reference = next((row for row in raw if math.isfinite(row[1])), None)
    rows = []
    for b, steps, samples, wall in raw:
        speed = wall_speed = eff = math.nan
        if reference is not None and math.isfinite(steps):
            speed = reference[1] / steps
            wall_speed = reference[3] / wall if wall > 0 else math.nan
            eff = speed * reference[0] / b
        rows.append(CostRow(b, basis, steps, samples, wall, speed, wall_speed, eff))
    return tuple(rows)
