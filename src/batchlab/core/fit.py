"""Steps-to-target, the critical-batch fit S = S_min(1 + B_crit/B), power laws and seed bootstraps.

McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training") show that the optimizer steps
S and training examples E = B*S needed to reach a fixed loss trade off as
``(S/S_min - 1)(E/E_min - 1) = 1``, i.e. ``S = S_min (1 + B_crit/B)`` and ``E = E_min (1 + B/B_crit)``
with ``E_min = S_min * B_crit``. Steps-to-target is measured as in Shallue et al. 2019 ("Measuring the
Effects of Data Parallelism on Neural Network Training"): the first evaluated step at which the
target is reached. Best learning rates are interpolated with a parabola in log-lr, and the exponent
alpha of lr* ~ B^alpha is a least-squares line in log-log space (Goyal et al. 2017 predict 1 for
SGD, Hoffer et al. 2017 and Malladi et al. 2022 predict 0.5 for SGD-with-noise / Adam).

Every fit is done in log space: steps and learning rates vary over orders of magnitude and their
noise is multiplicative. Bootstraps take an explicit ``seed`` so the same data gives the same
interval.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import numpy as np

from batchlab.errors import FieldError

Region = Literal["perfect_scaling", "diminishing_returns", "maximal_parallelism"]

_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
_SEARCH_DECADES = 4.0  # B_crit is searched from min(B)/1e4 to max(B)*1e4
_GRID_POINTS = 241


def steps_to_target(
    steps: Sequence[float], values: Sequence[float], target: float, *, higher_is_better: bool
) -> float:
    """First evaluated step whose value reaches ``target``; ``inf`` when none does (NaN never does).

    >>> steps_to_target([10, 20, 30], [0.5, 0.8, 0.9], 0.8, higher_is_better=True)
    20.0
    >>> steps_to_target([10, 20], [1.0, 0.7], 0.5, higher_is_better=False)
    inf
    """
    s = np.asarray(steps, dtype=float)
    v = np.asarray(values, dtype=float)
    if s.shape != v.shape or s.ndim != 1:
        raise FieldError("steps", f"must be 1-D and match values, got {s.shape} and {v.shape}")
    with np.errstate(invalid="ignore"):
        hit = v >= target if higher_is_better else v <= target
    idx = np.flatnonzero(hit & np.isfinite(v))
    return float(s[idx[0]]) if idx.size else math.inf


def mean_se(values: Sequence[float]) -> tuple[float, float]:
    """Mean and standard error of the finite values (SE 0 for one value, NaN for none).

    >>> mean_se([1.0, 2.0, 3.0, float("nan")])
    (2.0, 0.5773502691896258)
    """
    arr = np.asarray(values, dtype=float)
    arr = arr[np.isfinite(arr)]
    if arr.size == 0:
        return math.nan, math.nan
    se = float(arr.std(ddof=1) / math.sqrt(arr.size)) if arr.size > 1 else 0.0
    return float(arr.mean()), se


def percentile_interval(samples: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """Central ``level`` interval of the finite samples; (NaN, NaN) when there are none.

    >>> percentile_interval(range(101), 0.5)
    (25.0, 75.0)
    """
    arr = np.asarray(samples, dtype=float)
    arr = arr[np.isfinite(arr)]
    if not 0 < level < 1:
        raise FieldError("level", f"must be in (0, 1), got {level!r}")
    if arr.size == 0:
        return math.nan, math.nan
    tail = 100 * (1 - level) / 2
    low, high = np.percentile(arr, [tail, 100 - tail])
    return float(low), float(high)


def bootstrap_draws(
    data: np.ndarray,
    statistic: Callable[[np.ndarray], float | np.ndarray],
    *,
    n_boot: int = 1000,
    seed: int = 0,
) -> np.ndarray:
    """``statistic`` of ``n_boot`` resamples of the rows (seeds) of ``data``, with replacement.

    Rows are the unit of resampling, so everything measured with one seed moves together. A
    statistic may return several numbers (one column each). Fewer than 2 rows gives no draws.

    >>> bootstrap_draws(np.array([[1.0], [3.0]]), lambda d: float(d.mean()), n_boot=4).shape
    (4,)
    """
    arr = np.asarray(data, dtype=float)
    if n_boot < 1:
        raise FieldError("n_boot", f"must be >= 1, got {n_boot!r}")
    if arr.ndim == 0 or arr.shape[0] < 2:
        return np.empty(0)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, arr.shape[0], size=(n_boot, arr.shape[0]))
    return np.array([statistic(arr[rows]) for rows in picks], dtype=float)


def bootstrap_rows(
    data: np.ndarray,
    statistic: Callable[[np.ndarray], float],
    *,
    n_boot: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of ``statistic`` over seed resamples (see ``bootstrap_draws``).

    Non-finite draws (a resample where a fit fails) are dropped; fewer than 2 rows gives NaNs.

    >>> data = np.array([[1.0], [2.0], [3.0], [4.0]])
    >>> low, high = bootstrap_rows(data, lambda d: float(d.mean()), n_boot=500, seed=1)
    >>> 1.0 <= low < 2.5 < high <= 4.0
    True
    """
    return percentile_interval(bootstrap_draws(data, statistic, n_boot=n_boot, seed=seed), level)


