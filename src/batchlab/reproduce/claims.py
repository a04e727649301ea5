"""The eight classic claims about batch size and learning rate: each a study and a verdict.

A claim names the runs it needs (``RunSpec``s, grouped in studies and planned in *stages*: a later
stage may use the stored results of an earlier one, e.g. the learning rate found best at batch 64)
and turns the stored results into the numbers its pre-registered rule in ``verdicts`` takes. Runs
are identified by their spec, so claims that need the same run share it, and an interrupted
``reproduce`` resumes by planning again and skipping what is stored.

Most claims read one shared study, the *grid*: SGD with momentum 0.9 over batch sizes x learning
rates x seeds at a fixed number of epochs on MNIST-1D (``mnist1d-mlp``). Claim 2 uses a larger
training set so that batch 4096 is still a small fraction of it (Goyal et al. 2017 scaled ImageNet,
1.28M examples, to 8k); claims 5 and 6 add their own arms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from batchlab.analysis import StudyData, Target, best_lr_table, fit_scaling, to_target_table
from batchlab.analysis.study import load_study
from batchlab.core.fit import mean_se
from batchlab.core.rules import apply_rule
from batchlab.core.schedules import increase_batch
from batchlab.engine.spec import RunSpec
from batchlab.report.html import ReportFigure
from batchlab.reproduce import verdicts as v
from batchlab.sweep.store import RunRecord, Store

DEFAULT_TASK = "mnist1d-mlp"
BASE_BATCH = 64
STUDY_PREFIX = "reproduce/"
GRID = "grid"
TABLE_EXPONENT = math.log(100) / math.log(16)  # 32/128/512 -> 0.001/0.01/0.1


def _geometric(start: float, factor: float, n: int) -> tuple[float, ...]:
    return tuple(round(start * factor**i, 10) for i in range(n))


@dataclass(frozen=True)
class Sizes:
    """How big each study is: one instance per mode, declared once in ``MODES``."""

    grid_samples: int  # MNIST-1D examples (80% train)
    grid_batch_sizes: tuple[int, ...]
    grid_lrs: tuple[float, ...]
    grid_epochs: float
    claim2_samples: int
    claim2_batch_sizes: tuple[int, ...]  # the first is the base batch (64)
    claim2_lrs: tuple[float, ...]  # base-lr grid at batch 64
    claim2_epochs: float
    claim5_epochs: float  # the small batch's; the adapted arm trains 16x as many
    claim6_epochs: float


MODES: dict[str, Sizes] = {
    # quick: <= 10 minutes on 2 CPU cores; full: <= 60; smoke: seconds, for tests and trying a task
    "quick": Sizes(
        grid_samples=10_000,
        grid_batch_sizes=(32, 64, 128, 256, 512, 1024),
        grid_lrs=_geometric(0.004, 2.0, 12),  # to 8.192: past the divergence threshold
        grid_epochs=10.0,
        claim2_samples=62_500,
        claim2_batch_sizes=(64, 256, 1024, 4096),
        claim2_lrs=_geometric(0.016, 2.0, 4),
        claim2_epochs=5.0,
        claim5_epochs=10.0,
        claim6_epochs=20.0,
    ),
    "full": Sizes(
        grid_samples=20_000,
        grid_batch_sizes=(16, 32, 64, 128, 256, 512, 1024, 2048),
        grid_lrs=_geometric(0.004, math.sqrt(2.0), 23),
        grid_epochs=20.0,
        claim2_samples=62_500,
        claim2_batch_sizes=(64, 128, 256, 512, 1024, 2048, 4096, 8192),
        claim2_lrs=_geometric(0.008, math.sqrt(2.0), 9),
        claim2_epochs=10.0,
        claim5_epochs=20.0,
        claim6_epochs=40.0,
    ),
    "smoke": Sizes(
        grid_samples=2_000,
        grid_batch_sizes=(32, 64, 256, 1024),
        grid_lrs=_geometric(0.02, 4.0, 4),
        grid_epochs=2.0,
        claim2_samples=6_250,
        claim2_batch_sizes=(64, 256, 1024, 4096),
        claim2_lrs=_geometric(0.03, 2.0, 2),
        claim2_epochs=1.0,
        claim5_epochs=1.0,
        claim6_epochs=2.0,
    ),
}


@dataclass(frozen=True)
class Setup:
    """The mode (study sizes), the seeds and the task every study runs on.

    ``task_options`` are the user's; on the default task the data size of each study is added.
    """

    mode: str = "quick"
    seeds: tuple[int, ...] = (0, 1, 2)
    task: str = DEFAULT_TASK
    task_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode: must be one of {', '.join(MODES)}, got {self.mode!r}")

    @property
    def sizes(self) -> Sizes:
        """The study sizes of this mode."""
        return MODES[self.mode]

    def options(self, n_samples: int, **extra: Any) -> tuple[tuple[str, Any], ...]:
        """Task options of a study: its data size (default task only), the user's, then ``extra``."""
        base = {"n_samples": n_samples} if self.task == DEFAULT_TASK else {}
        return tuple({**base, **dict(self.task_options), **extra}.items())

    def spec(self, n_samples: int, task_extra: dict[str, Any] | None = None, **kw: Any) -> RunSpec:
        """A run of this setup: SGD, momentum 0.9, budget in epochs, unless ``kw`` says otherwise."""
        fields = {"optimizer": "sgd", "momentum": 0.9, "budget_unit": "epochs", **kw}
        return RunSpec(
            task=self.task, task_options=self.options(n_samples, **(task_extra or {})), **fields
        )

    def grid(self) -> list[RunSpec]:
        """Every (batch size, lr, seed) of the grid shared by claims 1, 3, 4, 7 and 8."""
        z = self.sizes
        return [
            self.spec(z.grid_samples, batch_size=b, lr=lr, budget=z.grid_epochs, seed=s)
            for b in z.grid_batch_sizes
            for lr in z.grid_lrs
            for s in self.seeds
        ]


