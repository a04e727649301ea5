"""Analysis tables -> matplotlib figures, each with a caption in plain words.

Every builder takes a ``StudyAnalysis`` and returns a ``ReportFigure``, or ``None`` when the study
has no data for it (the report then says so instead of drawing an empty plot). Figures are created
with ``matplotlib.figure.Figure`` (no pyplot, no global state, Agg when saved).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import LogNorm, Normalize
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from matplotlib.ticker import NullFormatter

from batchlab.analysis import GapTable, StudyAnalysis
from batchlab.analysis.lr import RULE_EXPONENTS
from batchlab.report.html import ReportFigure, fmt

_WIDE = (10.0, 4.0)
_SQUARE = (6.4, 4.6)


def _colors(batch_sizes: Sequence[int]) -> dict[int, tuple]:
    """One colour per batch size, small = dark, large = light (viridis)."""
    cmap = colormaps["viridis"]
    n = max(len(batch_sizes) - 1, 1)
    return {b: cmap(0.9 * i / n) for i, b in enumerate(sorted(batch_sizes))}


def _batch_axis(ax: Axes, batch_sizes: Sequence[float]) -> None:
    """Log x axis labelled at the study's batch sizes (no minor-tick clutter)."""
    ax.set_xscale("log")
    ticks = sorted({int(b) for b in batch_sizes})
    ax.set_xticks(ticks, [str(b) for b in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("batch size")


def _log_if_wide(ax: Axes, values: Sequence[float], ratio: float = 20.0) -> None:
    """Log y scale when the positive values span more than ``ratio`` (losses falling 100x)."""
    v = np.asarray(values, dtype=float)
    v = v[np.isfinite(v)]
    if v.size and v.min() > 0 and v.max() / v.min() > ratio:
        ax.set_yscale("log")


def _interval(low: float, high: float, level: float) -> str:
    if not (math.isfinite(low) and math.isfinite(high)):
        return "no interval (too few seeds or batch sizes)"
    return f"{level:.0%} interval {fmt(low)} to {fmt(high)}"


def loss_curves(a: StudyAnalysis) -> ReportFigure | None:
    """Validation (and training) loss per batch size against epochs and against steps."""
    if not a.curves:
        return None
    fig = Figure(figsize=_WIDE, layout="constrained")
    ax_e, ax_s = fig.subplots(1, 2, sharey=True)
    colors = _colors([c.batch_size for c in a.curves])
    for c in a.curves:
        label = f"B={c.batch_size}, lr={fmt(c.lr)}"
        steps = np.array(c.step)
        for ax, x, keep in ((ax_e, np.array(c.epoch), steps >= 0), (ax_s, steps, steps > 0)):
            ax.plot(x[keep], np.array(c.val_loss)[keep], color=colors[c.batch_size], label=label)
            ax.plot(
                x[keep],
                np.array(c.train_loss)[keep],
                color=colors[c.batch_size],
                ls="--",
                lw=0.9,
                alpha=0.7,
            )
    ax_e.set(xlabel="epochs", ylabel="loss", title="against epochs (equal data)")
    ax_s.set(xlabel="optimizer steps", xscale="log", title="against steps (equal updates)")
    _log_if_wide(ax_e, [v for c in a.curves for v in (*c.val_loss, *c.train_loss)])
    ax_e.legend(fontsize=8)
    for ax in (ax_e, ax_s):
        ax.grid(alpha=0.3)
    return ReportFigure(
        "loss_curves",
        "Loss curves per batch size",
        "Validation loss (solid) and training loss (dashed: mean over the batches since the "
        "previous evaluation) at each batch size's best learning rate, averaged over seeds. Left: "
        "against epochs, so every curve has seen the same data at the same x. Right: against "
        "optimizer steps, so every curve has made the same number of updates. Larger batches "
        "move left on the right-hand plot (fewer steps) and, past the critical batch size, "
        "right on the left-hand plot (more data for the same loss).",
        fig,
    )


def lr_heatmap(a: StudyAnalysis) -> ReportFigure | None:
    """Final validation loss over the (batch size, lr) grid; diverged cells marked."""
    if not a.grid:
        return None
    bs = sorted({c.batch_size for c in a.grid})
    lrs = sorted({c.lr for c in a.grid})
    values = np.full((len(bs), len(lrs)), np.nan)
    size = (max(6.0, 0.75 * len(lrs) + 2.5), max(3.0, 0.5 * len(bs) + 1.6))
    fig = Figure(figsize=size, layout="constrained")
    ax = fig.add_subplot()
    for c in a.grid:
        values[bs.index(c.batch_size), lrs.index(c.lr)] = c.value
    finite = values[np.isfinite(values)]
    vmin, vmax = np.percentile(finite, [0, 90]) if finite.size else (0.0, 1.0)
    vmax = max(vmax, vmin * 1.001 + 1e-12)
    wide = finite.size and vmin > 0 and vmax / vmin > 10
    norm = LogNorm(vmin, vmax) if wide else Normalize(vmin, vmax)
    image = ax.imshow(values, cmap="viridis_r", norm=norm, aspect="auto")
    ax.set_facecolor("#d9d9d9")
    best = a.best_lr.grid_lr if a.best_lr else {}
    for c in a.grid:
        i, j = bs.index(c.batch_size), lrs.index(c.lr)
        n = c.n_ok + c.n_diverged + c.n_failed
        if c.n_ok == 0:
            text = "diverged" if c.n_diverged else "failed"
            ax.text(j, i, "×\n" + text, ha="center", va="center", fontsize=7, color="#a3131b")
        elif len(lrs) <= 14:
            mark = f"\n{c.n_diverged}/{n} div" if c.n_diverged else ""
            r, g, b, _ = image.cmap(norm(c.value))
            ink = "k" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "w"
            ax.text(j, i, fmt(c.value, 2) + mark, ha="center", va="center", fontsize=7, color=ink)
        if best.get(c.batch_size) == c.lr:
            ax.add_patch(Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, ec="#ff7f0e", lw=2))
    ax.set_xticks(range(len(lrs)), [fmt(v, 2) for v in lrs], rotation=45, fontsize=8)
    ax.set_yticks(range(len(bs)), [str(b) for b in bs])
    ax.set(xlabel="learning rate", ylabel="batch size")
    fig.colorbar(image, ax=ax, label="final validation loss (mean over seeds)")
    return ReportFigure(
        "lr_heatmap",
        "Final validation loss over batch size and learning rate",
        "Each cell is one (batch size, learning rate) pair: its colour is the final validation "
        "loss averaged over the seeds that finished (darker is better; the scale stops at the "
        "90th percentile so a few bad runs do not wash it out, and is logarithmic when losses "
        "span more than 10x). Grey cells marked × diverged "
        "in every seed, 'k/n div' counts seeds that diverged, and the outlined cell in each row is "
        "that batch size's best learning rate. The good band moving right as rows go down is the "
        "learning rate growing with the batch size.",
        fig,
    )


def best_lr(a: StudyAnalysis) -> ReportFigure | None:
    """Best lr against batch size (log-log) with the fitted power law and the two classic rules."""
    s = a.best_lr
    if s is None or not s.rows:
        return None
    fig = Figure(figsize=_SQUARE, layout="constrained")
    ax = fig.add_subplot()
    b = np.array([r.batch_size for r in s.rows], dtype=float)
    for r in s.rows:
        seeds = [v for v in r.per_seed_lr if math.isfinite(v)]
        ax.scatter([r.batch_size] * len(seeds), seeds, s=10, color="#888", zorder=2)
    lr = np.array([r.lr for r in s.rows])
    edge = np.array([r.at_edge for r in s.rows])
    ax.scatter(b[~edge], lr[~edge], s=50, color="#1f77b4", zorder=3, label="best lr (seed mean)")
    if edge.any():
        ax.scatter(
            b[edge],
            lr[edge],
            s=50,
            facecolors="none",
            edgecolors="#1f77b4",
            zorder=3,
            label="best lr on the grid edge (a bound)",
        )
    xs = np.geomspace(b.min(), b.max(), 50)
    if s.fit is not None:
        ax.plot(xs, s.fit.predict(xs), color="#1f77b4", label=f"fit: alpha = {s.alpha:.2f}")
        anchor = min(s.used)
        lr0 = float(s.fit.predict(anchor))
        for (name, ref), style in zip(RULE_EXPONENTS.items(), ("--", ":"), strict=True):
            ax.plot(
                xs,
                lr0 * (xs / anchor) ** ref,
                "k",
                ls=style,
                lw=1,
                label=f"{name} rule (alpha = {ref:g})",
            )
    _batch_axis(ax, b)
    ax.set(yscale="log", ylabel=f"best learning rate (by final {s.objective})")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3, which="both")
    if s.fit is None:
        verdict = "Too few batch sizes to fit an exponent."
    else:
        inside = " and ".join(s.rules_in_interval) or "neither rule"
        verdict = (
            f"The fitted exponent is alpha = {s.alpha:.2f} "
            f"({_interval(*s.alpha_interval, s.level)} over seeds); inside the interval: {inside}; "
            f"the nearer rule is {s.closest_rule}."
        )
    return ReportFigure(
        "best_lr",
        "Best learning rate against batch size",
        "The learning rate that gives the best final "
        f"{s.objective} at each batch size, refined between grid points by a parabola in log-lr "
        "(grey dots: each seed; blue: their geometric mean), with the fitted power law lr* ~ "
        "B^alpha and the linear (alpha = 1) and square-root (alpha = 0.5) scaling rules drawn "
        f"through the fit at the smallest batch size. {verdict}",
        fig,
    )


