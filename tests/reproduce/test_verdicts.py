"""Every pre-registered verdict rule, driven to each of its outcomes with synthetic results."""

from __future__ import annotations

import math

import numpy as np
import pytest

from batchlab.reproduce import verdicts as v

B3 = [64, 256, 1024]


@pytest.mark.parametrize(
    ("losses", "expected"),
    [
        ([[0.1, 0.2, 0.4], [0.11, 0.21, 0.42], [0.09, 0.19, 0.41]], "supported"),
        ([[0.4, 0.2, 0.1], [0.42, 0.21, 0.1], [0.41, 0.2, 0.09]], "not_supported"),
        ([[0.1, 0.2, 0.4], [0.3, 0.2, 0.25], [0.1, 0.05, 0.12]], "inconclusive"),
    ],
)
def test_claim1(losses, expected):
    assert v.loss_grows_with_batch(np.array(losses), B3).verdict == expected


EPOCHS = [0.0, 1.0, 2.0, 3.0, 4.0, 5.0]
BASE = [2.0, 1.5, 1.0, 0.8, 0.6, 0.5]


@pytest.mark.parametrize("factor", [1.05, 0.8, 1.3])
def test_claim2_curve_distance_of_a_scaled_curve_is_the_scale(factor):
    # |c L - L| integrates to |c - 1| times the area under L, whatever the range
    curve = [factor * y for y in BASE]
    for start in (0.0, 1.0, 2.5):
        d = v.curve_distance(EPOCHS, BASE, EPOCHS, curve, start=start, end=5.0)
        assert d == pytest.approx(abs(factor - 1), rel=1e-12)


def test_claim2_curve_distance_on_other_points_with_a_crossing():
    # base 1 flat; the curve rises linearly 0.9 -> 1.1 over [0, 2]: two triangles of 1 x 0.1 / 2
    assert v.curve_distance([0, 2], [1, 1], [0, 2], [0.9, 1.1], start=0, end=2) == pytest.approx(
        0.05, rel=1e-12
    )
    # the same line sampled at its own points; the base has a point at 1.5: still 0.1 / 2
    d = v.curve_distance([0, 1.5, 2], [1, 1, 1], [0, 0.5, 2], [0.9, 0.95, 1.1], start=0, end=2)
    assert d == pytest.approx(0.05, rel=1e-12)
    # from epoch 1 on: one triangle of 1 x 0.1 / 2 over an area of 1
    assert v.curve_distance([0, 2], [1, 1], [0, 2], [0.9, 1.1], start=1, end=2) == pytest.approx(
        0.05, rel=1e-12
    )
    # a curve that stops before the end (it diverged), and non-finite points are skipped
    assert v.curve_distance(EPOCHS, BASE, EPOCHS[:4], BASE[:4], start=1, end=5) == math.inf
    with_nan = [math.nan, *BASE[1:]]
    assert v.curve_distance(EPOCHS, with_nan, EPOCHS, with_nan, start=1, end=5) == 0.0


B4 = [64, 256, 1024, 4096]


@pytest.mark.parametrize(
    ("at_256", "at_1024", "expected", "states"),
    [
        # means 0.05 and 0.055, SE 0.0058 and 0.0029: both intervals below 0.10
        ([0.04, 0.05, 0.06], [0.05, 0.06, 0.055], "supported", ["match", "match"]),
        # 1024: mean 0.22, SE 0.0153, interval [0.189, 0.251] above 0.10
        ([0.04, 0.05, 0.06], [0.2, 0.25, 0.21], "not_supported", ["match", "no match"]),
        # 1024: mean 0.10, SE 0.0289, interval [0.042, 0.158] straddles 0.10
        ([0.04, 0.05, 0.06], [0.05, 0.15, 0.1], "inconclusive", ["match", "undecided"]),
        # 256 undecided, 1024 diverged in one seed: the divergence decides
        ([0.05, 0.15, 0.1], [0.05, math.inf, 0.06], "not_supported", ["undecided", "diverged"]),
        # no run at 1024 in any seed
        ([0.04, 0.05, 0.06], [math.nan] * 3, "inconclusive", ["match", "no runs"]),
    ],
)
def test_claim2_curves_match_on_the_interval(at_256, at_1024, expected, states):
    distances = np.array([[0.0, a, b, 0.5] for a, b in zip(at_256, at_1024, strict=True)])
    out = v.curves_match(distances, B4)
    assert out.verdict == expected
    assert out.evidence["match"] == ["base", *states, "no match"]
    broken = [b for b, st in zip(B4[1:3], states, strict=True) if st in ("no match", "diverged")]
    assert out.evidence["break_batch_size"] == (broken[0] if broken else 4096)


def test_claim2_interval_is_two_standard_errors():
    distances = np.array([[0.0, 0.2, 0.0], [0.0, 0.3, 0.0], [0.0, 0.25, 0.0]])
    ev = v.curves_match(distances, [64, 256, 1024]).evidence
    se = 0.05 / math.sqrt(3)  # std of 0.2, 0.3, 0.25 is 0.05
    assert ev["curve_distance"][1] == pytest.approx(0.25)
    assert ev["curve_distance_low"][1] == pytest.approx(0.25 - 2 * se)
    assert ev["curve_distance_high"][1] == pytest.approx(0.25 + 2 * se)