class Results:
    """Read access to the stored studies while planning later stages and judging claims."""

    def __init__(self, store: Store, setup: Setup) -> None:
        self.store, self.setup = store, setup
        self._read: dict[str, StudyData] = {}
        self._planned: dict[str, set[str]] = {}

    def expect(self, studies: dict[str, list[RunSpec]]) -> None:
        """Note the runs this setup planned per study: other runs in the same store (another mode,
        seed set or task) are never mixed into a verdict."""
        for study, specs in studies.items():
            self._planned.setdefault(study.removeprefix(STUDY_PREFIX), set()).update(
                s.run_id for s in specs
            )

    def data(self, study: str) -> StudyData:
        """The stored runs and histories of one of our studies (read once per stage), limited to
        the runs this setup planned when it planned any."""
        if study not in self._read:
            data = load_study(self.store, STUDY_PREFIX + study)
            ids = self._planned.get(study)
            if ids is not None:
                runs = tuple(r for r in data.runs if r.id in ids)
                data = StudyData(data.name, runs, data.histories, data.target, data.config)
            self._read[study] = data
        return self._read[study]

    def forget(self) -> None:
        """Drop cached reads (after a stage stored new runs)."""
        self._read.clear()

    def base_lr(self) -> float:
        """The grid's learning rate with the lowest median final training loss at batch 64."""
        return best_lr(self.data(GRID), BASE_BATCH, "train_loss")


def final(run: RunRecord | None, key: str) -> float:
    """A final number of a run; NaN when the run is missing or did not finish."""
    if run is None or run.status != "ok":
        return math.nan
    return float(run.final.get(key, math.nan))


def best_lr(data: StudyData, batch_size: int, key: str) -> float:
    """The lr whose median final ``key`` (a loss: lower is better) is lowest at ``batch_size``.

    An lr at which any seed failed to finish does not count.
    """
    scores = {}
    for lr in data.lrs:
        values = [final(r, key) for r in data.at(batch_size, lr)]
        if values and all(math.isfinite(x) for x in values):
            scores[lr] = float(np.median(values))
    if not scores:
        raise ValueError(f"batch_size: no run at batch {batch_size} finished")
    return min(scores, key=lambda lr: (scores[lr], lr))


def per_seed(data: StudyData, batch_sizes: Sequence[int], lr: float, key: str) -> np.ndarray:
    """``out[seed, i]`` = final ``key`` at ``batch_sizes[i]`` and ``lr`` (NaN where missing)."""
    return per_seed_at(data, batch_sizes, [lr] * len(batch_sizes), key)


def per_seed_at(
    data: StudyData, batch_sizes: Sequence[int], lrs: Sequence[float], key: str
) -> np.ndarray:
    """``out[seed, i]`` = final ``key`` at ``batch_sizes[i]`` and ``lrs[i]`` (NaN where missing)."""
    out = np.full((len(data.seeds), len(batch_sizes)), math.nan)
    for j, seed in enumerate(data.seeds):
        for i, (b, lr) in enumerate(zip(batch_sizes, lrs, strict=True)):
            runs = data.at(b, lr, seed)
            out[j, i] = final(runs[0] if runs else None, key)
    return out


