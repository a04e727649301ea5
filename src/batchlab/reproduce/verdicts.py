"""Pre-registered verdict rules: numbers in, ``supported | not_supported | inconclusive`` out.

Each rule was written before any study was run and is printed verbatim in the report (``RULES``), so a
verdict cannot drift towards whatever the data happened to show. The rules take plain arrays (one row
per seed) so they are tested on synthetic results for every outcome.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np

from batchlab.core.fit import mean_se

Verdict = Literal["supported", "not_supported", "inconclusive"]


@dataclass(frozen=True)
class Outcome:
    """A verdict with the numbers behind it and one sentence saying why."""

    verdict: Verdict
    reason: str
    evidence: dict[str, Any] = field(default_factory=dict)


RULES: dict[int, str] = {
    1: "Supported when the final training loss increases with batch size (64 < 256 < 1024) in every seed "
    "and the mean difference between 1024 and 64 exceeds twice its standard error. Not supported when "
    "that mean difference is <= 0. Inconclusive otherwise.",
    2: "With lr scaled linearly from batch 64 (warmup over the first fifth of the epochs), the "
    "distance of a batch size's training-loss curve from batch 64's is the area between the two "
    "curves against epochs, from the end of the warmup to the end of the budget, over the area under "
    "batch 64's curve (curves linear between evaluations; seed s against seed s). Its interval over "
    "seeds is the mean +- 2 standard errors. A batch size matches when the interval lies at or below "
    "0.10, does not match when it lies above 0.10 or a run diverged, and is undecided when the "
    "interval straddles 0.10. Supported when 256 and 1024 both match; not supported when either does "
    "not match; inconclusive otherwise. The break point is the smallest batch size that does not "
    "match.",
    3: "Fit lr* ~ B^alpha to the measured best learning rate per batch size (bootstrap over seeds, 95% "
    "interval). The quoted table 32/128/512 -> 0.001/0.01/0.1 implies alpha = log(100)/log(16) = 1.66. "
    "Supported when 1.66 lies inside the interval; not supported when it lies outside and the interval "
    "is narrower than 1.0; inconclusive when the interval is wider than 1.0. Reported beside the "
    "verdict (not part of it): which scaling rule the interval supports, linear (alpha = 1.0) or "
    "square root (0.5): the one inside the interval when the other is outside, else both or neither.",
    4: "At equal epochs, compare the largest and smallest batch: supported when the generalization gap "
    "(val - train loss) AND the top Hessian eigenvalue are both larger for the large batch by more "
    "than twice their standard errors; not supported when the gap difference is <= 0; inconclusive "
    "otherwise.",
    5: "Supported when the large batch trained with regime adaptation (same number of updates as the "
    "small batch, sqrt-scaled lr, ghost batch norm) reaches a validation metric no worse than the small "
    "batch minus 2 standard errors (or 0.5 points) AND better than the large batch at equal epochs by "
    "more than 2 standard errors. Not supported when it is no better than the large batch at equal "
    "epochs. Inconclusive otherwise.",
    6: "Supported when increasing the batch size (instead of decaying the lr) ends within 1 percentage "
    "point (or 2 standard errors, the larger) of the decaying-lr run's validation metric, no seed "
    "differing by more than 2 points, while using fewer optimizer steps. Not supported when it is worse "
    "by more than that margin or uses no fewer steps. Inconclusive when seeds disagree.",
    7: "Fit S = S_min(1 + B_crit/B) to the steps-to-target. Supported when steps-to-target fall as the "
    "batch grows (smallest vs largest batch reaching the target), samples-to-target at the largest "
    "batch exceed those at the smallest, and the fitted B_crit lies within a factor of 10 of the "
    "measured gradient noise scale. Not supported when steps do not fall or samples do not rise. "
    "Inconclusive when too few batch sizes reach the target (< 3) or B_crit is off by more than 10x.",
    8: "For each batch size the divergence threshold is the smallest learning rate on the grid whose "
    "run diverged. Supported when the threshold never decreases with batch size in any seed and is "
    "higher at the largest batch than at the smallest in every seed. Not supported when it is lower or "
    "equal at the largest batch in every seed. Inconclusive otherwise (also when nothing diverged).",
}


SUPERSEDED: dict[int, str] = {
    2: "With lr scaled linearly from batch 64 (plus warmup), a batch size 'matches' when its final "
    "training loss is within 10% (relative) of batch 64's, mean over seeds. Supported when 256 and 1024 "
    "both match; not supported when either does not. The break point is the smallest batch size that "
    "does not match.",
}
"""Rules replaced by the one in ``RULES`` (issue 15: judged on one number, no interval), printed in
the report beside it; their numbers stay in the evidence."""


def _monotone_up(row: Sequence[float], strict: bool = True) -> bool:
    values = np.asarray(row, dtype=float)
    with np.errstate(invalid="ignore"):  # inf - inf: equal, not a decrease
        diffs = np.where(values[1:] == values[:-1], 0.0, np.diff(values))
    return bool(np.all(diffs > 0) if strict else np.all(diffs >= 0))


def loss_grows_with_batch(losses: np.ndarray, batch_sizes: Sequence[int]) -> Outcome:
    """Claim 1: ``losses[seed, i]`` final loss at ``batch_sizes[i]`` (ascending), fixed lr and epochs."""
    losses = np.asarray(losses, dtype=float)
    monotone = all(_monotone_up(row) for row in losses)
    diff_mean, diff_se = mean_se(losses[:, -1] - losses[:, 0])
    ev = {
        "batch_sizes": list(batch_sizes),
        "mean_loss": [mean_se(losses[:, i])[0] for i in range(losses.shape[1])],
        "diff_largest_smallest": diff_mean,
        "diff_se": diff_se,
        "monotone_in_every_seed": monotone,
    }
    if monotone and diff_mean > 2 * diff_se and diff_mean > 0:
        return Outcome("supported", "loss rises with batch size in every seed", ev)
    if not diff_mean > 0:
        return Outcome("not_supported", "the largest batch does not end at a higher loss", ev)
    return Outcome("inconclusive", "loss rises on average but not in every seed or not by 2 SE", ev)


def linear_scaling_match(
    losses: np.ndarray, batch_sizes: Sequence[int], tolerance: float = 0.10
) -> Outcome:
    """Claim 2: ``losses[seed, i]`` final loss with lr scaled linearly; index 0 is the base batch."""
    losses = np.asarray(losses, dtype=float)
    means = np.array([mean_se(losses[:, i])[0] for i in range(losses.shape[1])])
    rel = np.abs(means - means[0]) / abs(means[0])
    matches = [bool(np.isfinite(r) and r <= tolerance) for r in rel]
    breaks = [b for b, ok in zip(batch_sizes, matches, strict=True) if not ok]
    ev = {
        "batch_sizes": list(batch_sizes),
        "mean_loss": means.tolist(),
        "relative_difference": rel.tolist(),
        "tolerance": tolerance,
        "break_batch_size": breaks[0] if breaks else None,
    }
    required = [i for i, b in enumerate(batch_sizes) if b in (256, 1024)]
    if not required:
        return Outcome("inconclusive", "the study has neither batch 256 nor 1024", ev)
    if all(matches[i] for i in required):
        return Outcome("supported", "256 and 1024 match batch 64 within the tolerance", ev)
    return Outcome("not_supported", f"the match breaks at batch {breaks[0]}", ev)


def curve_distance(
    base_epochs: Sequence[float],
    base_loss: Sequence[float],
    epochs: Sequence[float],
    loss: Sequence[float],
    start: float,
    end: float,
) -> float:
    """Claim 2's distance: the area between two loss curves over epochs ``[start, end]`` divided by
    the area under the base curve there; inf when the curve stops before ``end`` (it diverged).

    Curves are linear between their points; where the two cross inside a segment the area is split
    at the crossing, so piecewise-linear curves give the exact area.
    """
    curves = []
    for x, y in ((base_epochs, base_loss), (epochs, loss)):
        x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
        keep = np.isfinite(x) & np.isfinite(y)
        if not keep.any() or x[keep].max() < end * (1 - 1e-9):
            return math.inf
        curves.append((x[keep], y[keep]))
    (xb, yb), (xc, yc) = curves
    grid = np.unique(np.concatenate([[start, end], xb, xc]))
    grid = grid[(grid >= start) & (grid <= end)]
    base, diff = np.interp(grid, xb, yb), np.interp(grid, xc, yc) - np.interp(grid, xb, yb)
    h, d0, d1 = np.diff(grid), diff[:-1], diff[1:]
    same_sign = d0 * d1 >= 0
    with np.errstate(invalid="ignore", divide="ignore"):
        crossing = (d0**2 + d1**2) / (2 * (np.abs(d0) + np.abs(d1)))
    between = np.where(same_sign, (np.abs(d0) + np.abs(d1)) / 2, crossing) * h
    under = float(np.sum((base[:-1] + base[1:]) / 2 * h))
    return float(np.sum(between)) / under if under > 0 else math.nan


def curves_match(
    distances: np.ndarray, batch_sizes: Sequence[int], tolerance: float = 0.10
) -> Outcome:
    """Claim 2: ``distances[seed, i]`` = ``curve_distance`` of ``batch_sizes[i]`` from the base
    batch ``batch_sizes[0]`` (inf: diverged, NaN: no run); each batch's interval against ``tolerance``."""
    d = np.asarray(distances, dtype=float)
    status, mean, low, high = ["base"], [0.0], [0.0], [0.0]
    for i in range(1, d.shape[1]):
        column = d[:, i]
        m, se = mean_se(column)
        lo, hi = (math.inf, math.inf) if np.isposinf(column).any() else (m - 2 * se, m + 2 * se)
        if not math.isfinite(lo):
            state = "diverged" if np.isposinf(column).any() else "no runs"
        else:
            state = "match" if hi <= tolerance else "no match" if lo > tolerance else "undecided"
        status.append(state)
        mean.append(math.inf if state == "diverged" else m)
        low.append(lo)
        high.append(hi)
    broken = [
        b for b, st in zip(batch_sizes, status, strict=True) if st in ("no match", "diverged")
    ]
    ev = {
        "batch_sizes": list(batch_sizes),
        "curve_distance": mean,
        "curve_distance_low": low,
        "curve_distance_high": high,
        "curve_distance_per_seed": d.tolist(),
        "match": status,
        "tolerance": tolerance,
        "break_batch_size": broken[0] if broken else None,
    }
    required = [i for i, b in enumerate(batch_sizes) if b in (256, 1024)]
    if not required:
        return Outcome("inconclusive", "the study has neither batch 256 nor 1024", ev)
    fails = [batch_sizes[i] for i in required if status[i] in ("no match", "diverged")]
    if fails:
        return Outcome(
            "not_supported",
            f"the loss curve of batch {fails[0]} lies more than {tolerance:.0%} from batch "
            f"{batch_sizes[0]}'s",
            ev,
        )
    if all(status[i] == "match" for i in required):
        return Outcome(
            "supported", f"the curves of 256 and 1024 lie within {tolerance:.0%} of batch 64's", ev
        )
    open_ = [batch_sizes[i] for i in required if status[i] != "match"]
    return Outcome(
        "inconclusive",
        f"the interval of batch {open_[0]}'s curve distance straddles the {tolerance:.0%} tolerance",
        ev,
    )


