"""Fits against closed forms: S = S_min(1 + B_crit/B), power laws, parabolas, bootstraps."""

from __future__ import annotations

import math

import numpy as np
import pytest

from batchlab.core.fit import (
    bootstrap_rows,
    fit_power_law,
    fit_steps_vs_batch,
    parabolic_argmin,
    percentile_interval,
    steps_to_target,
)

BATCHES = 2.0 ** np.arange(3, 15)  # 8 .. 16384


@pytest.mark.parametrize("critical", [2.0, 64.0, 1000.0, 20000.0])
def test_steps_fit_recovers_noise_free_parameters(critical: float) -> None:
    steps = 2000.0 * (1 + critical / BATCHES)
    fit = fit_steps_vs_batch(BATCHES, steps)
    assert fit.s_min == pytest.approx(2000.0, rel=1e-7)
    assert fit.critical_batch == pytest.approx(critical, rel=1e-7)
    assert fit.e_min == pytest.approx(2000.0 * critical, rel=1e-7)
    assert max(abs(r) for r in fit.residuals) < 1e-9
    np.testing.assert_allclose(fit.predict_samples(BATCHES), steps * BATCHES, rtol=1e-7)


@pytest.mark.parametrize("critical", [64.0, 256.0, 1000.0])
@pytest.mark.parametrize("seed", range(10))
def test_steps_fit_within_ten_percent_under_five_percent_noise(critical: float, seed: int) -> None:
    rng = np.random.default_rng(seed)
    steps = 2000.0 * (1 + critical / BATCHES) * rng.uniform(0.95, 1.05, BATCHES.size)
    fit = fit_steps_vs_batch(BATCHES, steps, n_boot=0)
    assert fit.s_min == pytest.approx(2000.0, rel=0.10)
    assert fit.critical_batch == pytest.approx(critical, rel=0.10)
    assert math.isnan(fit.critical_batch_interval[0])  # n_boot=0: no interval


def test_steps_fit_interval_covers_truth_under_lognormal_noise() -> None:
    covered = 0
    for seed in range(20):
        rng = np.random.default_rng(100 + seed)
        steps = 500.0 * (1 + 300.0 / BATCHES) * np.exp(rng.normal(0, 0.05, BATCHES.size))
        low, high = fit_steps_vs_batch(
            BATCHES, steps, n_boot=100, seed=seed
        ).critical_batch_interval
        covered += low <= 300.0 <= high
    assert covered >= 15  # nominal 95%; a residual bootstrap on 12 points runs a little narrow


def test_steps_fit_is_deterministic_and_two_points_are_exact() -> None:
    steps = [900.0, 410.0, 260.0, 190.0]
    a = fit_steps_vs_batch([32, 64, 128, 256], steps, seed=3)
    b = fit_steps_vs_batch([32, 64, 128, 256], steps, seed=3)
    assert a == b
    two = fit_steps_vs_batch([10, 40], [300.0, 120.0])
    # Two equations: 300 = S(1 + C/10), 120 = S(1 + C/40) -> 1.5 = 0.0375 C: C = 40, S = 60.
    assert (two.s_min, two.critical_batch) == pytest.approx((60.0, 40.0), rel=1e-8)
    assert math.isnan(two.s_min_interval[0])


def test_regions_split_at_efficiency_bounds() -> None:
    fit = fit_steps_vs_batch(
        [16, 64, 256, 1024], [1000 * (1 + 100 / b) for b in [16, 64, 256, 1024]]
    )
    assert fit.region_bounds(0.8) == pytest.approx((25.0, 400.0))
    assert [fit.region(b) for b in (10, 24.9, 100, 399, 401, 5000)] == [
        "perfect_scaling",
        "perfect_scaling",
        "diminishing_returns",
        "diminishing_returns",
        "maximal_parallelism",
        "maximal_parallelism",
    ]
    # At the lower bound the sample efficiency E_min/E is exactly 0.8.
    assert fit.e_min / fit.predict_samples(25.0) == pytest.approx(0.8)
    assert fit.within_data
    with pytest.raises(ValueError, match="efficiency"):
        fit.region_bounds(0.4)