@dataclass(frozen=True)
class Judgement:
    """What a claim concludes: the verdict, the figures and a table of the numbers behind it."""

    outcome: v.Outcome
    figures: tuple[ReportFigure, ...] = ()
    rows: tuple[tuple[str, Any], ...] = ()


@dataclass(frozen=True)
class Claim:
    """One claim: its statement, source, the studies it needs per stage and how it is judged."""

    number: int
    title: str
    source: str
    studies: dict[int, Callable[[Setup, Results], dict[str, list[RunSpec]]]]
    judge: Callable[[Setup, Results], Judgement]
    rule: str = field(init=False)
    superseded: str | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "rule", v.RULES[self.number])
        object.__setattr__(self, "superseded", v.SUPERSEDED.get(self.number))


def _figure(width: float = 6.4, height: float = 3.8) -> tuple[Figure, Any]:
    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.add_subplot()


def _log_batch_axis(ax: Any, batch_sizes: Sequence[int]) -> None:
    ax.set_xscale("log", base=2)
    ax.set_xticks(list(batch_sizes), [str(b) for b in batch_sizes])
    ax.set_xlabel("batch size")
    ax.grid(alpha=0.3)


def _judged(
    number: int, name: str, outcome: v.Outcome, fig: Figure, caption: str, rows: Sequence[Any]
) -> Judgement:
    """A judgement with one figure, named ``claim<number>-<name>`` in the report."""
    figure = ReportFigure(f"claim{number}-{name}", f"Claim {number}", caption, fig)
    return Judgement(outcome, (figure,), tuple(rows))


def _evidence(outcome: v.Outcome, *keys: str) -> list[tuple[str, Any]]:
    """Rows of the table under a claim: the named entries of its evidence."""
    return [(k, outcome.evidence[k]) for k in keys]


def _per_batch(
    label: str, batch_sizes: Sequence[int], values: Sequence[Any]
) -> list[tuple[str, Any]]:
    """Rows ``batch B: label`` of a per-batch-size evidence list."""
    return [(f"batch {b}: {label}", x) for b, x in zip(batch_sizes, values, strict=True)]


def _seed_dots(
    ax: Any, groups: Sequence[Sequence[float]], names: Sequence[str], label: str
) -> None:
    """One column of per-seed dots over a bar of their mean for each group."""
    for x, values in enumerate(groups):
        ax.plot([x] * len(values), values, "o", alpha=0.6)
        ax.bar(x, mean_se(values)[0], alpha=0.3)
    ax.set_xticks(range(len(groups)), names)
    ax.set_ylabel(label)


def _grid_only(setup: Setup, results: Results) -> dict[str, list[RunSpec]]:
    return {GRID: setup.grid()}


# -- claim 1 ---------------------------------------------------------------------------------------

CLAIM1_BATCHES = (64, 256, 1024)


def judge_claim1(setup: Setup, results: Results) -> Judgement:
    """Final training loss at 64 < 256 < 1024, at the lr best for 64 and the grid's epochs."""
    data = results.data(GRID)
    lr = results.base_lr()
    losses = per_seed(data, CLAIM1_BATCHES, lr, "train_loss")
    outcome = v.loss_grows_with_batch(losses, CLAIM1_BATCHES)
    outcome.evidence.update(lr=lr, epochs=setup.sizes.grid_epochs, loss_per_seed=losses.tolist())
    fig, ax = _figure()
    for row, seed in zip(losses, data.seeds, strict=True):
        ax.plot(CLAIM1_BATCHES, row, "o-", alpha=0.5, label=f"seed {seed}")
    _log_batch_axis(ax, CLAIM1_BATCHES)
    ax.set_ylabel("final training loss")
    ax.set_title(f"lr {lr:g} fixed, {setup.sizes.grid_epochs:g} epochs")
    ax.legend(fontsize=8)
    caption = (
        f"Final training loss at a fixed learning rate ({lr:g}, the grid's best for batch 64) "
        f"after {setup.sizes.grid_epochs:g} epochs: a larger batch takes fewer steps over the same data."
    )
    rows = _per_batch("mean loss", CLAIM1_BATCHES, outcome.evidence["mean_loss"])
    return _judged(1, "loss-vs-batch", outcome, fig, caption, rows)


# -- claim 2 ---------------------------------------------------------------------------------------