SCALING_EXPONENTS = {"linear": 1.0, "sqrt": 0.5}
"""The exponents of the two classic scaling rules (Goyal et al. 2017; Hoffer et al. 2017)."""


def supported_rule(low: float, high: float) -> str:
    """Which of ``SCALING_EXPONENTS`` the exponent interval ``[low, high]`` supports: the one inside
    it when the others are outside, else ``both`` or ``neither``.

    >>> supported_rule(0.8, 1.3), supported_rule(0.2, 1.2), supported_rule(1.2, 1.6)
    ('linear', 'both', 'neither')
    """
    inside = [name for name, ref in SCALING_EXPONENTS.items() if low <= ref <= high]
    if len(inside) == 1:
        return inside[0]
    return "both" if inside else "neither"


def table_exponent(alpha: float, low: float, high: float, claimed: float) -> Outcome:
    """Claim 3: measured exponent interval vs the exponent the quoted table implies, with the
    scaling rule the interval supports beside the verdict."""
    ev = {"alpha": alpha, "low": low, "high": high, "claimed_alpha": claimed}
    for name, ref in SCALING_EXPONENTS.items():
        ev[f"{name}_inside_interval"] = bool(low <= ref <= high)
    if not all(math.isfinite(v) for v in (alpha, low, high)):
        ev["supported_rule"] = None
        return Outcome("inconclusive", "the exponent could not be fitted", ev)
    rule = ev["supported_rule"] = supported_rule(low, high)
    names = {"both": "both linear and sqrt", "neither": "neither linear nor sqrt"}
    also = f"; the interval [{low:.2f}, {high:.2f}] supports {names.get(rule, f'the {rule} rule')}"
    if high - low > 1.0:
        return Outcome("inconclusive", "the interval of the exponent is wider than 1.0" + also, ev)
    if low <= claimed <= high:
        return Outcome(
            "supported", "the table's exponent lies inside the measured interval" + also, ev
        )
    return Outcome(
        "not_supported", "the table's exponent lies outside the measured interval" + also, ev
    )