def _regions(ax: Axes, bounds: tuple[float, float], xlim: tuple[float, float]) -> None:
    low, high = bounds
    ax.axvspan(xlim[0], low, color="#2ca02c", alpha=0.07, lw=0)
    ax.axvspan(high, xlim[1], color="#d62728", alpha=0.07, lw=0)


def steps_to_target(a: StudyAnalysis) -> ReportFigure | None:
    """Steps and samples to the target against batch size (log-log) with the McCandlish fit."""
    rows = [r for r in a.to_target if r.reached]
    if a.target is None or not rows:
        return None
    fig = Figure(figsize=_WIDE, layout="constrained")
    ax_s, ax_e = fig.subplots(1, 2)
    b = np.array([r.batch_size for r in rows], dtype=float)
    steps = np.array([r.steps for r in rows])
    samples = np.array([r.samples for r in rows])
    lo = np.array([r.steps_low for r in rows])
    hi = np.array([r.steps_high for r in rows])
    hi = np.where(np.isfinite(hi), hi, steps)
    xs = np.geomspace(b.min() / 1.5, b.max() * 1.5, 100)
    ax_s.errorbar(
        b,
        steps,
        yerr=[steps - lo, hi - steps],
        fmt="o",
        color="#1f77b4",
        capsize=3,
        label="median over seeds (bars: range)",
    )
    ax_e.errorbar(
        b,
        samples,
        yerr=[(steps - lo) * b, (hi - steps) * b],
        fmt="o",
        color="#1f77b4",
        capsize=3,
        label="median over seeds",
    )
    ax_s.plot(xs, steps[0] * b[0] / xs, "k--", lw=1, label="perfect scaling (steps ~ 1/B)")
    ax_e.plot(
        xs, np.full_like(xs, samples[0]), "k--", lw=1, label="perfect scaling (samples constant)"
    )
    f = a.scaling
    if f is not None:
        ax_s.plot(
            xs, f.fit.predict_steps(xs), color="#ff7f0e", label="fit S = S_min (1 + B_crit/B)"
        )
        ax_e.plot(
            xs, f.fit.predict_samples(xs), color="#ff7f0e", label="fit E = E_min (1 + B/B_crit)"
        )
        for ax in (ax_s, ax_e):
            ax.axvline(f.critical_batch, color="#ff7f0e", ls=":", lw=1)
            _regions(ax, f.region_bounds, (xs[0], xs[-1]))
    ax_s.set(yscale="log", ylabel=f"steps to {a.target.describe()}")
    ax_e.set(yscale="log", ylabel="training examples to target")
    for ax in (ax_s, ax_e):
        _batch_axis(ax, [r.batch_size for r in a.to_target])
        ax.set_xlim(xs[0], xs[-1])
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, which="both")
    missing = [r.batch_size for r in a.to_target if not r.reached]
    note = (
        f" Batch sizes {', '.join(map(str, missing))} did not reach the target in most seeds and are left out."
        if missing
        else ""
    )
    if f is None:
        fit_text = "Fewer than two batch sizes reached the target, so nothing is fitted."
    else:
        fit_text = (
            f"The fit gives a critical batch size B_crit = {fmt(f.critical_batch)} "
            f"({_interval(*f.critical_batch_interval, f.level)}, by {f.interval_method}), at least "
            f"S_min = {fmt(f.s_min)} steps and E_min = {fmt(f.e_min)} examples. Green: perfect "
            f"scaling (below {fmt(f.region_bounds[0])}, doubling the batch nearly halves the steps); "
            f"red: maximal parallelism (above {fmt(f.region_bounds[1])}, more batch barely helps); "
            "between them: diminishing returns."
        )
        if not f.fit.within_data:
            fit_text += " B_crit lies outside the measured batch sizes: it is an extrapolation."
    return ReportFigure(
        "steps_to_target",
        "Steps and samples to the target against batch size",
        f"How many optimizer steps (left) and training examples (right) each batch size needed to "
        f"first reach {a.target.describe()} at an evaluation, at its fastest learning rate "
        "(median over seeds). Dashed: perfect scaling from the smallest batch. Orange: the "
        f"McCandlish et al. (2018) fit. {fit_text}{note}",
        fig,
    )