def test_claim2_match_and_break_point():
    base = [[1.0, 1.05, 0.97, 1.5]] * 2
    out = v.linear_scaling_match(np.array(base), [64, 256, 1024, 4096])
    assert out.verdict == "supported"
    assert out.evidence["break_batch_size"] == 4096
    broken = v.linear_scaling_match(np.array([[1.0, 1.02, 1.3, 2.0]]), [64, 256, 1024, 4096])
    assert broken.verdict == "not_supported"
    assert broken.evidence["break_batch_size"] == 1024
    assert v.linear_scaling_match(np.array([[1.0, 1.0]]), [64, 128]).verdict == "inconclusive"


@pytest.mark.parametrize(
    ("alpha", "low", "high", "expected"),
    [
        (1.6, 1.3, 1.9, "supported"),
        (0.9, 0.7, 1.1, "not_supported"),
        (1.0, 0.2, 1.8, "inconclusive"),
        (math.nan, math.nan, math.nan, "inconclusive"),
    ],
)
def test_claim3(alpha, low, high, expected):
    assert (
        v.table_exponent(alpha, low, high, claimed=math.log(100) / math.log(16)).verdict == expected
    )


@pytest.mark.parametrize(
    ("low", "high", "rule"),
    [
        (1.02, 1.28, "neither"),  # the quick mode's interval: above linear
        (0.9, 1.2, "linear"),
        (0.3, 0.7, "sqrt"),
        (0.4, 1.1, "both"),
        (0.6, 0.9, "neither"),
        (1.0, 1.0, "linear"),  # an end of the interval counts as inside
    ],
)
def test_claim3_reports_the_rule_the_interval_supports(low, high, rule):
    out = v.table_exponent((low + high) / 2, low, high, claimed=math.log(100) / math.log(16))
    assert out.evidence["supported_rule"] == rule
    assert out.evidence["linear_inside_interval"] == (low <= 1.0 <= high)
    assert out.evidence["sqrt_inside_interval"] == (low <= 0.5 <= high)
    assert f"[{low:.2f}, {high:.2f}] supports" in out.reason
    # the table's verdict is unchanged: 1.66 is outside every interval here
    assert out.verdict == "not_supported"


def test_claim3_without_a_fit_reports_no_rule():
    out = v.table_exponent(math.nan, math.nan, math.nan, claimed=1.66)
    assert out.verdict == "inconclusive" and out.evidence["supported_rule"] is None


def test_claim4_outcomes():
    sup = v.large_batch_sharper([0.1, 0.11, 0.1], [0.3, 0.32, 0.31], [5, 5.2, 5.1], [20, 21, 22])
    assert sup.verdict == "supported"
    nos = v.large_batch_sharper([0.3, 0.3], [0.1, 0.1], [5, 5], [20, 21])
    assert nos.verdict == "not_supported"
    inc = v.large_batch_sharper([0.1, 0.1, 0.1], [0.3, 0.31, 0.3], [5, 5, 5], [4, 7, 5])
    assert inc.verdict == "inconclusive"


def test_claim5_outcomes():
    small, large = [0.90, 0.91, 0.905], [0.85, 0.86, 0.855]
    assert v.longer_training_closes_gap(small, large, [0.90, 0.905, 0.91]).verdict == "supported"
    assert v.longer_training_closes_gap(small, large, [0.84, 0.85, 0.85]).verdict == "not_supported"
    assert (
        v.longer_training_closes_gap(small, large, [0.87, 0.875, 0.872]).verdict == "inconclusive"
    )


def test_claim6_outcomes():
    assert v.increase_batch_matches([0.9, 0.91], [0.905, 0.9], 1000, 400).verdict == "supported"
    assert v.increase_batch_matches([0.9, 0.91], [0.8, 0.81], 1000, 400).verdict == "not_supported"
    assert v.increase_batch_matches([0.9, 0.91], [0.9, 0.91], 1000, 1000).verdict == "not_supported"
    # the mean is within the margin but each seed is more than 2 points off, in opposite directions
    assert v.increase_batch_matches([0.9, 0.9], [0.87, 0.935], 1000, 400).verdict == "inconclusive"


def test_claim7_outcomes():
    b = [16, 64, 256, 1024]
    s_min, b_crit = 100.0, 200.0
    steps = [s_min * (1 + b_crit / x) for x in b]
    assert v.critical_batch(b, steps, b_crit, 150.0).verdict == "supported"
    assert v.critical_batch(b, steps, b_crit, 1e5).verdict == "inconclusive"
    assert v.critical_batch(b, [100, 200, 300, 400], b_crit, 150.0).verdict == "not_supported"
    nan = math.nan
    assert v.critical_batch(b, [100, nan, nan, 50], b_crit, 150.0).verdict == "inconclusive"


def test_claim8_outcomes():
    inf = math.inf
    grow = np.array([[0.5, 1.0, 2.0], [0.5, 1.0, inf]])
    assert v.threshold_grows(grow, B3).verdict == "supported"
    flat = np.array([[1.0, 1.0, 1.0], [2.0, 1.0, 1.0]])
    assert v.threshold_grows(flat, B3).verdict == "not_supported"
    mixed = np.array([[0.5, 1.0, 2.0], [2.0, 1.0, 1.0]])
    assert v.threshold_grows(mixed, B3).verdict == "inconclusive"
    assert v.threshold_grows(np.full((2, 3), inf), B3).verdict == "inconclusive"


def test_every_claim_has_a_rule():
    assert sorted(v.RULES) == list(range(1, 9))


def test_claim8_equal_infinite_thresholds_are_not_a_decrease():
    inf = math.inf
    grow = np.array([[0.5, inf, inf], [0.5, 1.0, inf]])
    assert v.threshold_grows(grow, B3).verdict == "supported"