def claim2_base(setup: Setup, results: Results) -> dict[str, list[RunSpec]]:
    """Stage 1: the base learning rate grid at batch 64 on 50,000 training examples."""
    z = setup.sizes
    specs = [
        setup.spec(z.claim2_samples, batch_size=BASE_BATCH, lr=lr, budget=z.claim2_epochs, seed=s)
        for lr in z.claim2_lrs
        for s in setup.seeds
    ]
    return {"claim2": specs}


def claim2_scaled(setup: Setup, results: Results) -> dict[str, list[RunSpec]]:
    """Stage 2: every larger batch at the linearly scaled lr, warmup over a fifth of the budget."""
    z = setup.sizes
    n, epochs = z.claim2_samples, z.claim2_epochs
    base = best_lr(results.data("claim2"), BASE_BATCH, "train_loss")
    specs = []
    for b in z.claim2_batch_sizes[1:]:
        lr = apply_rule("linear", base_batch=BASE_BATCH, base_lr=base, batch_size=b).lr
        for s in setup.seeds:
            specs.append(
                setup.spec(n, batch_size=b, lr=lr, budget=epochs, seed=s, warmup_epochs=epochs / 5)
            )
    return {"claim2": specs}


def _curve(data: StudyData, run: RunRecord | None) -> tuple[list[float], list[float]] | None:
    """(epochs, training loss) of a finished run's history; None for a missing or diverged run."""
    if run is None or run.status != "ok":
        return None
    rows = [h for h in data.history(run) if h["train_loss"] is not None]
    return [h["epoch"] for h in rows], [h["train_loss"] for h in rows]


def claim2_distances(
    data: StudyData, batches: Sequence[int], lrs: Sequence[float], start: float, end: float
) -> np.ndarray:
    """``out[seed, i]``: the curve distance of ``batches[i]`` at ``lrs[i]`` from ``batches[0]``
    (same seed); inf when that run diverged, NaN when a run is missing or failed."""
    out = np.full((len(data.seeds), len(batches)), math.nan)
    for j, seed in enumerate(data.seeds):
        runs = [next(iter(data.at(b, lr, seed)), None) for b, lr in zip(batches, lrs, strict=True)]
        base = _curve(data, runs[0])
        for i, run in enumerate(runs):
            if run is not None and run.status == "diverged":
                out[j, i] = math.inf
            elif base is not None and (curve := _curve(data, run)) is not None:
                out[j, i] = v.curve_distance(*base, *curve, start=start, end=end)
    return out


def judge_claim2(setup: Setup, results: Results) -> Judgement:
    """Training-loss curves of every batch size with the lr scaled from batch 64, against 64's."""
    data = results.data("claim2")
    epochs, batches = setup.sizes.claim2_epochs, setup.sizes.claim2_batch_sizes
    warmup = epochs / 5
    base = best_lr(data, BASE_BATCH, "train_loss")
    lrs = [
        apply_rule("linear", base_batch=BASE_BATCH, base_lr=base, batch_size=b).lr for b in batches
    ]
    outcome = v.curves_match(claim2_distances(data, batches, lrs, warmup, epochs), batches)
    old = v.linear_scaling_match(per_seed_at(data, batches, lrs, "train_loss"), batches)
    outcome.evidence.update(
        base_lr=base,
        epochs=epochs,
        warmup_epochs=warmup,
        superseded_rule={
            "verdict": old.verdict,
            "reason": old.reason,
            "final_loss_relative_difference": old.evidence["relative_difference"],
        },
    )
    fig, ax = _figure()
    for b, lr, dist in zip(batches, lrs, outcome.evidence["curve_distance"], strict=True):
        curves = [c for r in data.at(b, lr) if (c := _curve(data, r)) is not None]
        if curves:
            length = min(len(x) for x, _ in curves)
            mean = np.mean([y[:length] for _, y in curves], axis=0)
            label = f"B={b}, lr={lr:.3g}" + (f", distance {dist:.3f}" if b != BASE_BATCH else "")
            ax.plot(curves[0][0][:length], mean, label=label)
    ax.axvline(warmup, color="0.5", lw=0.8, ls="--")
    ax.set_xlabel("epoch")
    ax.set_ylabel("training loss (mean over seeds)")
    ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    caption = (
        f"Training loss against epochs with lr = {base:g} x B/64 (linear rule, warmup until the "
        f"dashed line, {warmup:g} epochs). A batch size matches when the area between its curve "
        f"and batch 64's after the warmup, over the area under batch 64's, is at most 0.10 over its "
        "whole interval across seeds (mean +- 2 SE)."
    )
    ev = outcome.evidence
    rows = [
        (f"batch {b}: curve distance [interval], {m}", f"{d:.3f} [{lo:.3f}, {hi:.3f}]")
        for b, d, lo, hi, m in zip(
            batches,
            ev["curve_distance"],
            ev["curve_distance_low"],
            ev["curve_distance_high"],
            ev["match"],
            strict=True,
        )
    ][1:]
    rows += _per_batch(
        "final loss difference (superseded rule)", batches, old.evidence["relative_difference"]
    )[1:]
    rows.append(("superseded rule's verdict", old.verdict.replace("_", " ")))
    return _judged(2, "linear-scaling", outcome, fig, caption, rows)


