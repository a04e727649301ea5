"""LR range test over plain arrays: smoothing in log-LR, divergence, suggestions, consensus.

The range test (Smith 2017, "Cyclical Learning Rates for Training Neural Networks") trains for a few
hundred steps while the learning rate grows exponentially and reads a good LR off the loss curve.
Suggestions follow the common readings: the steepest descent (Lightning's ``suggestion()``), the
valley (after fastai's ``valley``: the middle of the descent into the minimum, here from 90% to 10%
of the drop of the smoothed curve, so a slow drift does not count), the minimum divided by 10
(fastai's ``minimum``) and the divergence point (where the final climb into divergence begins). The
smoothing is centred (local linear, Gaussian weights in log10(lr)), so unlike an exponential moving
average it does not shift suggestions towards larger LRs; the divergence test, which must run
online to stop the ramp, uses a bias-corrected EMA like fastai and Lightning.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from batchlab.core.fit import PowerLawFit, fit_power_law
from batchlab.errors import FieldError

SUGGESTIONS = ("steepest", "valley", "min_over_10", "divergence")


def _log_lrs(lrs: Sequence[float] | np.ndarray) -> np.ndarray:
    """log10 of a strictly increasing, positive, finite LR array (errors name ``lrs``)."""
    arr = np.asarray(lrs, dtype=float)
    if arr.ndim != 1:
        raise FieldError("lrs", f"must be a 1-d sequence, got shape {arr.shape}")
    if not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise FieldError("lrs", "must be finite and > 0")
    if np.any(np.diff(arr) <= 0):
        raise FieldError("lrs", "must be strictly increasing (an LR range test ramps up)")
    return np.log10(arr)


def _matching(lrs: np.ndarray, losses: Sequence[float] | np.ndarray) -> np.ndarray:
    out = np.asarray(losses, dtype=float)
    if out.shape != lrs.shape:
        raise FieldError("losses", f"must have one value per lr ({lrs.shape[0]}), got {out.shape}")
    return out


def default_bandwidth(lrs: Sequence[float] | np.ndarray) -> float:
    """Smoothing width in decades: three times the mean spacing of the tested LRs, so the smoothing
    averages about ten points whatever the range (0 for a single LR).

    >>> default_bandwidth(np.logspace(-4, 0, 41))
    0.3
    """
    u = _log_lrs(lrs)
    return 0.0 if u.size < 2 else round(3.0 * float(u[-1] - u[0]) / (u.size - 1), 12)


def _local_linear(u: np.ndarray, y: np.ndarray, h: float) -> np.ndarray:
    """Gaussian-weighted local-linear regression of ``y`` on sorted ``u``, evaluated at ``u``."""
    out = np.empty_like(y)
    lo = np.searchsorted(u, u - 4 * h, side="left")
    hi = np.searchsorted(u, u + 4 * h, side="right")
    for i in range(u.size):
        d = u[lo[i] : hi[i]] - u[i]
        w = np.exp(-0.5 * (d / h) ** 2)
        yy = y[lo[i] : hi[i]]
        s0, s1, s2 = w.sum(), (w * d).sum(), (w * d * d).sum()
        t0, t1 = (w * yy).sum(), (w * d * yy).sum()
        det = s0 * s2 - s1 * s1
        out[i] = (s2 * t0 - s1 * t1) / det if det > 1e-12 * s0 * s2 else t0 / s0
    return out


def smooth_log_lr(
    lrs: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    *,
    bandwidth: float | None = None,
) -> np.ndarray:
    """Centred local-linear smoothing in log10(lr) with Gaussian weights ``bandwidth`` decades wide
    (default :func:`default_bandwidth`).

    When every loss is positive the smoothing runs on log(loss) (a range-test curve spans decades
    and its noise is roughly proportional to the loss), so a power law in the LR comes back exactly.

    >>> lrs = [1e-3, 1e-2, 1e-1, 1.0]
    >>> smooth_log_lr(lrs, [1e3, 1e2, 10.0, 1.0], bandwidth=0.5).round(9).tolist()
    [1000.0, 100.0, 10.0, 1.0]
    >>> smooth_log_lr(lrs, [3.0, 2.0, 1.0, 0.0], bandwidth=0.5).round(9).tolist()
    [3.0, 2.0, 1.0, 0.0]
    """
    u = _log_lrs(lrs)
    y = _matching(u, losses)
    if not np.all(np.isfinite(y)):
        raise FieldError("losses", "must be finite (smooth only the points before divergence)")
    h = default_bandwidth(lrs) if bandwidth is None else float(bandwidth)
    if h < 0 or not math.isfinite(h):
        raise FieldError("bandwidth", f"must be a finite number >= 0 (decades), got {bandwidth!r}")
    if h == 0 or y.size < 3:
        return y.copy()
    if np.all(y > 0):
        return np.exp(_local_linear(u, np.log(y), h))
    return _local_linear(u, y, h)


def ema(values: Sequence[float] | np.ndarray, beta: float) -> np.ndarray:
    """Bias-corrected exponential moving average (the first value is kept as is).

    >>> ema([1.0, 1.0, 4.0], beta=0.5).round(6).tolist()
    [1.0, 1.0, 2.714286]
    """
    if not 0.0 <= beta < 1.0:
        raise FieldError("beta", f"must be in [0, 1), got {beta!r}")
    vals = np.asarray(values, dtype=float)
    out = np.empty_like(vals)
    acc = 0.0
    for i, v in enumerate(vals):
        acc = beta * acc + (1 - beta) * v
        out[i] = acc / (1 - beta ** (i + 1))
    return out


def divergence_index(
    losses: Sequence[float] | np.ndarray, *, factor: float = 4.0, beta: float = 0.9
) -> int | None:
    """Index of the first step at which the loss diverged, or ``None``.

    Diverged: the loss is NaN/inf, or its EMA (``beta``) rose above the best EMA so far by more than
    ``factor - 1`` times that best's magnitude (for positive losses: EMA > factor x best, the
    fastai / Lightning rule).

    >>> divergence_index([1.0, 0.5, 0.4, 0.5, 30.0])
    4
    >>> divergence_index([1.0, 0.5, float("nan")]), divergence_index([1.0, 0.9]) is None
    (2, True)
    """
    if not factor > 1.0:
        raise FieldError("factor", f"must be > 1, got {factor!r}")
    vals = np.asarray(losses, dtype=float)
    bad = np.flatnonzero(~np.isfinite(vals))
    stop = int(bad[0]) if bad.size else vals.size
    smooth = ema(vals[:stop], beta)
    best = np.minimum.accumulate(smooth)
    over = np.flatnonzero(smooth - best > (factor - 1.0) * np.abs(best))
    if over.size:
        return int(over[0])
    return stop if bad.size else None


def divergence_point(
    losses: Sequence[float] | np.ndarray, *, factor: float = 4.0, beta: float = 0.9
) -> int | None:
    """Index where the final climb into divergence began, or ``None`` if the loss never diverged.

    Walking back from :func:`divergence_index`, the climb is the run of points that all lie above
    ``sqrt(factor)`` times the best EMA (for positive losses; twice the best for ``factor`` 4). The
    stop itself comes a few ramp steps later, once the unstable direction has grown enough to show.

    >>> losses = [1.0, 0.5, 0.4, 0.6, 1.5, 3.0, 30.0]
    >>> divergence_index(losses), divergence_point(losses)
    (6, 4)
    """
    vals = np.asarray(losses, dtype=float)
    stop = divergence_index(vals, factor=factor, beta=beta)
    if stop is None or stop == 0:
        return stop
    best = float(ema(vals[:stop], beta).min())
    level = best + (math.sqrt(factor) - 1.0) * abs(best)
    j = stop
    while j > 0 and vals[j - 1] > level:
        j -= 1
    return j


def smooth_before_divergence(
    lrs: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    *,
    bandwidth: float | None = None,
    factor: float = 4.0,
) -> tuple[np.ndarray, int | None]:
    """(smoothed curve, :func:`divergence_point`): :func:`smooth_log_lr` of the points before the
    climb into divergence, NaN from there on, so the blow-up does not leak into the smoothing.

    >>> s, cut = smooth_before_divergence([1e-3, 1e-2, 1e-1, 1.0], [2.0, 1.0, 0.5, 90.0])
    >>> cut, np.isnan(s).tolist()
    (3, [False, False, False, True])
    """
    u = _log_lrs(lrs)
    raw = _matching(u, losses)
    cut = divergence_point(raw, factor=factor)
    m = raw.size if cut is None else cut
    out = np.full(raw.size, np.nan)
    if m:
        out[:m] = smooth_log_lr(np.asarray(lrs, dtype=float)[:m], raw[:m], bandwidth=bandwidth)
    return out, cut


def _descent_middle(u: np.ndarray, s: np.ndarray, k0: int, i_min: int) -> float:
    """log10-LR midway through the descent into the minimum ``i_min``: from where the curve is still
    above 90% of its drop (counted from its highest point in ``[k0, i_min]``) to where it first
    falls below 10%."""
    i_top = k0 + int(np.argmax(s[k0 : i_min + 1]))
    drop = s[i_top] - s[i_min]
    above = np.flatnonzero(s[i_top : i_min + 1] >= s[i_min] + 0.9 * drop)
    a = i_top + int(above[-1])
    below = np.flatnonzero(s[a : i_min + 1] <= s[i_min] + 0.1 * drop)
    b = a + int(below[0])
    return 0.5 * float(u[a] + u[b])


def suggest_lrs(
    lrs: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    *,
    bandwidth: float | None = None,
    factor: float = 4.0,
    min_points: int = 10,
) -> dict[str, float | None]:
    """The four suggestions of :data:`SUGGESTIONS` from one range-test curve.

    The curve is cut at :func:`divergence_point` and smoothed with :func:`smooth_log_lr`; the
    steepest descent and the valley are looked for at least one bandwidth away from the first LR,
    where the smoothing sees points on one side only and is noisiest. Each suggestion is ``None``
    when it cannot be read: fewer than ``min_points`` points before divergence, a loss that never
    falls (``steepest``, ``valley``, ``min_over_10``), no divergence (``divergence``).

    >>> lrs = np.logspace(-4, 0, 41)
    >>> loss = 1 / (1 + np.exp(4 * (np.log10(lrs) + 2))) + np.where(lrs > 0.3, 100 * lrs, 0)
    >>> s = suggest_lrs(lrs, loss)
    >>> abs(math.log10(s["steepest"]) + 2) <= 0.1, s["divergence"] is not None
    (True, True)
    """
    if min_points < 3:
        raise FieldError("min_points", f"must be >= 3, got {min_points!r}")
    lr = np.asarray(lrs, dtype=float)
    u = np.log10(lr)
    smoothed, cut = smooth_before_divergence(lr, losses, bandwidth=bandwidth, factor=factor)
    out: dict[str, float | None] = dict.fromkeys(SUGGESTIONS)
    out["divergence"] = None if cut is None else float(lr[cut])
    m = lr.size if cut is None else cut
    if m < min_points:
        return out
    s = smoothed[:m]
    i_min = int(np.argmin(s))
    if i_min == 0:
        return out
    out["min_over_10"] = float(lr[i_min] / 10.0)
    h = default_bandwidth(lr[:m]) if bandwidth is None else bandwidth
    k0 = min(int(np.searchsorted(u, u[0] + h)), i_min - 1)
    slope = np.gradient(s[: i_min + 1], u[: i_min + 1])
    i_steep = k0 + int(np.argmin(slope[k0:]))
    if slope[i_steep] < 0:
        out["steepest"] = float(lr[i_steep])
    out["valley"] = float(10.0 ** _descent_middle(u, s, k0, i_min))
    return out


@dataclass(frozen=True)
class Consensus:
    """Geometric mean of several suggested LRs (e.g. over seeds) and how far they spread.

    ``spread`` is the geometric standard deviation (a factor >= 1; ``None`` for fewer than two
    values); ``low`` / ``high`` the extremes; ``n`` the number of values that were not ``None``.
    """

    lr: float | None
    spread: float | None
    low: float | None
    high: float | None
    n: int


def consensus(lrs: Sequence[float | None]) -> Consensus:
    """Combine suggestions over seeds in log space, ignoring ``None`` (unreadable curves).

    >>> c = consensus([0.01, 0.04, None])
    >>> round(c.lr, 6), round(c.spread, 3), c.n
    (0.02, 2.665, 2)
    """
    vals = np.asarray([v for v in lrs if v is not None], dtype=float)
    if vals.size == 0:
        return Consensus(None, None, None, None, 0)
    if np.any(~np.isfinite(vals)) or np.any(vals <= 0):
        raise FieldError("lrs", "must be finite and > 0 (or None)")
    logs = np.log(vals)
    spread = float(np.exp(logs.std(ddof=1))) if vals.size > 1 else None
    return Consensus(
        float(np.exp(logs.mean())), spread, float(vals.min()), float(vals.max()), int(vals.size)
    )


def fit_lr_exponent(
    batch_sizes: Sequence[float], lrs: Sequence[float | None]
) -> PowerLawFit | None:
    """Fit how the suggested LR scales with batch size (1 = linear rule, 0.5 = square root) with
    :func:`batchlab.core.fit.fit_power_law`; pairs whose LR is ``None`` are skipped, and the result
    is ``None`` when fewer than two distinct batch sizes remain.

    >>> fit = fit_lr_exponent([64, 256, 1024, 4096], [0.01, 0.02, 0.04, None])
    >>> round(fit.exponent, 6), round(fit.prefactor * 64**0.5, 6)
    (0.5, 0.01)
    """
    if len(batch_sizes) != len(lrs):
        raise FieldError(
            "lrs", f"must have one value per batch size ({len(batch_sizes)}), got {len(lrs)}"
        )
    pairs = [(b, v) for b, v in zip(batch_sizes, lrs, strict=True) if v is not None]
    if len({b for b, _ in pairs}) < 2:
        return None
    return fit_power_law([b for b, _ in pairs], [v for _, v in pairs])