_GAP_SERIES = (("equal epochs", "#1f77b4"), ("equal steps", "#ff7f0e"))


def _gap_points(table: GapTable | None, column: str) -> list:
    return [r for r in (table.rows if table else ()) if math.isfinite(getattr(r, column))]


def _gap_series(ax: Axes, table: GapTable, rows: list, column: str, label: str, color: str) -> None:
    """One gap series: a line, filled markers for full-set numbers, hollow ones for history."""
    x = [r.batch_size for r in rows]
    y = [getattr(r, column) for r in rows]
    se = np.nan_to_num([getattr(r, f"{column}_se") for r in rows])
    ax.errorbar(
        x,
        y,
        yerr=se,
        fmt="-",
        capsize=3,
        color=color,
        label=f"{label} ({fmt(table.at)} {table.basis})",
    )
    final = np.array([r.source == "final" for r in rows])
    ax.scatter(np.array(x)[final], np.array(y)[final], color=color, zorder=3)
    ax.scatter(
        np.array(x)[~final], np.array(y)[~final], facecolors="white", edgecolors=color, zorder=3
    )


def generalization_gap(a: StudyAnalysis) -> ReportFigure | None:
    """Val - train loss (and train - val metric) against batch size, at equal epochs and steps."""
    tables = (a.gap_epochs, a.gap_steps)
    loss = [_gap_points(t, "gap_loss") for t in tables]
    metric = [_gap_points(t, "gap_metric") for t in tables]
    if not any(loss):
        return None
    with_metric = any(len(rows) >= 2 for rows in metric)
    fig = Figure(figsize=_WIDE if with_metric else _SQUARE, layout="constrained")
    axes = fig.subplots(1, 2) if with_metric else [fig.add_subplot()]
    panels = [(axes[0], "gap_loss", loss, "validation - training loss")]
    if with_metric:
        panels.append((axes[1], "gap_metric", metric, f"training - validation {a.metric_name}"))
    for ax, column, points, ylabel in panels:
        for table, rows, (label, color) in zip(tables, points, _GAP_SERIES, strict=True):
            if rows:
                _gap_series(ax, table, rows, column, label, color)
        ax.axhline(0, color="#999", lw=0.8)
        ax.set_ylabel(ylabel)
        _batch_axis(ax, a.batch_sizes)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    metric_text = (
        f"the loss gap on the left, the {a.metric_name} gap on the right"
        if with_metric
        else f"the loss gap (the {a.metric_name} gap needs full-set training numbers at two or more batch sizes)"
    )
    return ReportFigure(
        "generalization_gap",
        "Generalization gap against batch size",
        "How much worse each batch size does on held-out data than on its training data, at its "
        f"best learning rate (mean over seeds, bars: standard error): {metric_text}. Blue "
        "compares all batch sizes after the same number of epochs, orange after the same number "
        "of optimizer steps; a gap that grows with the batch at equal epochs but not at equal "
        "steps points to too few updates rather than to large batches as such. Filled markers "
        "use the final full-set evaluation; hollow ones are read from the training history, "
        "whose training loss is a noisy mean over the last few mini-batches (it can even put the "
        "gap below zero early in training).",
        fig,
    )


