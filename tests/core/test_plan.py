"""Time-to-target planning: step-time fit, predictions against known S_min / B_crit, closed-form
optima of the time and cost, throughput tables read as data."""

from __future__ import annotations

import math

import numpy as np
import pytest

from batchlab.core.fit import fit_steps_vs_batch
from batchlab.core.plan import (
    StepTimeFit,
    Target,
    ThroughputTable,
    advice_costs,
    candidate_batches,
    cheapest,
    device_counts,
    fastest,
    fit_step_time,
    predict,
    recommend,
)
from batchlab.core.rules import advise

S_MIN, B_CRIT = 800.0, 300.0


def test_affine_step_time_is_recovered_and_checked():
    b = [8, 32, 128, 512]
    fit = fit_step_time(b, [0.002 + 1e-5 * x for x in b])
    assert fit.overhead_s == pytest.approx(0.002, rel=1e-9)
    assert fit.per_example_s == pytest.approx(1e-5, rel=1e-9)
    assert fit.ok and fit.max_residual < 1e-9
    curved = fit_step_time(b, [1e-6 * x**2 for x in b])
    assert not curved.ok  # a quadratic is not affine: the check says so


def test_step_time_coefficients_stay_non_negative():
    fit = fit_step_time([10, 20, 40], [0.001, 0.004, 0.0105])  # unconstrained: negative overhead
    assert fit.overhead_s >= 0 and fit.per_example_s >= 0


def test_time_per_step_is_exact_at_measurements_and_accumulates_beyond_memory():
    sizes, secs = (16, 64, 256), (0.001, 0.003, 0.02)
    fit = fit_step_time(sizes, secs, max_batch=256)
    for b, t in zip(sizes, secs, strict=True):
        assert fit.time_per_step(b) == pytest.approx(t)
    assert fit.time_per_step(8) == pytest.approx(0.001)  # never cheaper than the smallest
    assert fit.accumulation(1024) == 4
    assert fit.time_per_step(1024) == pytest.approx(4 * 0.02)  # 4 micro-batches of 256


def test_fit_refuses_bad_measurements():
    with pytest.raises(ValueError, match="seconds"):
        fit_step_time([8, 16], [0.001, 0.0])
    with pytest.raises(ValueError, match="distinct"):
        fit_step_time([8, 8], [0.001, 0.002])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_predicted_steps_within_30_percent_of_a_noisy_synthetic_sweep(seed):
    """Fit on steps with 10% multiplicative noise; predictions at every B within 30% of the truth."""
    rng = np.random.default_rng(seed)
    b = np.array([16, 32, 64, 128, 256, 512, 1024, 2048])
    truth = S_MIN * (1 + B_CRIT / b)
    measured = truth * np.exp(rng.normal(0.0, 0.1, b.size))
    f = fit_steps_vs_batch(b, measured, n_boot=0)
    fit = StepTimeFit(0.01, 0.0, (1.0,), (0.01,), 0.0)
    preds = predict(
        b.tolist(), target=Target(f.s_min), critical_batch=f.critical_batch, step_time=fit
    )
    for p, s in zip(preds, truth, strict=True):
        assert abs(p.steps / s - 1) < 0.3
        assert p.samples == pytest.approx(p.steps * p.batch_size)


def test_reference_target_is_exact_at_its_batch_and_interval_pinches_there():
    fit = StepTimeFit(0.01, 1e-5, (1.0,), (0.01,), 0.0)
    target = Target(1200.0, reference_batch=128)
    preds = predict(
        [32, 128, 1024],
        target=target,
        critical_batch=B_CRIT,
        step_time=fit,
        critical_interval=(150.0, 600.0),
    )
    at_ref = preds[1]
    assert at_ref.steps == pytest.approx(1200.0)
    assert at_ref.steps_interval == pytest.approx((1200.0, 1200.0))
    for p in preds:
        low, high = p.steps_interval
        assert low <= p.steps <= high
        assert p.wall_s == pytest.approx(p.steps * p.step_time_s)
    assert preds[0].steps_interval[0] < preds[0].steps_interval[1]


def test_unbounded_interval_is_perfect_scaling_from_the_reference():
    fit = StepTimeFit(0.01, 0.0, (1.0,), (0.01,), 0.0)
    (p,) = predict(
        [512],
        target=Target(1000.0, reference_batch=64),
        critical_batch=B_CRIT,
        step_time=fit,
        critical_interval=(100.0, math.inf),
    )
    assert p.steps_interval[0] == pytest.approx(1000.0 * 64 / 512)


def test_fastest_matches_the_closed_form_optimum():
    """wall = S_min (1 + Bc/B)(a + c B) is least at B* = sqrt(a Bc / c)."""
    a, c = 0.004, 1e-5
    fit = StepTimeFit(a, c, (1.0, 1e6), (a + c, a + c * 1e6), 0.0)
    sizes = list(range(10, 2000))
    best = fastest(predict(sizes, target=Target(S_MIN), critical_batch=B_CRIT, step_time=fit))
    assert best.batch_size == pytest.approx(math.sqrt(a * B_CRIT / c), abs=1)


