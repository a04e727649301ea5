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