def _difference(small: Sequence[float], large: Sequence[float]) -> tuple[float, float]:
    """Mean and SE of large - small over paired seeds (unpaired SE when lengths differ)."""
    s, lg = np.asarray(small, dtype=float), np.asarray(large, dtype=float)
    if s.size == lg.size:
        return mean_se(lg - s)
    (ms, ss), (ml, sl) = mean_se(s), mean_se(lg)
    return ml - ms, math.hypot(ss, sl)


def large_batch_sharper(
    gap_small: Sequence[float],
    gap_large: Sequence[float],
    sharp_small: Sequence[float],
    sharp_large: Sequence[float],
) -> Outcome:
    """Claim 4: generalization gap and sharpness, small vs large batch at equal epochs."""
    gap_d, gap_se = _difference(gap_small, gap_large)
    sh_d, sh_se = _difference(sharp_small, sharp_large)
    ev = {
        "gap_small": mean_se(gap_small)[0],
        "gap_large": mean_se(gap_large)[0],
        "gap_difference": gap_d,
        "gap_difference_se": gap_se,
        "sharpness_small": mean_se(sharp_small)[0],
        "sharpness_large": mean_se(sharp_large)[0],
        "sharpness_difference": sh_d,
        "sharpness_difference_se": sh_se,
    }
    if gap_d > 2 * gap_se and gap_d > 0 and sh_d > 2 * sh_se and sh_d > 0:
        return Outcome("supported", "the large batch has a larger gap and a sharper minimum", ev)
    if not gap_d > 0:
        return Outcome("not_supported", "the large batch does not have a larger gap", ev)
    return Outcome("inconclusive", "the gap or the sharpness difference is within 2 SE", ev)