# -- claim 3 ---------------------------------------------------------------------------------------


def judge_claim3(setup: Setup, results: Results) -> Judgement:
    """Best lr per batch size between 32 and 512 (final validation loss) and its exponent."""
    data = results.data(GRID)
    keep = tuple(r for r in data.runs if 32 <= r.batch_size <= 512)
    sub = StudyData(data.name, keep, data.histories, data.target, data.config)
    scaling = best_lr_table(sub, "val_loss")
    alpha, (low, high) = (
        (scaling.alpha, scaling.alpha_interval) if scaling else (math.nan, (math.nan, math.nan))
    )
    outcome = v.table_exponent(alpha, low, high, TABLE_EXPONENT)
    fig, ax = _figure()
    if scaling is not None:
        bs = [r.batch_size for r in scaling.rows]
        best = [r.lr for r in scaling.rows]
        outcome.evidence.update(best_lr={str(b): lr for b, lr in zip(bs, best, strict=True)})
        ax.plot(bs, best, "o-", color="k", label=f"measured best lr (alpha {alpha:.2f})")
        for name, exponent, style in (("linear", 1.0, "--"), ("square root", 0.5, ":")):
            ax.plot(bs, [best[0] * (b / bs[0]) ** exponent for b in bs], style, label=name)
        ax.plot([32, 128, 512], [0.001, 0.01, 0.1], "s", color="tab:red", label="quoted table")
        ax.set_yscale("log")
        _log_batch_axis(ax, bs)
        ax.set_ylabel("learning rate")
        ax.legend(fontsize=8)
    caption = (
        "Best learning rate per batch size (lowest final validation loss, interpolated between grid "
        "points) against the quoted table 32/128/512 -> 0.001/0.01/0.1 and the linear and "
        "square-root rules."
    )
    rows = (
        ("alpha", alpha),
        ("interval low", low),
        ("interval high", high),
        ("table alpha (the verdict)", TABLE_EXPONENT),
        ("rule the interval supports (linear 1.0, sqrt 0.5)", outcome.evidence["supported_rule"]),
    )
    return _judged(3, "best-lr", outcome, fig, caption, rows)


# -- claim 4 ---------------------------------------------------------------------------------------


def judge_claim4(setup: Setup, results: Results) -> Judgement:
    """Gap and top Hessian eigenvalue of the smallest vs the largest batch, same lr and epochs."""
    from batchlab.engine.sharpness import run_sharpness
    from batchlab.engine.tasks import stored_task

    data = results.data(GRID)
    lr = results.base_lr()
    small, large = min(data.batch_sizes), max(data.batch_sizes)
    gap: dict[int, list[float]] = {small: [], large: []}
    sharp: dict[int, list[float]] = {small: [], large: []}
    for b in (small, large):
        for run in data.at(b, lr):
            gap[b].append(final(run, "val_loss") - final(run, "train_loss"))
            top = math.nan
            if run.status == "ok":
                weights = results.store.weights(run.id)
                if weights is None:
                    raise ValueError(f"run {run.id} has no stored weights: use a new --db")
                task = stored_task(run.spec, run.id, named=setup.task)  # never the store's code
                top = run_sharpness(run.spec, weights, task=task, keskar=False)["top_eigenvalue"]
            sharp[b].append(top)
    outcome = v.large_batch_sharper(gap[small], gap[large], sharp[small], sharp[large])
    outcome.evidence.update(
        lr=lr, small_batch=small, large_batch=large, epochs=setup.sizes.grid_epochs
    )
    fig = Figure(figsize=(7.5, 3.4), layout="constrained")
    for ax, values, label in zip(
        fig.subplots(1, 2),
        (gap, sharp),
        ("val - train loss", "top Hessian eigenvalue"),
        strict=True,
    ):
        _seed_dots(ax, [values[small], values[large]], [f"B={small}", f"B={large}"], label)
    caption = (
        f"Generalization gap and sharpness at the final weights, batch {small} vs {large}, both at lr "
        f"{lr:g} for {setup.sizes.grid_epochs:g} epochs (dots: seeds, bars: means)."
    )
    rows = _evidence(outcome, "gap_small", "gap_large", "sharpness_small", "sharpness_large")
    return _judged(4, "gap-sharpness", outcome, fig, caption, rows)