@pytest.mark.parametrize(
    ("batch_sizes", "steps", "field"),
    [
        ([16], [10.0], "batch_sizes"),
        ([16, 32], [10.0, -1.0], "steps"),
        ([8, 8], [1, 2], "batch_sizes"),
    ],
)
def test_steps_fit_rejects_bad_input(batch_sizes, steps, field) -> None:
    with pytest.raises(ValueError, match=f"^{field}:"):
        fit_steps_vs_batch(batch_sizes, steps)


@pytest.mark.parametrize("alpha", [1.0, 0.5, -0.25])
def test_power_law_recovers_exponent(alpha: float) -> None:
    b = np.array([32.0, 64.0, 128.0, 256.0, 512.0])
    fit = fit_power_law(b, 0.003 * b**alpha)
    assert fit.exponent == pytest.approx(alpha, abs=1e-12)
    assert fit.prefactor == pytest.approx(0.003, rel=1e-10)
    assert fit.r_squared == pytest.approx(1.0)
    assert fit.predict(1024.0) == pytest.approx(0.003 * 1024.0**alpha)


def test_steps_to_target_hand_computed() -> None:
    steps = [50, 100, 150, 200, 250]
    acc = [0.40, 0.62, math.nan, 0.71, 0.69]
    assert steps_to_target(steps, acc, 0.70, higher_is_better=True) == 200.0
    assert steps_to_target(steps, acc, 0.62, higher_is_better=True) == 100.0
    loss = [2.0, 1.1, 0.9, math.inf, 0.5]
    assert steps_to_target(steps, loss, 0.9, higher_is_better=False) == 150.0
    assert steps_to_target(steps, loss, 0.1, higher_is_better=False) == math.inf


def test_parabolic_argmin_exact_on_quadratic_non_uniform_grid() -> None:
    x = np.log([0.01, 0.03, 0.05, 0.2, 1.0])
    true = math.log(0.07)
    v = parabolic_argmin(x, (x - true) ** 2 + 0.3)
    assert v.interpolated and not v.at_edge
    assert v.x == pytest.approx(true, abs=1e-12)
    assert v.y == pytest.approx(0.3, abs=1e-12)


def test_parabolic_argmin_edge_and_diverged_neighbours() -> None:
    edge = parabolic_argmin([0.0, 1.0, 2.0], [0.1, 0.5, 0.9])
    assert (edge.x, edge.interpolated, edge.at_edge) == (0.0, False, True)
    hole = parabolic_argmin([0.0, 1.0, 2.0, 3.0], [0.9, 0.5, 0.2, math.inf])
    assert (hole.x, hole.interpolated, hole.at_edge) == (2.0, False, False)
    with pytest.raises(ValueError, match=r"^y:"):
        parabolic_argmin([0.0, 1.0], [math.nan, math.inf])


def test_bootstrap_rows_is_seeded_and_brackets_the_mean() -> None:
    data = np.random.default_rng(0).normal(5.0, 1.0, size=(40, 1))
    a = bootstrap_rows(data, lambda d: float(d.mean()), n_boot=400, seed=7)
    assert a == bootstrap_rows(data, lambda d: float(d.mean()), n_boot=400, seed=7)
    # Percentile interval of the mean ~ mean +- 1.96 sd/sqrt(n).
    half = 1.96 * data.std(ddof=1) / math.sqrt(40)
    assert a[0] == pytest.approx(data.mean() - half, abs=0.1)
    assert a[1] == pytest.approx(data.mean() + half, abs=0.1)
    assert all(math.isnan(v) for v in bootstrap_rows(data[:1], lambda d: 0.0))


def test_percentile_interval_ignores_non_finite() -> None:
    assert percentile_interval([1.0, math.nan, 3.0, math.inf], 0.5) == (1.5, 2.5)
    assert all(math.isnan(v) for v in percentile_interval([math.nan]))