def noise_scale(a: StudyAnalysis) -> ReportFigure | None:
    """Measured gradient noise scale over training, beside the fitted critical batch size."""
    n = a.noise
    if n is None:
        return None
    fig = Figure(figsize=_SQUARE, layout="constrained")
    ax = fig.add_subplot()
    best = a.best_lr.grid_lr if a.best_lr else {}
    shown = [s for s in n.series if best.get(s.batch_size) == s.lr] or list(n.series)
    colors = _colors(sorted({s.batch_size for s in shown}))
    seen = set()
    for s in shown:
        label = None if s.batch_size in seen else f"B={s.batch_size}"
        seen.add(s.batch_size)
        ax.plot(s.epoch, s.value, color=colors[s.batch_size], lw=1, label=label)
        low, high = np.array(s.low), np.array(s.high)
        if np.isfinite(low).all() and np.isfinite(high).all():
            ax.fill_between(s.epoch, low, high, color=colors[s.batch_size], alpha=0.12, lw=0)
    ax.axhline(n.measured, color="k", ls="--", lw=1, label=f"late median {fmt(n.measured)}")
    text = f"The late noise scale (median of each run's second half, then over runs) is {fmt(n.measured)}"
    if math.isfinite(n.critical_batch):
        ax.axhline(
            n.critical_batch,
            color="#ff7f0e",
            ls=":",
            lw=1.5,
            label=f"fitted B_crit {fmt(n.critical_batch)}",
        )
        text += f"; the fitted critical batch size is {fmt(n.critical_batch)}, {fmt(n.critical_over_measured, 2)} times that"
    ax.set(xlabel="epochs", ylabel="gradient noise scale B_simple")
    values = np.concatenate([s.value for s in shown])
    if values.min() > 0 and values.max() / values.min() > 30:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return ReportFigure(
        "noise_scale",
        "Gradient noise scale over training",
        "The simple noise scale B_simple = tr(Sigma)/|G|^2 (McCandlish et al. 2018) measured "
        "during training (bands: its interval where measured), one line per run at each batch "
        "size's best learning rate. It estimates the batch size beyond which larger batches stop paying off and "
        f"usually grows as the loss falls. {text}.",
        fig,
    )