def longer_training_closes_gap(
    small: Sequence[float], large_equal_epochs: Sequence[float], large_adapted: Sequence[float]
) -> Outcome:
    """Claim 5: validation metric (higher is better) of the three arms, one value per seed."""
    (m_s, se_s), (m_l, _), (m_a, _) = (
        mean_se(small),
        mean_se(large_equal_epochs),
        mean_se(large_adapted),
    )
    gain, gain_se = _difference(large_equal_epochs, large_adapted)
    margin = max(2 * se_s, 0.005)
    ev = {
        "small_batch": m_s,
        "large_batch_equal_epochs": m_l,
        "large_batch_adapted": m_a,
        "gain_from_adaptation": gain,
        "gain_se": gain_se,
        "margin_to_small": margin,
    }
    if not gain > 0:
        return Outcome("not_supported", "regime adaptation does not beat equal-epoch training", ev)
    if m_a >= m_s - margin and gain > 2 * gain_se:
        return Outcome("supported", "the adapted large batch matches the small batch", ev)
    return Outcome(
        "inconclusive", "the adapted large batch improves but does not close the gap", ev
    )


def increase_batch_matches(
    decay_metric: Sequence[float],
    increase_metric: Sequence[float],
    decay_steps: float,
    increase_steps: float,
) -> Outcome:
    """Claim 6: final validation metric (higher is better) per seed, and steps of each arm."""
    diff, se = _difference(decay_metric, increase_metric)
    margin = max(0.01, 2 * se)
    per_seed_close = [
        abs(i - d) <= 0.02 for d, i in zip(decay_metric, increase_metric, strict=False)
    ]
    ev = {
        "decay_lr_metric": mean_se(decay_metric)[0],
        "increase_batch_metric": mean_se(increase_metric)[0],
        "difference": diff,
        "difference_se": se,
        "margin": margin,
        "decay_lr_steps": decay_steps,
        "increase_batch_steps": increase_steps,
        "steps_saved_fraction": 1 - increase_steps / decay_steps if decay_steps else math.nan,
    }
    if increase_steps >= decay_steps or diff < -margin:
        return Outcome("not_supported", "worse accuracy or no fewer updates", ev)
    if abs(diff) <= margin and all(per_seed_close):
        return Outcome("supported", "same accuracy with fewer updates", ev)
    return Outcome("inconclusive", "the seeds disagree on whether accuracy matches", ev)


