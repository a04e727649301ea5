"""Gradient noise scale: unbiased |G|^2 and tr(Sigma) from gradient norms, windowed ratios, intervals.

McCandlish, Kaplan, Amodei et al. 2018, "An Empirical Model of Large-Batch Training", Appendix A.1:
a gradient averaged over B i.i.d. examples has ``E|G_B|^2 = |G|^2 + tr(Sigma)/B``, so squared norms at
two batch sizes give unbiased estimates of ``|G|^2`` and ``tr(Sigma)``; the simple noise scale is
``B_simple = tr(Sigma) / |G|^2``, and its estimate is the ratio of the sums of the two over the same
steps (a ratio of single-step estimates is biased and often negative): the last few steps while the
weights move (:class:`NoiseWindow`), all of them at a fixed point. The n-way form (n micro-batches
or ranks, as in AdaptDL, Qiao et al. 2021) is the same estimator with the mean micro-batch norm as the
small batch; :func:`effective_batches` gives the batch sizes that keep it unbiased for unequal
micro-batches and any weighting. The interval is Fieller's (1954) for a ratio of means, with the
variances of the means read from the spread of the measurements.

The formulas assume examples drawn i.i.d. (with replacement). Batches cut from an epoch's permutation
of N examples are drawn without replacement; :func:`without_replacement` gives the batch sizes that
keep the estimator unbiased for them (ignoring it overestimates B_simple by about B_simple / N).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import NormalDist
from typing import NamedTuple

import numpy as np

from batchlab.errors import FieldError


def _check_batches(small_batch: float, big_batch: float) -> None:
    if not small_batch > 0:
        raise FieldError("small_batch", f"must be > 0, got {small_batch}")
    if not big_batch > small_batch:
        raise FieldError(
            "big_batch", f"must be larger than small_batch ({small_batch}), got {big_batch}"
        )


def _check_sq_norm(name: str, value: np.ndarray) -> None:
    if not np.all(np.isfinite(value)):
        raise FieldError(name, f"must be finite, got {value}")
    if np.any(value < 0):
        raise FieldError(name, f"a squared norm must be >= 0, got {value}")


def two_batch_estimate(
    small_sq_norm: float | np.ndarray,
    big_sq_norm: float | np.ndarray,
    small_batch: float,
    big_batch: float,
) -> tuple[float | np.ndarray, float | np.ndarray]:
    """Unbiased ``(|G|^2, tr(Sigma))`` from ``|G_small|^2`` and ``|G_big|^2`` (McCandlish A.1).

    Either estimate of a single measurement can be negative; average many before taking a ratio.
    Arrays of norms broadcast (one estimate per element).

    >>> grad_sq, trace_cov = two_batch_estimate(1.1, 1.01, small_batch=10, big_batch=100)
    >>> round(grad_sq, 9), round(trace_cov, 9)
    (1.0, 1.0)
    """
    _check_batches(small_batch, big_batch)
    small, big = np.asarray(small_sq_norm, float), np.asarray(big_sq_norm, float)
    _check_sq_norm("small_sq_norm", small)
    _check_sq_norm("big_sq_norm", big)
    if math.isinf(big_batch):  # the whole population: its gradient is exact
        grad_sq = big
    else:
        grad_sq = (big_batch * big - small_batch * small) / (big_batch - small_batch)
    trace_cov = (small - big) / (1.0 / small_batch - 1.0 / big_batch)
    if grad_sq.ndim == 0:
        return float(grad_sq), float(trace_cov)
    return grad_sq, trace_cov


def effective_batches(
    micro_batches: Sequence[float], weights: Sequence[float] | None = None
) -> tuple[float, float]:
    """``(small_batch, big_batch)`` for n micro-batch gradients ``g_i`` of sizes ``b_i`` combined as
    ``sum_i w_i g_i``, so that ``two_batch_estimate(mean_i |g_i|^2, |sum_i w_i g_i|^2, ...)`` is unbiased.

    ``E mean_i|g_i|^2 = |G|^2 + tr(Sigma) mean_i(1/b_i)`` and ``E|sum w_i g_i|^2 = |G|^2 +
    tr(Sigma) sum_i w_i^2/b_i``. The default weights ``b_i / sum(b)`` give the whole-batch mean gradient;
    ranks averaged by an all-reduce use ``w_i = 1/n``. Equal sizes give ``(b, n * b)``.

    >>> effective_batches([32, 32, 32, 32])
    (32.0, 128.0)
    >>> effective_batches([2, 1])  # a batch of 3 cut in two
    (1.3333333333333333, 3.0)
    """
    sizes = np.asarray(micro_batches, float)
    if sizes.ndim != 1 or sizes.size < 2:
        raise FieldError("micro_batches", f"needs at least 2 micro-batches, got {list(sizes)}")
    if not np.all(sizes > 0):
        raise FieldError("micro_batches", f"every size must be > 0, got {list(sizes)}")
    w = sizes / sizes.sum() if weights is None else np.asarray(weights, float)
    if w.shape != sizes.shape or np.any(w < 0) or not math.isclose(w.sum(), 1.0, rel_tol=1e-9):
        raise FieldError(
            "weights", f"must be {sizes.size} non-negative numbers summing to 1, got {list(w)}"
        )
    return float(1.0 / np.mean(1.0 / sizes)), float(1.0 / np.sum(w**2 / sizes))


def without_replacement(batch: float, population: int) -> float:
    """The i.i.d. batch size whose gradient error matches a batch of ``batch`` examples drawn without
    replacement from ``population`` (an epoch's permutation): ``batch (N - 1) / (N - batch)``.

    ``E|G_b|^2 = |G|^2 + tr(Sigma) (N - b) / (b (N - 1))`` with ``tr(Sigma)`` the mean of
    ``|g_i - G|^2`` over the ``N`` examples; ``inf`` for the whole set (its gradient is exact).
    Passing these to :func:`two_batch_estimate` removes a bias of ``B_simple / N`` in ``|G|^2``.

    >>> without_replacement(1, 1000), round(without_replacement(64, 1437), 2)
    (1.0, 66.94)
    """
    if not 0 < batch <= population:
        raise FieldError("batch", f"must be in (0, population={population}], got {batch}")
    return math.inf if batch == population else batch * (population - 1) / (population - batch)


def n_way_estimate(
    micro_sq_norms: Sequence[float],
    total_sq_norm: float,
    micro_batches: Sequence[float],
    weights: Sequence[float] | None = None,
) -> tuple[float, float]:
    """Unbiased ``(|G|^2, tr(Sigma))`` from n micro-batch (or per-rank) gradient norms and the norm of
    their combination ``sum_i w_i g_i`` (the gradient the optimizer applies).

    With equal sizes this is AdaptDL's ``tr(Sigma) = b/(n-1) * sum_i |g_i - mean g|^2``.

    >>> n_way_estimate([2.0, 4.0], 2.5, micro_batches=[10, 10])
    (2.0, 10.0)
    """
    norms = np.asarray(micro_sq_norms, float)
    if norms.shape != (len(micro_batches),):
        raise FieldError(
            "micro_sq_norms",
            f"needs one norm per micro-batch ({len(micro_batches)}), got {norms.shape}",
        )
    small_batch, big_batch = effective_batches(micro_batches, weights)
    _check_sq_norm("micro_sq_norms", norms)
    grad_sq, trace_cov = two_batch_estimate(
        float(norms.mean()), total_sq_norm, small_batch, big_batch
    )
    return float(grad_sq), float(trace_cov)


def noise_scale(grad_sq: float, trace_cov: float) -> float:
    """``B_simple = tr(Sigma) / |G|^2``: ``inf`` when ``|G|^2 <= 0`` (noise swamps the signal), 0 when
    ``tr(Sigma) <= 0``.

    >>> noise_scale(0.5, 64.0), noise_scale(-0.1, 64.0), noise_scale(0.5, -1.0)
    (128.0, inf, 0.0)
    """
    if grad_sq <= 0:
        return math.inf
    return max(trace_cov, 0.0) / grad_sq


def t_quantile(p: float, dof: float) -> float:
    """Student-t quantile: exact for ``dof < 3``, a Cornish-Fisher expansion (error < 0.3%) above.

    Fractional ``dof`` round down (a wider interval). Stdlib only, so ``core`` needs no scipy.

    >>> round(t_quantile(0.975, 1), 3), round(t_quantile(0.975, 10), 3), round(t_quantile(0.5, 4), 3)
    (12.706, 2.228, 0.0)
    """
    if not 0 < p < 1:
        raise FieldError("p", f"must be in (0, 1), got {p}")
    if not dof >= 1:
        raise FieldError("dof", f"must be >= 1, got {dof}")
    nu = math.floor(dof)
    if nu == 1:
        return math.tan(math.pi * (p - 0.5))
    if nu == 2:
        return (2 * p - 1) / math.sqrt(2 * p * (1 - p))
    z = NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / nu + g2 / nu**2 + g3 / nu**3 + g4 / nu**4


def fieller_interval(
    num: float, den: float, var_num: float, var_den: float, cov: float, t: float
) -> tuple[float, float]:
    """Confidence interval for a non-negative ratio ``num/den`` of two estimated means (Fieller 1954).

    Unbounded above (``high = inf``) when ``den`` is not significantly above zero, which is the honest
    answer when ``|G|^2`` is lost in the noise.

    >>> fieller_interval(10.0, 1.0, 0.0, 0.0, 0.0, 2.0)
    (10.0, 10.0)
    >>> low, high = fieller_interval(10.0, 0.1, 1.0, 0.04, 0.0, 2.0)
    >>> round(low, 2), high
    (19.5, inf)
    """
    # {R : (num - R den)^2 <= t^2 (var_num - 2 R cov + R^2 var_den)} as a R^2 + b R + c <= 0.
    a = den**2 - t**2 * var_den
    b = -2.0 * (num * den - t**2 * cov)
    c = num**2 - t**2 * var_num
    disc = b * b - 4 * a * c
    if a > 0 and den > 0:
        root = math.sqrt(max(disc, 0.0))
        lo, hi = sorted(((-b - root) / (2 * a), (-b + root) / (2 * a)))
        return max(lo, 0.0), max(hi, 0.0)
    if a >= 0 or disc <= 0:  # den significantly negative, or every R is in the set
        return 0.0, math.inf
    # a < 0: the set is (-inf, r1] U [r2, inf); the lowest non-negative member is the lower bound.
    root = math.sqrt(disc)
    r1, r2 = sorted(((-b - root) / (2 * a), (-b + root) / (2 * a)))
    return (r2 if r1 < 0 <= r2 else 0.0), math.inf


class NoiseEstimate(NamedTuple):
    """A noise-scale value with its interval and the averaged estimates behind it."""

    value: float  # B_simple = trace_cov / grad_sq
    low: float
    high: float  # inf when |G|^2 is not resolved from zero
    grad_sq: float  # mean of the unbiased |G|^2 estimates in the window
    trace_cov: float  # mean of the unbiased tr(Sigma) estimates in the window
    count: int  # measurements in the window


def ratio_estimate(
    grad_sq: Sequence[float], trace_cov: Sequence[float], confidence: float = 0.95
) -> NoiseEstimate | None:
    """``B_simple`` as the ratio of the sums of paired per-step estimates, with Fieller's interval
    from their spread (each step an independent draw); ``None`` below two measurements.

    >>> est = ratio_estimate([1.0, 1.2, 0.8, 1.0], [90.0, 110.0, 100.0, 100.0])
    >>> round(est.value, 1), est.count, est.low < est.value < est.high
    (100.0, 4, True)
    """
    if not 0 < confidence < 1:
        raise FieldError("confidence", f"must be in (0, 1), got {confidence}")
    n = len(grad_sq)
    if n != len(trace_cov):
        raise FieldError("trace_cov", f"needs one value per grad_sq ({n}), got {len(trace_cov)}")
    if n < 2:
        return None
    x = np.stack([np.asarray(grad_sq, float), np.asarray(trace_cov, float)])
    mean = x.mean(1)
    g, s = float(mean[0]), float(mean[1])
    (var_g, cov), (_, var_s) = np.cov(x) / n  # variances of the two means
    t = t_quantile(0.5 + confidence / 2, n - 1)
    low, high = fieller_interval(s, g, float(var_s), float(var_g), float(cov), t)
    value = noise_scale(g, s)
    if g <= 0:
        high = math.inf
    return NoiseEstimate(value, low, high, g, s, n)


DEFAULT_WINDOW = 16
"""Measurements a training-time estimate averages (see :class:`NoiseWindow`)."""


@dataclass(frozen=True)
class NoiseWindow:
    """The last ``window`` per-step ``(|G|^2, tr(Sigma))`` estimates, or all of them (``None``).

    While the weights move, ``|G|^2`` at the current weights changes within tens of steps, so an
    estimate of the value *now* can only average recent steps: the ratio of the sums over a window
    (both sums over the same steps), which forgets a measurement completely once it leaves the
    window (an exponential average never does: a burst 10^6 times the rest, as Adam's first steps
    give, ruled its second moments for hundreds of steps). At a fixed point (``window=None``) every
    measurement counts, equally. Immutable: :meth:`update` returns a new state; plain fields, so it
    serialises as numbers.

    >>> w = NoiseWindow(window=3)
    >>> for g, s in [(9.0, 9.0), (1.0, 90.0), (1.2, 110.0), (0.8, 100.0)]:
    ...     w = w.update(g, s)
    >>> est = w.estimate()
    >>> round(est.value, 1), est.count, w.count
    (100.0, 3, 4)
    """

    window: int | None = DEFAULT_WINDOW
    count: int = 0  # measurements folded in, in all
    grad_sq: tuple[float, ...] = ()  # the window's measurements, oldest first
    trace_cov: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if self.window is not None and not self.window >= 2:
            raise FieldError(
                "window", f"must be >= 2 measurements (or None: all), got {self.window}"
            )

    def update(self, grad_sq: float, trace_cov: float) -> NoiseWindow:
        """Fold in one measurement (finite numbers: skip non-finite ones before calling)."""
        if not (math.isfinite(grad_sq) and math.isfinite(trace_cov)):
            raise FieldError("grad_sq", f"must be finite, got ({grad_sq}, {trace_cov})")
        keep = -(self.window - 1) if self.window is not None else None
        if keep is None:
            g, s = (*self.grad_sq, grad_sq), (*self.trace_cov, trace_cov)
        else:
            g, s = (*self.grad_sq[keep:], grad_sq), (*self.trace_cov[keep:], trace_cov)
        return NoiseWindow(self.window, self.count + 1, g, s)

    def estimate(self, confidence: float = 0.95) -> NoiseEstimate | None:
        """The noise scale over the window with a ``confidence`` interval; ``None`` before two
        measurements."""
        return ratio_estimate(self.grad_sq, self.trace_cov, confidence)
