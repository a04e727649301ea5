"""LR range-test math on plain arrays: smoothing, divergence, suggestions, consensus, exponent."""

from __future__ import annotations

import math

import numpy as np
import pytest

from batchlab.core.range_test import (
    SUGGESTIONS,
    consensus,
    default_bandwidth,
    divergence_index,
    divergence_point,
    ema,
    fit_lr_exponent,
    smooth_before_divergence,
    smooth_log_lr,
    suggest_lrs,
)

LRS = np.logspace(-5, 1, 121)  # 0.05 decades per point
U = np.log10(LRS)


def curve(centre: float = -2.0, blow_up: float | None = 0.0) -> np.ndarray:
    """A range-test curve: a sigmoid drop from 2.3 to 0.3 centred at log10(lr) = ``centre``, then
    exponential growth from log10(lr) = ``blow_up``."""
    loss = 0.3 + 2.0 / (1.0 + np.exp(4.0 * (U - centre)))
    if blow_up is not None:
        loss = loss * np.exp(np.clip(U - blow_up, 0, None) * 40.0)
    return loss


# --- smoothing ------------------------------------------------------------------------------------


def test_smoothing_is_exact_on_lines_and_power_laws() -> None:
    line = -0.5 * U  # crosses zero: smoothed on the raw values
    np.testing.assert_allclose(smooth_log_lr(LRS, line), line, atol=1e-12)
    power = 2.0 * LRS**-0.3
    np.testing.assert_allclose(smooth_log_lr(LRS, power), power, rtol=1e-10)


def test_smoothing_is_centred_so_a_dip_stays_in_place() -> None:
    dip = 1.0 - 0.5 * np.exp(-0.5 * ((U + 2.0) / 0.3) ** 2)
    smoothed = smooth_log_lr(LRS, dip, bandwidth=0.3)
    assert U[np.argmin(smoothed)] == pytest.approx(-2.0, abs=1e-9)
    # an EMA of the same curve lags: its minimum moves to larger LRs
    assert U[np.argmin(ema(dip, 0.9))] > -2.0 + 0.2


def test_smoothing_reduces_noise() -> None:
    rng = np.random.default_rng(0)
    noisy = curve(blow_up=None) * np.exp(0.2 * rng.standard_normal(U.size))
    truth = curve(blow_up=None)
    raw_err = np.abs(np.log(noisy / truth)).mean()
    smooth_err = np.abs(np.log(smooth_log_lr(LRS, noisy) / truth)).mean()
    assert smooth_err < raw_err / 2.5


def test_smoothing_of_signed_losses_and_bandwidths() -> None:
    signed = np.sin(U)
    assert np.array_equal(smooth_log_lr(LRS, signed, bandwidth=0.0), signed)
    assert np.isfinite(smooth_log_lr(LRS, signed)).all()
    assert default_bandwidth(LRS) == pytest.approx(0.15)
    assert default_bandwidth([0.1]) == 0.0


@pytest.mark.parametrize(
    ("lrs", "losses", "kwargs", "field"),
    [
        ([0.1, 0.01], [1.0, 2.0], {}, "lrs"),
        ([0.0, 0.1], [1.0, 2.0], {}, "lrs"),
        ([0.01, 0.1], [1.0], {}, "losses"),
        ([0.01, 0.1, 1.0], [1.0, float("nan"), 1.0], {}, "losses"),
        ([0.01, 0.1, 1.0], [1.0, 1.0, 1.0], {"bandwidth": -1.0}, "bandwidth"),
    ],
)
def test_smoothing_bad_input(lrs: list, losses: list, kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=rf"^{field}:"):
        smooth_log_lr(lrs, losses, **kwargs)


# --- divergence -------------------------------------------------------------------------------------


def test_ema_is_bias_corrected() -> None:
    np.testing.assert_allclose(ema([2.0] * 5, 0.9), [2.0] * 5)
    with pytest.raises(ValueError, match=r"^beta:"):
        ema([1.0], 1.0)


def test_divergence_index_and_point() -> None:
    loss = curve()
    stop, start = divergence_index(loss), divergence_point(loss)
    assert stop is not None and start is not None
    assert start <= stop
    # the climb starts where the growth does (log10 lr = 0), the stop comes a little later
    assert U[start] == pytest.approx(0.0, abs=0.06)
    assert 0.0 < U[stop] < 0.2
    assert divergence_index(curve(blow_up=None)) is None
    assert divergence_point(curve(blow_up=None)) is None