# -- claim 5 ---------------------------------------------------------------------------------------

CLAIM5_SMALL, CLAIM5_LARGE = 64, 1024


def _claim5_arms(setup: Setup, base: float) -> dict[str, list[RunSpec]]:
    k = CLAIM5_LARGE // CLAIM5_SMALL
    epochs = setup.sizes.claim5_epochs
    lr_large = apply_rule("sqrt", base_batch=CLAIM5_SMALL, base_lr=base, batch_size=CLAIM5_LARGE).lr
    batch_norm = {"norm": "batch"}
    ghost = {"norm": "ghost", "ghost_batch_size": CLAIM5_SMALL}
    n = setup.sizes.grid_samples
    arms = {
        "small": dict(batch_size=CLAIM5_SMALL, lr=base, budget=epochs, task_extra=batch_norm),
        "large": dict(batch_size=CLAIM5_LARGE, lr=lr_large, budget=epochs, task_extra=batch_norm),
        "adapted": dict(batch_size=CLAIM5_LARGE, lr=lr_large, budget=epochs * k, task_extra=ghost),
    }
    return {arm: [setup.spec(n, seed=s, **kw) for s in setup.seeds] for arm, kw in arms.items()}


def claim5_runs(setup: Setup, results: Results) -> dict[str, list[RunSpec]]:
    """The three arms of regime adaptation (needs the grid's base lr)."""
    arms = _claim5_arms(setup, results.base_lr())
    return {"claim5": [s for specs in arms.values() for s in specs]}


def _metric_of(
    results: Results, study: str, arms: dict[str, list[RunSpec]]
) -> dict[str, list[float]]:
    """Final validation metric per seed of each arm; an arm without any finished run is an error
    (the claim is then inconclusive, not judged on NaNs)."""
    by_id = {r.id: r for r in results.data(study).runs}
    values = {
        arm: [final(by_id.get(s.run_id), "val_metric") for s in specs]
        for arm, specs in arms.items()
    }
    empty = [arm for arm, vals in values.items() if not any(math.isfinite(x) for x in vals)]
    if empty:
        raise ValueError(f"{study}: no finished run in arm(s) {', '.join(empty)}")
    return values


def judge_claim5(setup: Setup, results: Results) -> Judgement:
    """Validation metric of small batch, large batch at equal epochs, large batch adapted."""
    base = results.base_lr()
    arms = _claim5_arms(setup, base)
    values = _metric_of(results, "claim5", arms)
    outcome = v.longer_training_closes_gap(values["small"], values["large"], values["adapted"])
    outcome.evidence.update(
        base_lr=base,
        lr_large=arms["large"][0].lr,
        per_seed=values,
        adapted_epochs=arms["adapted"][0].budget,
    )
    fig, ax = _figure(5.5, 3.6)
    names = [f"B={CLAIM5_SMALL}", f"B={CLAIM5_LARGE}\nequal epochs", f"B={CLAIM5_LARGE}\nadapted"]
    _seed_dots(ax, list(values.values()), names, "final validation metric")
    caption = (
        f"Regime adaptation (Hoffer et al. 2017): batch {CLAIM5_LARGE} trained for "
        f"{CLAIM5_LARGE // CLAIM5_SMALL}x the epochs (the small batch's number of updates), lr "
        f"x sqrt({CLAIM5_LARGE // CLAIM5_SMALL}), ghost batch norm over {CLAIM5_SMALL} examples."
    )
    rows = _evidence(outcome, "small_batch", "large_batch_equal_epochs", "large_batch_adapted")
    return _judged(5, "regime-adaptation", outcome, fig, caption, rows)


# -- claim 6 ---------------------------------------------------------------------------------------


def _claim6_arms(setup: Setup, base: float, n_train: int) -> dict[str, list[RunSpec]]:
    epochs = setup.sizes.claim6_epochs
    milestones, gamma = (0.5, 0.75), 0.2
    plan = increase_batch(
        base, BASE_BATCH, [m * epochs for m in milestones], gamma, epochs=epochs, n_train=n_train
    )
    n = setup.sizes.grid_samples
    decay = dict(
        batch_size=BASE_BATCH,
        lr=base,
        schedule="multistep",
        schedule_options={"milestones": milestones, "gamma": gamma},
    )
    fields = plan.spec_fields()
    return {
        "decay_lr": [setup.spec(n, budget=epochs, seed=s, **decay) for s in setup.seeds],
        "increase_batch": [setup.spec(n, seed=s, **fields) for s in setup.seeds],
    }