def test_cheapest_uses_fewer_devices_than_fastest():
    """Without communication cost, d t(B/d) = d a + c B grows with d: one device is cheapest."""
    a, c = 0.004, 1e-5
    fit = StepTimeFit(a, c, (1.0, 1e6), (a + c, a + c * 1e6), 0.0)
    sizes = candidate_batches(8, 4096)
    preds = [
        p
        for d in device_counts(8)
        for p in predict(
            sizes, target=Target(S_MIN), critical_batch=B_CRIT, step_time=fit, devices=d
        )
    ]
    fast, cheap = recommend(preds, critical_batch=B_CRIT, base_batch=64, base_lr=0.1)
    assert fast.prediction.devices == 8 and cheap.prediction.devices == 1
    assert cheap.prediction == cheapest(preds)
    assert cheap.prediction.device_hours <= min(p.device_hours for p in preds)
    assert fast.advice is not None and fast.advice.result.rule == "critical"
    adam = recommend(preds, critical_batch=B_CRIT, base_batch=64, base_lr=1e-3, optimizer="adam")
    assert adam[0].advice.result.rule == "surge"
    k = adam[0].prediction.batch_size / 64
    assert adam[0].advice.result.beta2 == pytest.approx(0.999**k)


def test_prediction_inputs_are_checked():
    fit = StepTimeFit(0.01, 0.0, (1.0,), (0.01,), 0.0)
    with pytest.raises(ValueError, match="critical_interval"):
        predict(
            [64],
            target=Target(10.0),
            critical_batch=100.0,
            step_time=fit,
            critical_interval=(200.0, 400.0),
        )
    with pytest.raises(ValueError, match="devices"):
        predict([64], target=Target(10.0), critical_batch=100.0, step_time=fit, devices=0)
    with pytest.raises(ValueError, match="target_steps"):
        Target(0.0)


def test_throughput_table_round_trips_and_refuses_bad_files():
    table = ThroughputTable(
        device="cpu",
        task="t",
        optimizer="sgd",
        batch_sizes=(8, 64),
        seconds=(0.001, 0.002),
        spread=(0.0, 0.0001),
        repeats=5,
        warmup_steps=2,
        max_batch=1000,
        max_batch_source="given",
        peak_memory=(None, None),
    )
    again = ThroughputTable.from_dict(table.to_dict())
    assert again == table
    bad = table.to_dict() | {"seconds": [0.001]}
    with pytest.raises(ValueError, match="seconds"):
        ThroughputTable.from_dict(bad)
    with pytest.raises(ValueError, match="not a batchlab-throughput"):
        ThroughputTable.from_dict({"device": "cpu"})
    with pytest.raises(ValueError, match="max_batch"):
        ThroughputTable.from_dict(table.to_dict() | {"max_batch": "lots"})


def test_advice_costs_follow_the_steps_ratio():
    a = advise(100, 0.1, 400, n_train=10_000, epochs=2, noise_scale=100.0)
    fit = StepTimeFit(0.01, 1e-4, (1.0,), (0.0101,), 0.0)
    c = advice_costs(a, fit, devices=2)
    t0, t1 = 0.01 + 1e-4 * 50, 0.01 + 1e-4 * 200
    assert c["step_time_s"] == pytest.approx([t0, t1])
    assert c["wall_s"] == pytest.approx([200 * t0, 50 * t1])
    assert c["same_loss_wall_s"][1] == pytest.approx(200 * a.steps_ratio * t1)
    assert c["device_hours"][0] == pytest.approx(200 * t0 * 2 / 3600)
    assert "wall_s" not in advice_costs(advise(100, 0.1, 400), fit)


def test_interval_from_zero_means_the_target_steps_at_every_batch():
    """A noise trace not resolved from zero gives B_crit in [0, high]: at B_crit = 0 every batch
    needs the reference batch's steps (S = S_min), so that is one end of each steps interval."""
    fit = StepTimeFit(0.01, 0.0, (1.0,), (0.01,), 0.0)
    target = Target(300.0, reference_batch=32)
    preds = predict([8, 32, 512], target=target, critical_batch=45.0, step_time=fit,
                    critical_interval=(0.0, 70.0))  # fmt: skip
    for p in preds:
        ends = [300.0, target.steps_at(p.batch_size, 45.0), target.steps_at(p.batch_size, 70.0)]
        assert p.steps_interval == pytest.approx((min(ends), max(ends)))
    assert preds[1].steps == pytest.approx(300.0)  # at the reference batch, the target itself
    assert preds[0].steps_interval[0] == pytest.approx(300.0)  # small batch: B_crit=0 is fewest