BUILDERS = (
    ("loss_curves", loss_curves, "No loss curves: no run finished with a stored history."),
    ("lr_heatmap", lr_heatmap, "No heatmap: the study has no runs."),
    ("best_lr", best_lr, "No best-learning-rate figure: no batch size has a finished run."),
    (
        "steps_to_target",
        steps_to_target,
        "No steps-to-target figure: the study has no target, or no batch size reached it.",
    ),
    ("generalization_gap", generalization_gap, "No generalization-gap figure: no finished runs."),
    (
        "noise_scale",
        noise_scale,
        "No noise-scale figure: no run measured the gradient noise scale (sweep with noise_scale = true).",
    ),
)
"""(name, builder, note shown when the builder has no data) in report order."""


def plan_figure(plan: dict) -> Figure:
    """Wall time and device-hours to the target against batch size (``batchlab plan --json``'s
    dict), with the B_crit interval as a band and the fastest and cheapest batch sizes marked."""
    preds = plan["predictions"]
    sizes = [p["batch_size"] for p in preds]
    fig = Figure(figsize=_WIDE, layout="constrained")
    panels = (
        ("wall_s", "wall_interval", "wall time to target (s)", "fastest"),
        ("device_hours", "device_hours_interval", "device-hours to target", "cheapest"),
    )
    for ax, (key, band, label, goal) in zip(fig.subplots(1, 2), panels, strict=True):
        values = [p[key] for p in preds]
        ax.plot(sizes, values, "o-", color="tab:blue", label="predicted")
        low, high = zip(*(p[band] for p in preds), strict=True)
        if low != high:
            ax.fill_between(sizes, low, high, color="tab:blue", alpha=0.2, label="B_crit interval")
        for name, color in (("fastest", "tab:red"), ("cheapest", "tab:green")):
            rec = plan[name]
            ax.plot(
                [rec["batch_size"]],
                [rec[key]],
                "*",
                ms=16,
                color=color,
                label=f"{name} ({rec['devices']} device(s))",
                zorder=3 if name == goal else 2,
            )
        ax.axvline(plan["critical_batch"], color="0.5", ls=":", label="B_crit")
        _batch_axis(ax, sizes)
        _log_if_wide(ax, values)
        ax.set_ylabel(label)
        ax.legend(fontsize="small")
    t = plan["throughput"]
    fig.suptitle(f"{t['task']} on {t['device']} x{plan['devices']}: time and cost to target")
    return fig