def _n_train(setup: Setup) -> int:
    from batchlab.engine.tasks import get_task

    return get_task(setup.task, **dict(setup.options(setup.sizes.grid_samples))).n_train


def claim6_runs(setup: Setup, results: Results) -> dict[str, list[RunSpec]]:
    """Step decay of the lr vs the equivalent growth of the batch (needs the grid's base lr)."""
    arms = _claim6_arms(setup, results.base_lr(), _n_train(setup))
    return {"claim6": [s for specs in arms.values() for s in specs]}


def judge_claim6(setup: Setup, results: Results) -> Judgement:
    """Final validation metric and optimizer steps of the two arms."""
    base = results.base_lr()
    arms = _claim6_arms(setup, base, _n_train(setup))
    by_id = {r.id: r for r in results.data("claim6").runs}
    values = _metric_of(results, "claim6", arms)
    steps = {
        arm: float(
            np.mean([by_id[s.run_id].steps for s in specs if s.run_id in by_id] or [math.nan])
        )
        for arm, specs in arms.items()
    }
    outcome = v.increase_batch_matches(
        values["decay_lr"], values["increase_batch"], steps["decay_lr"], steps["increase_batch"]
    )
    outcome.evidence.update(
        base_lr=base, batch_schedule=[list(x) for x in arms["increase_batch"][0].batch_schedule]
    )
    fig, ax = _figure()
    for arm, specs in arms.items():
        for j, s in enumerate(specs):
            run = by_id.get(s.run_id)
            if run is None:
                continue
            hist = results.data("claim6").history(run)
            ax.plot(
                [h["epoch"] for h in hist],
                [h["val_metric"] for h in hist],
                color="tab:blue" if arm == "decay_lr" else "tab:orange",
                alpha=0.6,
                label=f"{arm.replace('_', ' ')} ({steps[arm]:.0f} steps)" if j == 0 else None,
            )
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation metric")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    caption = (
        "Decaying the learning rate by 5x at 50% and 75% of training (batch 64) against growing the "
        "batch by 5x at the same epochs instead (Smith et al. 2018): same epochs, fewer updates."
    )
    keys = ("decay_lr_metric", "increase_batch_metric", "decay_lr_steps", "increase_batch_steps")
    return _judged(6, "increase-batch", outcome, fig, caption, _evidence(outcome, *keys))


# -- claim 7 ---------------------------------------------------------------------------------------

NOISE_BATCH = 128


def claim7_target(data: StudyData) -> Target:
    """90% of the best final validation metric that the grid's largest batch reaches."""
    largest = max(data.batch_sizes)
    best = max(final(r, "val_metric") for r in data.at(largest) if r.status == "ok")
    return Target("val_metric", 0.9 * best)


def claim7_noise(setup: Setup, results: Results) -> dict[str, list[RunSpec]]:
    """Noise-scale runs at the grid's batch nearest 128, at its best lr (final validation loss)."""
    data = results.data(GRID)
    batch = min(data.batch_sizes, key=lambda b: abs(math.log(b / NOISE_BATCH)))
    lr = best_lr(data, batch, "val_loss")
    specs = [
        setup.spec(
            setup.sizes.grid_samples,
            batch_size=batch,
            lr=lr,
            budget=setup.sizes.grid_epochs,
            seed=s,
            noise_scale=True,
        )
        for s in setup.seeds
    ]
    return {"claim7-noise": specs}


def measured_noise_scale(results: Results, target: Target) -> float:
    """Median over seeds of the noise scale when the run first reaches the target (else at its end)."""
    data = results.data("claim7-noise")
    values = []
    for run in data.runs:
        rows = [h for h in data.history(run) if h.get("noise_scale") is not None]
        if not rows:
            continue
        hit = [h for h in rows if h[target.metric] is not None and h[target.metric] >= target.value]
        values.append(float((hit or rows)[0 if hit else -1]["noise_scale"]))
    return float(np.median(values)) if values else math.nan