class Vertex(NamedTuple):
    """Interpolated minimum of a curve sampled on a grid."""

    x: float
    y: float
    index: int
    interpolated: bool
    at_edge: bool


def parabolic_argmin(x: Sequence[float], y: Sequence[float]) -> Vertex:
    """Minimum of ``y(x)`` refined by the parabola through the best grid point and its neighbours.

    ``x`` must be increasing; non-finite ``y`` (diverged runs) never wins. When the best point is at
    the edge of the grid or a neighbour is missing, the grid point itself is returned unrefined. For
    learning rates pass ``x = log(lr)``.

    >>> v = parabolic_argmin([0.0, 1.0, 2.0, 3.0], [4.0, 1.0, 0.0, 1.0])
    >>> round(v.x, 6), round(v.y, 6), v.interpolated
    (2.0, 0.0, True)
    """
    xs = np.asarray(x, dtype=float)
    ys = np.asarray(y, dtype=float)
    if xs.shape != ys.shape or xs.ndim != 1 or xs.size == 0:
        raise FieldError("x", f"must be 1-D, non-empty and match y, got {xs.shape} and {ys.shape}")
    if np.any(np.diff(xs) <= 0):
        raise FieldError("x", "must be strictly increasing")
    finite = np.isfinite(ys)
    if not finite.any():
        raise FieldError("y", "no finite value to minimise")
    i = int(np.argmin(np.where(finite, ys, np.inf)))
    at_edge = i in (0, xs.size - 1)
    if at_edge or not (finite[i - 1] and finite[i + 1]):
        return Vertex(float(xs[i]), float(ys[i]), i, False, at_edge)
    (x0, x1, x2), (y0, y1, y2) = xs[i - 1 : i + 2], ys[i - 1 : i + 2]
    # Newton form p(x) = y0 + f[x0,x1](x - x0) + a (x - x0)(x - x1), a = f[x0,x1,x2].
    a = ((y2 - y1) / (x2 - x1) - (y1 - y0) / (x1 - x0)) / (x2 - x0)
    if a <= 0:  # flat: the three points are equal, nothing to refine
        return Vertex(float(x1), float(y1), i, False, False)
    b = (y1 - y0) / (x1 - x0) + a * (x1 - x0)  # p'(x1)
    xv = x1 - b / (2 * a)
    yv = y1 - b * b / (4 * a)
    return Vertex(float(xv), float(yv), i, True, False)


class PowerLawFit(NamedTuple):
    """``y = prefactor * x**exponent`` fitted by least squares on log y against log x."""

    exponent: float
    prefactor: float
    residuals: tuple[float, ...]
    r_squared: float

    def predict(self, x: float | np.ndarray) -> float | np.ndarray:
        """Fitted y at ``x``."""
        return self.prefactor * np.power(x, self.exponent)