def critical_batch(
    batch_sizes: Sequence[int],
    steps: Sequence[float],
    critical: float,
    noise_scale: float,
) -> Outcome:
    """Claim 7: steps-to-target per batch size (NaN = never reached), fitted B_crit, noise scale."""
    b = np.asarray(batch_sizes, dtype=float)
    s = np.asarray(steps, dtype=float)
    ok = np.isfinite(s)
    ratio = critical / noise_scale if noise_scale > 0 and math.isfinite(critical) else math.nan
    ev: dict[str, Any] = {
        "batch_sizes": [int(x) for x in b],
        "steps_to_target": s.tolist(),
        "critical_batch": critical,
        "noise_scale": noise_scale,
        "critical_over_noise": ratio,
    }
    if ok.sum() < 3:
        return Outcome("inconclusive", "fewer than 3 batch sizes reached the target", ev)
    bs, ss = b[ok], s[ok]
    samples = bs * ss
    ev["samples_to_target"] = samples.tolist()
    steps_fall = ss[-1] < ss[0]
    samples_rise = samples[-1] > samples[0]
    if not (steps_fall and samples_rise):
        return Outcome("not_supported", "steps do not fall or samples do not rise with batch", ev)
    if math.isfinite(ratio) and 0.1 <= ratio <= 10:
        return Outcome("supported", "fewer steps, more samples, B_crit near the noise scale", ev)
    return Outcome("inconclusive", "the fitted B_crit is more than 10x from the noise scale", ev)


def threshold_grows(thresholds: np.ndarray, batch_sizes: Sequence[int]) -> Outcome:
    """Claim 8: ``thresholds[seed, i]`` smallest diverging lr at ``batch_sizes[i]`` (inf = none)."""
    t = np.asarray(thresholds, dtype=float)
    ev = {
        "batch_sizes": list(batch_sizes),
        "threshold_per_seed": [[None if not math.isfinite(v) else v for v in row] for row in t],
    }
    finite = np.isfinite(t)
    if not finite.any():
        return Outcome("inconclusive", "no learning rate on the grid diverged", ev)
    never_down = all(_monotone_up(row, strict=False) for row in t)
    up_every_seed = bool(np.all(t[:, -1] > t[:, 0]))
    if never_down and up_every_seed:
        return Outcome("supported", "the divergence threshold grows with batch size", ev)
    if bool(np.all(t[:, -1] <= t[:, 0])):
        return Outcome("not_supported", "the threshold is not higher at the largest batch", ev)
    return Outcome("inconclusive", "the seeds disagree on the threshold's trend", ev)