def judge_claim7(setup: Setup, results: Results) -> Judgement:
    """Steps and samples to the target per batch size, the fitted B_crit and the noise scale."""
    from batchlab.report.figures import steps_to_target

    data = results.data(GRID)
    target = claim7_target(data)
    rows_ = to_target_table(data, target)
    fit = fit_scaling(rows_)
    critical = fit.critical_batch if fit else math.nan
    noise = measured_noise_scale(results, target)
    outcome = v.critical_batch(
        [r.batch_size for r in rows_], [r.steps for r in rows_], critical, noise
    )
    outcome.evidence.update(
        target=f"{target.metric} >= {target.value:.4g}",
        critical_batch_interval=list(fit.critical_batch_interval) if fit else None,
        wall_s_to_target=[r.wall_s for r in rows_],
    )
    figures: tuple[ReportFigure, ...] = ()
    from batchlab.analysis import analyze

    figure = steps_to_target(analyze(data, target=target))
    if figure is not None:
        figures = (
            ReportFigure("claim7-steps-to-target", "Claim 7", figure.caption, figure.figure),
        )
    rows = (
        ("target", outcome.evidence["target"]),
        ("fitted B_crit", critical),
        ("noise scale", noise),
    )
    return Judgement(outcome, figures, rows)


# -- claim 8 ---------------------------------------------------------------------------------------


def judge_claim8(setup: Setup, results: Results) -> Judgement:
    """Smallest diverging lr of the grid per batch size and seed."""
    data = results.data(GRID)
    bs = data.batch_sizes
    thresholds = np.full((len(data.seeds), len(bs)), math.inf)
    for j, seed in enumerate(data.seeds):
        for i, b in enumerate(bs):
            diverged = [r.lr for r in data.at(b, seed=seed) if r.status == "diverged"]
            if diverged:
                thresholds[j, i] = min(diverged)
    outcome = v.threshold_grows(thresholds, bs)
    fig, ax = _figure()
    for row, seed in zip(thresholds, data.seeds, strict=True):
        ax.plot(bs, np.where(np.isfinite(row), row, np.nan), "o-", alpha=0.6, label=f"seed {seed}")
    ax.set_yscale("log")
    _log_batch_axis(ax, bs)
    ax.set_ylabel("smallest diverging learning rate")
    ax.legend(fontsize=8)
    caption = (
        "The divergence threshold: the smallest learning rate of the grid whose run diverged "
        "(loss not finite or 10x its start), per batch size and seed (SGD, momentum 0.9)."
    )
    rows = tuple((f"batch {b}", float(np.median(thresholds[:, i]))) for i, b in enumerate(bs))
    return _judged(8, "divergence", outcome, fig, caption, rows)


CLAIMS: dict[int, Claim] = {
    c.number: c
    for c in (
        Claim(
            1,
            "At a fixed learning rate and number of epochs, larger batches end at a higher loss",
            "Keskar et al. 2017; Goyal et al. 2017 (motivation)",
            {1: _grid_only},
            judge_claim1,
        ),
        Claim(
            2,
            "Linear LR scaling with warmup makes the loss curves of 64, 256 and 1024 match",
            "Goyal et al. 2017, 'Accurate, Large Minibatch SGD'",
            {1: claim2_base, 2: claim2_scaled},
            judge_claim2,
        ),
        Claim(
            3,
            "The quoted LR table (32/128/512 -> 0.001/0.01/0.1) against the measured best LR",
            "folklore table; Goyal et al. 2017 (linear), Hoffer et al. 2017 (square root)",
            {1: _grid_only},
            judge_claim3,
        ),
        Claim(
            4,
            "Large batches generalize worse and reach sharper minima",
            "Keskar et al. 2017, 'On Large-Batch Training ... Sharp Minima'",
            {1: _grid_only},
            judge_claim4,
        ),
        Claim(
            5,
            "Training longer (regime adaptation, sqrt lr, ghost batch norm) closes the gap",
            "Hoffer, Hubara & Soudry 2017, 'Train longer, generalize better'",
            {1: _grid_only, 2: claim5_runs},
            judge_claim5,
        ),
        Claim(
            6,
            "Increasing the batch size instead of decaying the lr: same accuracy, fewer updates",
            "Smith, Kindermans, Ying & Le 2018, 'Don't Decay the Learning Rate, Increase the Batch Size'",
            {1: _grid_only, 2: claim6_runs},
            judge_claim6,
        ),
        Claim(
            7,
            "Larger batches need fewer steps until the critical batch size, then more samples",
            "McCandlish et al. 2018; Shallue et al. 2019",
            {1: _grid_only, 2: claim7_noise},
            judge_claim7,
        ),
        Claim(
            8,
            "Too high a learning rate diverges, and the threshold grows with the batch size",
            "e.g. Goyal et al. 2017; Smith & Le 2018",
            {1: _grid_only},
            judge_claim8,
        ),
    )
}