def test_non_finite_loss_is_divergence() -> None:
    loss = [1.0, 0.9, 0.8, math.inf, 0.5]
    assert divergence_index(loss) == 3
    assert divergence_point(loss) == 3
    assert divergence_index([math.nan]) == 0


def test_divergence_with_negative_losses() -> None:
    # a log-likelihood loss below zero: rising by more than 3 |best| counts
    loss = np.array([-1.0, -2.0, -2.0, -2.0, 30.0])
    assert divergence_index(loss) == 4
    assert divergence_index(loss[:4]) is None
    with pytest.raises(ValueError, match=r"^factor:"):
        divergence_index(loss, factor=1.0)


# --- suggestions ------------------------------------------------------------------------------------


def test_suggestions_on_a_known_curve() -> None:
    s = suggest_lrs(LRS, curve(centre=-2.0, blow_up=0.0))
    assert set(s) == set(SUGGESTIONS)
    assert math.log10(s["steepest"]) == pytest.approx(-2.0, abs=0.1)
    # symmetric drop: halfway (in log-LR) between 90% and 10% of the drop is its centre
    assert math.log10(s["valley"]) == pytest.approx(-2.0, abs=0.1)
    # the minimum lies just before the blow-up
    assert math.log10(s["min_over_10"]) == pytest.approx(-1.0, abs=0.15)
    assert math.log10(s["divergence"]) == pytest.approx(0.0, abs=0.06)


def test_suggestions_are_robust_to_noise() -> None:
    rng = np.random.default_rng(1)
    for _ in range(5):
        noisy = curve() * np.exp(0.1 * rng.standard_normal(U.size))
        s = suggest_lrs(LRS, noisy)
        assert math.log10(s["valley"]) == pytest.approx(-2.0, abs=0.25)
        assert math.log10(s["steepest"]) == pytest.approx(-2.0, abs=0.35)
        assert math.log10(s["divergence"]) == pytest.approx(0.0, abs=0.2)


def test_suggestions_none_when_unreadable() -> None:
    assert suggest_lrs(LRS[:5], curve()[:5]) == dict.fromkeys(SUGGESTIONS)
    rising = np.linspace(1.0, 2.0, LRS.size)
    s = suggest_lrs(LRS, rising)
    assert s["steepest"] is None and s["valley"] is None and s["min_over_10"] is None
    # too few points before an early divergence: only the divergence is known
    early = np.r_[np.ones(4), [50.0]]
    s = suggest_lrs(LRS[:5], early)
    assert s["divergence"] == LRS[4] and s["valley"] is None
    with pytest.raises(ValueError, match=r"^min_points:"):
        suggest_lrs(LRS, curve(), min_points=2)


def test_smooth_before_divergence_cuts_the_climb() -> None:
    smoothed, cut = smooth_before_divergence(LRS, curve())
    assert cut is not None
    assert np.isfinite(smoothed[:cut]).all() and np.isnan(smoothed[cut:]).all()


# --- consensus and exponent -------------------------------------------------------------------------


def test_consensus_is_geometric() -> None:
    c = consensus([0.01, 0.1, None, 1.0])
    assert c.lr == pytest.approx(0.1)
    assert c.spread == pytest.approx(10.0)  # sample std of (-1, 0, 1) decades is 1 decade
    assert (c.low, c.high, c.n) == (0.01, 1.0, 3)
    single = consensus([0.5])
    assert single.lr == 0.5 and single.spread is None
    assert consensus([None, None]).lr is None
    with pytest.raises(ValueError, match=r"^lrs:"):
        consensus([0.1, -1.0])


def test_fit_lr_exponent() -> None:
    sizes = [32, 128, 512, 2048]
    fit = fit_lr_exponent(sizes, [0.003 * b**0.75 for b in sizes])
    assert fit is not None
    assert fit.exponent == pytest.approx(0.75)
    assert fit.prefactor == pytest.approx(0.003)
    assert fit_lr_exponent([32, 32], [0.1, 0.2]) is None
    assert fit_lr_exponent([32, 64], [0.1, None]) is None
    with pytest.raises(ValueError, match=r"^lrs:"):
        fit_lr_exponent([32, 64], [0.1])