def _positive_pairs(x: Sequence[float], y: Sequence[float], xname: str, yname: str):
    xs = np.asarray(x, dtype=float)
    ys = np.asarray(y, dtype=float)
    if xs.shape != ys.shape or xs.ndim != 1:
        raise FieldError(xname, f"must be 1-D and match {yname}, got {xs.shape} and {ys.shape}")
    for name, arr in ((xname, xs), (yname, ys)):
        if not np.all(np.isfinite(arr) & (arr > 0)):
            raise FieldError(name, f"every value must be finite and > 0, got {arr.tolist()}")
    if np.unique(xs).size < 2:
        raise FieldError(xname, f"need at least 2 distinct values, got {xs.tolist()}")
    return xs, ys


def fit_power_law(x: Sequence[float], y: Sequence[float]) -> PowerLawFit:
    """Fit ``y ~ x**alpha`` in log-log space (e.g. best lr against batch size).

    >>> fit = fit_power_law([32, 128, 512], [0.01, 0.04, 0.16])
    >>> round(fit.exponent, 6), round(fit.prefactor * 32, 6)
    (1.0, 0.01)
    """
    xs, ys = _positive_pairs(x, y, "x", "y")
    lx, ly = np.log(xs), np.log(ys)
    slope, intercept = np.polyfit(lx, ly, 1)
    resid = ly - (intercept + slope * lx)
    total = float(np.sum((ly - ly.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / total if total > 0 else 1.0
    return PowerLawFit(float(slope), float(math.exp(intercept)), tuple(resid.tolist()), r2)


@dataclass(frozen=True)
class StepsFit:
    """S = S_min (1 + B_crit/B) fitted to steps-to-target; E = E_min (1 + B/B_crit) follows.

    ``residuals`` are log(measured) - log(fitted) per batch size. Intervals come from a residual
    bootstrap in log space (NaN with only two batch sizes: the fit is then exact).
    """

    s_min: float
    critical_batch: float
    batch_sizes: tuple[float, ...]
    steps: tuple[float, ...]
    residuals: tuple[float, ...]
    s_min_interval: tuple[float, float]
    critical_batch_interval: tuple[float, float]
    e_min_interval: tuple[float, float]
    level: float

    @property
    def e_min(self) -> float:
        """Fewest training examples to reach the target (reached as B -> 0)."""
        return self.s_min * self.critical_batch

    @property
    def within_data(self) -> bool:
        """Whether B_crit lies inside the measured batch sizes (otherwise it is an extrapolation)."""
        return min(self.batch_sizes) <= self.critical_batch <= max(self.batch_sizes)

    def predict_steps(self, batch_size: float | np.ndarray) -> float | np.ndarray:
        """Fitted steps-to-target at ``batch_size``."""
        return self.s_min * (1.0 + self.critical_batch / np.asarray(batch_size, dtype=float))

    def predict_samples(self, batch_size: float | np.ndarray) -> float | np.ndarray:
        """Fitted samples-to-target at ``batch_size``."""
        return self.e_min * (1.0 + np.asarray(batch_size, dtype=float) / self.critical_batch)

    def region_bounds(self, efficiency: float = 0.8) -> tuple[float, float]:
        """Batch sizes where perfect scaling ends and maximal parallelism begins.

        Below the first bound the sample efficiency E_min/E is at least ``efficiency`` (doubling B
        almost halves the steps); above the second the step efficiency S_min/S is (more B barely
        helps). At 0.8 the bounds are B_crit/4 and 4 B_crit.
        """
        if not 0.5 < efficiency < 1:
            raise FieldError("efficiency", f"must be in (0.5, 1), got {efficiency!r}")
        ratio = efficiency / (1 - efficiency)
        return self.critical_batch / ratio, self.critical_batch * ratio

    def region(self, batch_size: float, efficiency: float = 0.8) -> Region:
        """Which scaling regime ``batch_size`` is in (see ``region_bounds``)."""
        low, high = self.region_bounds(efficiency)
        if batch_size <= low:
            return "perfect_scaling"
        if batch_size >= high:
            return "maximal_parallelism"
        return "diminishing_returns"


def _profile_ssr(u: np.ndarray, log_b: np.ndarray, log_s: np.ndarray) -> np.ndarray:
    """Sum of squared log residuals at log B_crit = u, with log S_min at its closed-form optimum."""
    r = log_s - np.logaddexp(0.0, np.asarray(u, dtype=float)[..., None] - log_b)
    return np.sum((r - r.mean(axis=-1, keepdims=True)) ** 2, axis=-1)


def _fit_log(log_b: np.ndarray, log_s: np.ndarray) -> tuple[float, float]:
    """(log S_min, log B_crit) minimising the log-space squared error: grid, then golden section."""
    lo = log_b.min() - _SEARCH_DECADES * math.log(10)
    hi = log_b.max() + _SEARCH_DECADES * math.log(10)
    grid = np.linspace(lo, hi, _GRID_POINTS)
    k = int(np.argmin(_profile_ssr(grid, log_b, log_s)))
    a, b = grid[max(k - 1, 0)], grid[min(k + 1, grid.size - 1)]
    c, d = b - _GOLDEN * (b - a), a + _GOLDEN * (b - a)
    fc, fd = _profile_ssr(np.array([c, d]), log_b, log_s)
    while b - a > 1e-11:
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - _GOLDEN * (b - a)
            fc = float(_profile_ssr(np.array(c), log_b, log_s))
        else:
            a, c, fc = c, d, fd
            d = a + _GOLDEN * (b - a)
            fd = float(_profile_ssr(np.array(d), log_b, log_s))
    u = (a + b) / 2
    log_s_min = float(np.mean(log_s - np.logaddexp(0.0, u - log_b)))
    return log_s_min, float(u)


def fit_steps_vs_batch(
    batch_sizes: Sequence[float],
    steps: Sequence[float],
    *,
    level: float = 0.95,
    n_boot: int = 200,
    seed: int = 0,
) -> StepsFit:
    """Fit S = S_min (1 + B_crit/B) to steps-to-target per batch size (McCandlish et al. 2018).

    Least squares on log S: for a fixed B_crit the best S_min is closed-form (a geometric mean), so
    only log B_crit is searched, from min(B)/1e4 to max(B)*1e4. ``n_boot=0`` skips the intervals.

    >>> b = [16, 64, 256, 1024]
    >>> fit = fit_steps_vs_batch(b, [1000 * (1 + 128 / x) for x in b])
    >>> round(fit.s_min, 3), round(fit.critical_batch, 3), round(fit.e_min)
    (1000.0, 128.0, 128000)
    """
    b, s = _positive_pairs(batch_sizes, steps, "batch_sizes", "steps")
    log_b, log_s = np.log(b), np.log(s)
    log_s_min, u = _fit_log(log_b, log_s)
    fitted = log_s_min + np.logaddexp(0.0, u - log_b)
    resid = log_s - fitted
    s_int = c_int = e_int = (math.nan, math.nan)
    if b.size > 2 and n_boot > 0:
        rng = np.random.default_rng(seed)
        scaled = (resid - resid.mean()) * math.sqrt(b.size / (b.size - 2))
        draws = np.array(
            [_fit_log(log_b, fitted + rng.choice(scaled, size=b.size)) for _ in range(n_boot)]
        )
        s_int = percentile_interval(np.exp(draws[:, 0]), level)
        c_int = percentile_interval(np.exp(draws[:, 1]), level)
        e_int = percentile_interval(np.exp(draws.sum(axis=1)), level)
    return StepsFit(
        s_min=math.exp(log_s_min),
        critical_batch=math.exp(u),
        batch_sizes=tuple(b.tolist()),
        steps=tuple(s.tolist()),
        residuals=tuple(resid.tolist()),
        s_min_interval=s_int,
        critical_batch_interval=c_int,
        e_min_interval=e_int,
        level=level,
    )