def adaptive_figure(bench: dict) -> Figure:
    """Validation loss against steps and against samples for the fixed small, fixed large and
    adaptive arms (``benchmarks/adaptive_batch.py --json``'s dict), the target as a line, and the
    adaptive run's batch size against steps."""
    fig = Figure(figsize=(14.0, 4.0), layout="constrained")
    by_steps, by_samples, batches = fig.subplots(1, 3)
    target = bench["target"]["value"]
    colors = {"small": "tab:blue", "large": "tab:orange", "adaptive": "tab:green"}
    for a in bench["arms"]:
        label = f"{a['name']} (B={a['batch_size']}{'+' if a['name'] == 'adaptive' else ''})"
        for i, c in enumerate(a["curves"]):
            style = {"color": colors[a["name"]], "lw": 1.0, "alpha": 0.8}
            shown = slice(1, None)  # from the first step: step 0 has no place on a log axis
            for ax, x in ((by_steps, c["step"]), (by_samples, c["samples"])):
                ax.plot(x[shown], c["val_loss"][shown], label=None if i else label, **style)
            if a["name"] == "adaptive":
                batches.step(c["step"], c["batch_size"], where="post", **style)
    for ax, xlabel in ((by_steps, "steps"), (by_samples, "samples")):
        ax.axhline(target, color="0.4", ls=":", label=f"target val_loss {target:g}")
        ax.set_xscale("log")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation loss")
        ax.legend(fontsize="small")
    batches.set_yscale("log", base=2)
    batches.set_xlabel("steps")
    batches.set_ylabel("adaptive batch size")
    fig.suptitle(
        f"{bench['task']}: adaptive batch (rule {bench['rule']}) against fixed batches, "
        f"{bench['seeds']} seeds"
    )
    return fig
