"""Noise-scale estimators against exact answers: closed forms, Monte Carlo, MNIST-1D ground truth."""

from __future__ import annotations

import math

import numpy as np
import pytest

from batchlab.core.noise import (
    NoiseWindow,
    effective_batches,
    fieller_interval,
    n_way_estimate,
    noise_scale,
    t_quantile,
    two_batch_estimate,
    without_replacement,
)


@pytest.fixture(scope="module")
def logistic_per_example() -> np.ndarray:
    """Per-example gradients (closed form) of softmax regression on MNIST-1D at a fixed point."""
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    x = (data["x"] - data["x"].mean(0)) / data["x"].std(0)
    x = np.hstack([x, np.ones((len(x), 1))])  # bias column
    w = np.random.default_rng(0).normal(0, 0.1, (x.shape[1], 10))
    logits = x @ w
    p = np.exp(logits - logits.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    p[np.arange(len(x)), data["y"]] -= 1.0  # d loss / d logits
    return (p[:, :, None] * x[:, None, :]).reshape(len(x), -1)


def exact(per_example: np.ndarray) -> tuple[float, float]:
    """|G|^2 and tr(Sigma) of the empirical distribution of the examples."""
    g = per_example.mean(0)
    return float(g @ g), float(((per_example - g) ** 2).sum(1).mean())


# ----- the two-batch and n-way estimators -----


@pytest.mark.parametrize(("small", "big"), [(1, 2), (8, 64), (32, 33), (3.5, 1000)])
def test_two_batch_recovers_exact_values_from_expected_norms(small: float, big: float) -> None:
    grad_sq, trace = 0.37, 52.0
    est = two_batch_estimate(grad_sq + trace / small, grad_sq + trace / big, small, big)
    assert est == pytest.approx((grad_sq, trace), rel=1e-9)


def test_two_batch_broadcasts_over_arrays() -> None:
    grad_sq, trace = two_batch_estimate(np.array([1.1, 2.2]), np.array([1.01, 2.02]), 10, 100)
    np.testing.assert_allclose(grad_sq, [1.0, 2.0])
    np.testing.assert_allclose(trace, [1.0, 2.0])


def test_n_way_equals_adaptdl_variance_form() -> None:
    rng = np.random.default_rng(1)
    micro = rng.normal(size=(5, 40)) + 0.3
    b = 16
    mean = micro.mean(0)
    grad_sq, trace = n_way_estimate((micro**2).sum(1), float(mean @ mean), [b] * 5)
    assert trace == pytest.approx(b / (5 - 1) * ((micro - mean) ** 2).sum(), rel=1e-12)
    assert grad_sq == pytest.approx(mean @ mean - trace / (5 * b), rel=1e-12)


@pytest.mark.parametrize("weights", [None, [0.25, 0.25, 0.25, 0.25], [0.1, 0.2, 0.3, 0.4]])
def test_effective_batches_are_exact_for_unequal_sizes_and_weights(weights: list | None) -> None:
    sizes = np.array([5.0, 3.0, 8.0, 1.0])
    w = sizes / sizes.sum() if weights is None else np.array(weights)
    grad_sq, trace = 2.0, 30.0
    micro_expected = grad_sq + trace / sizes  # E|g_i|^2
    total_expected = grad_sq + trace * np.sum(w**2 / sizes)  # E|sum w_i g_i|^2
    got = n_way_estimate(micro_expected, total_expected, sizes, weights)
    assert got == pytest.approx((grad_sq, trace), rel=1e-9)


def test_n_way_is_unbiased_on_gaussian_gradients_with_unequal_micro_batches() -> None:
    """Monte Carlo of the expectation formulas themselves: g_i = G + noise of covariance Sigma/b_i."""
    rng = np.random.default_rng(2)
    dim, sizes = 50, np.array([7, 3, 6])
    g_true = rng.normal(size=dim) * 0.2
    sd = rng.uniform(0.5, 2.0, dim)  # Sigma = diag(sd^2)
    draws = 20000
    micro = g_true + rng.normal(size=(draws, 3, dim)) * sd / np.sqrt(sizes)[None, :, None]
    total = (micro * (sizes / sizes.sum())[None, :, None]).sum(1)
    small_batch, big_batch = effective_batches(sizes)
    grad_sq, trace = two_batch_estimate(
        (micro**2).sum(2).mean(1), (total**2).sum(1), small_batch, big_batch
    )
    assert grad_sq.mean() == pytest.approx(g_true @ g_true, rel=0.03)
    assert trace.mean() == pytest.approx((sd**2).sum(), rel=0.01)


# ----- ground truth: softmax regression on MNIST-1D -----


def test_batch_gradient_error_is_trace_over_batch(logistic_per_example: np.ndarray) -> None:
    _, trace = exact(logistic_per_example)
    g = logistic_per_example.mean(0)
    rng = np.random.default_rng(3)
    for batch in (8, 64):
        idx = rng.integers(0, len(logistic_per_example), (1000, batch))
        err = [((logistic_per_example[i].mean(0) - g) ** 2).sum() for i in idx]
        assert np.mean(err) == pytest.approx(trace / batch, rel=0.05)


@pytest.mark.parametrize(("batch", "n_micro"), [(64, 2), (128, 4), (32, 32)])
def test_estimator_over_draws_lands_within_5_percent(
    logistic_per_example: np.ndarray, batch: int, n_micro: int
) -> None:
    grad_sq_exact, trace_exact = exact(logistic_per_example)
    rng = np.random.default_rng(batch)
    ema = NoiseWindow(window=None)
    micro = batch // n_micro
    for _ in range(1500):
        grads = logistic_per_example[rng.integers(0, len(logistic_per_example), batch)]
        micro_means = grads.reshape(n_micro, micro, -1).mean(1)
        total = grads.mean(0)
        ema = ema.update(*n_way_estimate((micro_means**2).sum(1), total @ total, [micro] * n_micro))
    est = ema.estimate()
    assert est.value == pytest.approx(trace_exact / grad_sq_exact, rel=0.05)
    assert est.grad_sq == pytest.approx(grad_sq_exact, rel=0.05)
    assert est.trace_cov == pytest.approx(trace_exact, rel=0.05)
    assert est.low <= trace_exact / grad_sq_exact <= est.high


def test_naive_ratio_of_single_step_norms_would_be_biased(logistic_per_example: np.ndarray) -> None:
    """Why a ratio of sums: the mean of per-step ratios is far from B_simple at these batch sizes."""
    grad_sq_exact, trace_exact = exact(logistic_per_example)
    rng = np.random.default_rng(4)
    ratios = []
    for _ in range(500):
        grads = logistic_per_example[rng.integers(0, len(logistic_per_example), 32)]
        halves, total = grads.reshape(2, 16, -1).mean(1), grads.mean(0)
        ratios.append(noise_scale(*n_way_estimate((halves**2).sum(1), total @ total, [16, 16])))
    assert np.median(ratios) != pytest.approx(trace_exact / grad_sq_exact, rel=0.05)


# ----- without replacement -----


def test_without_replacement_batches_make_the_estimator_unbiased_for_epoch_permutations(
    logistic_per_example: np.ndarray,
) -> None:
    """Batches cut from a permutation of a small set: exact mean over every batch of 300 epochs."""
    per_example = logistic_per_example[:500]
    grad_sq_exact, trace_exact = exact(per_example)
    rng, batch, n = np.random.default_rng(7), 50, len(per_example)
    norms = (per_example**2).sum(1)
    sums = {"iid": np.zeros(2), "corrected": np.zeros(2)}
    for _ in range(300):
        for idx in rng.permutation(n).reshape(-1, batch):
            small, total = norms[idx].mean(), per_example[idx].mean(0)
            big = total @ total
            sums["iid"] += two_batch_estimate(small, big, 1, batch)
            sums["corrected"] += two_batch_estimate(small, big, 1, without_replacement(batch, n))
    ratio = {k: v[1] / v[0] for k, v in sums.items()}
    truth = trace_exact / grad_sq_exact
    assert ratio["corrected"] == pytest.approx(truth, rel=0.02)
    assert abs(ratio["iid"] / truth - 1) > 2 * abs(ratio["corrected"] / truth - 1)


def test_the_whole_population_as_a_batch_gives_the_exact_gradient() -> None:
    assert without_replacement(100, 100) == math.inf
    assert two_batch_estimate(3.0, 1.0, 1, math.inf) == (1.0, 2.0)


# ----- the window, intervals -----


def test_window_is_the_ratio_of_sums_over_its_last_measurements() -> None:
    values = [(9.0, 1.0), (1.0, 10.0), (3.0, 50.0), (2.0, 20.0)]
    window = NoiseWindow(window=3)
    for g, s in values:
        window = window.update(g, s)
    est = window.estimate()
    assert (est.grad_sq, est.trace_cov, est.count, window.count) == pytest.approx(
        (2.0, 80 / 3, 3, 4)
    )
    assert est.value == pytest.approx(80 / 6)


def test_window_none_keeps_every_measurement() -> None:
    window = NoiseWindow(window=None)
    for i in range(100):
        window = window.update(1.0 + i % 2, 100.0)
    est = window.estimate()
    assert est.count == 100 and est.grad_sq == pytest.approx(1.5)


def test_a_burst_leaves_the_window_completely() -> None:
    """Adam's first steps measure values 10^6 times the rest: once out of the window, gone."""
    rng = np.random.default_rng(3)
    window = NoiseWindow(window=16).update(1e6, 1e9)
    for _ in range(16):
        window = window.update(1.0 + 0.1 * rng.normal(), 100.0 + 10 * rng.normal())
    est = window.estimate()
    assert 50 < est.low <= est.value <= est.high < 200


def test_constant_measurements_give_a_point_interval() -> None:
    est = NoiseWindow().update(0.5, 50.0).update(0.5, 50.0).estimate()
    assert (est.value, est.low, est.high) == pytest.approx((100.0, 100.0, 100.0))


def test_no_estimate_before_two_measurements() -> None:
    assert NoiseWindow().estimate() is None
    assert NoiseWindow().update(1.0, 2.0).estimate() is None


@pytest.mark.parametrize("window", [16, None])
def test_interval_covers_the_true_ratio_at_the_stated_rate(window: int | None) -> None:
    rng = np.random.default_rng(5)
    true_g, true_s, hits, trials = 1.0, 200.0, 0, 400
    for _ in range(trials):
        est = NoiseWindow(window=window)
        g = true_g + rng.normal(0, 0.5, 60)  # single-step |G|^2 estimates are often negative
        s = true_s + 0.3 * true_s * rng.normal(size=60) + 40 * (g - true_g)
        for gi, si in zip(g, s, strict=True):
            est = est.update(gi, si)
        hits += (e := est.estimate(confidence=0.9)).low <= true_s / true_g <= e.high
    assert 0.85 <= hits / trials <= 0.95


def test_unresolved_gradient_gives_an_unbounded_interval() -> None:
    window = NoiseWindow()
    for g, s in [(0.5, 100.0), (-0.6, 90.0), (0.2, 110.0), (-0.05, 100.0)]:
        window = window.update(g, s)
    est = window.estimate()
    assert est.high == math.inf
    assert 0 <= est.low <= est.value


@pytest.mark.parametrize("seed", range(20))
def test_fieller_interval_contains_the_point_estimate(seed: int) -> None:
    rng = np.random.default_rng(seed)
    num, den = rng.uniform(-1, 10), rng.uniform(-0.5, 2)
    var_num, var_den = rng.uniform(0, 4), rng.uniform(0, 1)
    cov = rng.uniform(-1, 1) * math.sqrt(var_num * var_den)
    low, high = fieller_interval(num, den, var_num, var_den, cov, 2.0)
    assert 0 <= low <= noise_scale(den, num) <= high


@pytest.mark.parametrize(
    ("dof", "table"), [(1, 12.706), (2, 4.303), (3, 3.182), (5, 2.571), (10, 2.228), (60, 2.000)]
)
def test_t_quantile_matches_tables(dof: int, table: float) -> None:
    assert t_quantile(0.975, dof) == pytest.approx(table, rel=3e-3)


# ----- bad input: a clear error naming the field -----


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: two_batch_estimate(1.0, 1.0, 0, 10), "small_batch"),
        (lambda: two_batch_estimate(1.0, 1.0, 10, 10), "big_batch"),
        (lambda: two_batch_estimate(math.nan, 1.0, 1, 10), "small_sq_norm"),
        (lambda: two_batch_estimate(1.0, -1.0, 1, 10), "big_sq_norm"),
        (lambda: effective_batches([64]), "micro_batches"),
        (lambda: effective_batches([64, 0]), "micro_batches"),
        (lambda: effective_batches([1, 2], [0.5, 0.6]), "weights"),
        (lambda: n_way_estimate([1.0, 2.0, 3.0], 1.0, [4, 4]), "micro_sq_norms"),
        (lambda: n_way_estimate([1.0, math.inf], 1.0, [4, 4]), "micro_sq_norms"),
        (lambda: NoiseWindow(window=1), "window"),
        (lambda: NoiseWindow().update(math.inf, 1.0), "grad_sq"),
        (lambda: NoiseWindow().estimate(confidence=1.0), "confidence"),
        (lambda: without_replacement(11, 10), "batch"),
        (lambda: t_quantile(0.975, 0.5), "dof"),
    ],
)
def test_bad_input_names_the_field(call, field: str) -> None:
    with pytest.raises(ValueError, match=f"^{field}: "):
        call()
