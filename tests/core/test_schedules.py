"""LR schedules (closed forms, properties, edge cases, option errors) and batch-size schedules."""

from __future__ import annotations

import itertools
import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from batchlab.core import schedules as s
from batchlab.core.rules import noise_temperature


def close(a: float, b: float, rel: float = 1e-12) -> bool:
    return math.isclose(a, b, rel_tol=rel, abs_tol=1e-15)


# ------------------------------------------------------------------------------------------------
# Building blocks against closed forms


def test_building_blocks_closed_forms():
    cos = s.cosine_schedule(1.0, 0.0, 90)
    assert close(cos(30), 0.75)  # 0.5 (1 + cos(pi/3))
    assert close(cos(45), 0.5) and cos(90) == 0.0 and cos(1e9) == 0.0
    assert close(s.cosine_schedule(2.0, 1.0, 10)(5), 1.5)
    exp = s.exponential_schedule(0.5, 0.02, 7)
    assert close(exp(3.5), math.sqrt(0.5 * 0.02))  # geometric mean at the midpoint
    lin = s.linear_schedule(1.0, 0.2, 8)
    assert close(lin(2), 0.8) and lin(-3) == 1.0 and lin(100) == 0.2
    multi = s.multistep_schedule(3.0, [10, 20, 20], [0.5, 0.1, 2.0])
    assert [multi(t) for t in (0, 9.99, 10)] == [3.0, 3.0, 1.5]
    assert close(multi(20), 0.3) and close(multi(1e6), 0.3)
    step = s.step_schedule(1.0, 2.5, 0.5)
    assert [step(t) for t in (0, 2.4, 2.5, 5, 7.49)] == [1.0, 1.0, 0.5, 0.25, 0.25]


@pytest.mark.parametrize("builder", [s.linear_schedule, s.cosine_schedule, s.exponential_schedule])
def test_zero_length_transition_is_its_start_value(builder):
    f = builder(0.3, 0.1, 0)
    assert f(0) == f(5) == 0.3


def test_join_schedules_counts_steps_from_each_boundary():
    f = s.join_schedules([s.constant_schedule(9.0), s.linear_schedule(0.0, 10.0, 10)], [5])
    assert [f(t) for t in (-1, 0, 4.9, 5, 10, 15, 30)] == [9.0, 9.0, 9.0, 0.0, 5.0, 10.0, 10.0]
    with pytest.raises(ValueError, match=r"^schedules: "):
        s.join_schedules([s.constant_schedule(1.0)], [3])
    with pytest.raises(ValueError, match=r"^boundaries: "):
        s.join_schedules([s.constant_schedule(1.0)] * 3, [5, 2])


def test_with_warmup_ramps_to_the_schedule_start():
    f = s.with_warmup(s.linear_schedule(2.0, 0.0, 10), 4, start_factor=0.5)
    assert [f(t) for t in (0, 2, 4, 9, 14)] == [1.0, 1.5, 2.0, 1.0, 0.0]
    g = s.with_warmup(s.constant_schedule(1.0), 3, kind="exponential", start_factor=0.001)
    assert close(g(1), 0.01) and close(g(2), 0.1) and g(3) == 1.0
    base = s.constant_schedule(1.0)
    assert s.with_warmup(base, 0) is base
    with pytest.raises(ValueError, match=r"^start_factor: "):
        s.with_warmup(base, 3, kind="exponential", start_factor=0.0)
    with pytest.raises(ValueError, match=r"^warmup: "):
        s.with_warmup(base, 3, kind="cosine")


# ------------------------------------------------------------------------------------------------
# build_lr_schedule: what the engine calls

OPTIONS = {
    "constant": {},
    "cosine": {"final_factor": 0.1},
    "linear": {"final_factor": 0.0},
    "exponential": {"final_factor": 0.01},
    "step": {"step_size": 0.25, "gamma": 0.5},
    "multistep": {"milestones": (0.3, 0.6, 0.9), "gamma": 0.2},
}


def test_every_schedule_has_its_options_declared():
    assert set(s.SCHEDULE_OPTIONS) == set(s.LR_SCHEDULES) == set(OPTIONS)
    for name in s.LR_SCHEDULES:
        assert set(s.resolve_schedule_options(name, {})) == {
            *s.SCHEDULE_OPTIONS[name],
            "warmup_start",
        }


@pytest.mark.parametrize("name", s.LR_SCHEDULES)
@pytest.mark.parametrize("kind", s.WARMUPS)
@given(
    lr=st.floats(1e-5, 10.0),
    total=st.floats(1.0, 1e5),
    warm_frac=st.one_of(st.just(0.0), st.floats(1e-3, 0.5)),
    start=st.floats(0.01, 1.0),
)
@settings(max_examples=40, deadline=None)
def test_schedule_shape(name, kind, lr, total, warm_frac, start):
    """The lr rises from start * lr over [0, W), never rises after W, and stays in [0, lr]."""
    w = warm_frac * total
    f = s.build_lr_schedule(
        name, lr, total, warmup_steps=w, warmup=kind, warmup_start=start, **OPTIONS[name]
    )
    ts = sorted({*(total * i / 97 for i in range(120)), w})
    values = [f(t) for t in ts]
    assert all(0 <= v <= lr * (1 + 1e-12) for v in values)
    assert close(f(0), start * lr if w > 0 else lr)
    rising = [v for t, v in zip(ts, values, strict=True) if t < w]
    falling = [v for t, v in zip(ts, values, strict=True) if t >= w]
    assert all(a <= b * (1 + 1e-12) for a, b in itertools.pairwise(rising))
    assert all(b <= a * (1 + 1e-12) for a, b in itertools.pairwise(falling))
    if name in ("constant", "cosine", "linear", "exponential"):
        assert close(f(w), lr)  # decays start at the end of the warmup: continuous
        final = OPTIONS[name].get("final_factor", 1.0)
        assert close(f(total), final * lr, 1e-9) and close(f(10 * total), final * lr, 1e-9)
    if w > 0 and kind == "linear":
        assert close(f(w / 2), lr * (start + (1 - start) / 2), 1e-9)
    if w > 0 and kind == "exponential":
        assert close(f(w / 2), lr * math.sqrt(start), 1e-9)


def test_step_decays_at_fractions_of_the_whole_budget():
    """Goyal: 90 epochs, decay x0.1 at 30, 60, 80, 5 warmup epochs; milestones stay put."""
    f = s.build_lr_schedule(
        "multistep", 3.2, 900, warmup_steps=50, milestones=[1 / 3, 2 / 3, 8 / 9], gamma=0.1
    )
    assert [f(t) for t in (0, 25, 50, 299)] == [0.0, 1.6, 3.2, 3.2]
    assert close(f(300), 0.32) and close(f(600), 0.032) and close(f(800), 0.0032)
    step = s.build_lr_schedule("step", 1.0, 90)  # default step_size 1/3, gamma 0.1
    assert step(29.9) == 1.0 and close(step(30), 0.1) and close(step(60), 0.01)


def test_milestone_inside_warmup_applies_when_warmup_ends():
    f = s.build_lr_schedule("multistep", 1.0, 100, warmup_steps=20, milestones=[0.1], gamma=0.5)
    assert f(10) == 0.5 and f(19.99) < 1.0 and f(20) == 0.5


def test_edge_cases_are_defined():
    cos = s.build_lr_schedule("cosine", 0.1, 0)  # empty budget: zero-length decay holds the peak
    assert cos(0) == cos(5) == 0.1
    ramp = s.build_lr_schedule("cosine", 0.1, 10, warmup_steps=20)  # warmup longer than the run
    assert close(ramp(5), 0.025) and ramp(20) == 0.1
    assert s.build_lr_schedule("linear", 0.1, 10, warmup_steps=0)(0) == 0.1
    assert s.build_lr_schedule("linear", 0.1, 10)(-5) == 0.1
    assert s.build_lr_schedule("constant", 0.0, 10, warmup_steps=3)(1) == 0.0
    gammas = s.build_lr_schedule("multistep", 1.0, 10, milestones=[0.5, 0.8], gamma=[0.5, 3.0])
    assert gammas(5) == 0.5 and gammas(8) == 1.5


@pytest.mark.parametrize(
    ("name", "options", "field"),
    [
        ("cosine", {"gamma": 0.1}, "schedule_options.gamma"),
        ("constant", {"milestones": [0.5]}, "schedule_options.milestones"),
        ("cosine", {"final_factor": 1.5}, "schedule_options.final_factor"),
        ("exponential", {"final_factor": 0.0}, "schedule_options.final_factor"),
        ("multistep", {"milestones": [0.5, 1.5]}, "schedule_options.milestones"),
        ("multistep", {"milestones": [0.7, 0.5]}, "schedule_options.milestones"),
        ("multistep", {"milestones": 0.5}, "schedule_options.milestones"),
        ("multistep", {"gamma": 0.0}, "schedule_options.gamma"),
        ("multistep", {"gamma": [0.1, 0.1, 0.1]}, "schedule_options.gamma"),
        ("step", {"gamma": [0.1]}, "schedule_options.gamma"),
        ("step", {"step_size": 0.0}, "schedule_options.step_size"),
        ("linear", {"warmup_start": -0.1}, "schedule_options.warmup_start"),
        ("linear", {"final_factor": True}, "schedule_options.final_factor"),
        ("cubic", {}, "schedule"),
    ],
)
def test_bad_options_name_the_key(name, options, field):
    with pytest.raises(ValueError, match=rf"^{field}: "):
        s.build_lr_schedule(name, 0.1, 100, **options)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lr": -0.1}, "lr"),
        ({"total_steps": -1}, "total_steps"),
        ({"total_steps": math.inf}, "total_steps"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"warmup": "cosine"}, "warmup"),
        ({"warmup": "exponential", "warmup_start": 0.0}, "schedule_options.warmup_start"),
    ],
)
def test_bad_arguments_name_the_field(kwargs, field):
    args = {"name": "cosine", "lr": 0.1, "total_steps": 100, **kwargs}
    with pytest.raises(ValueError, match=rf"^{field}: "):
        s.build_lr_schedule(args.pop("name"), args.pop("lr"), args.pop("total_steps"), **args)


# ------------------------------------------------------------------------------------------------
# increase_batch (Smith et al. 2018) and regime_adaptation (Hoffer et al. 2017)


@st.composite
def step_decays(draw):
    epochs = draw(st.integers(4, 200))
    milestones = sorted(draw(st.sets(st.integers(1, epochs - 1), min_size=1, max_size=4)))
    n = draw(st.integers(1000, 200_000))
    b0 = draw(st.integers(1, 512))
    cap = draw(st.one_of(st.none(), st.integers(b0, n)))
    return epochs, milestones, n, b0, cap, draw(st.floats(0.05, 0.95))


@given(case=step_decays(), lr=st.floats(1e-4, 1.0), m=st.floats(0.0, 0.99))
@settings(max_examples=60, deadline=None)
def test_increase_batch_keeps_noise_temperature(case, lr, m):
    """g = lr N / (B (1 - m)) of the plan equals the step-decay original's at every step."""
    epochs, milestones, n, b0, cap, gamma = case
    plan = s.increase_batch(lr, b0, milestones, gamma, epochs=epochs, n_train=n, max_batch=cap)
    epoch_points = {
        *milestones,
        *(e + 0.5 for e in milestones),
        *(epochs * i / 50 for i in range(50)),
    }
    for epoch in sorted(epoch_points):
        original_lr = lr * gamma ** sum(epoch >= e for e in milestones)
        g_original = noise_temperature(original_lr, n, b0, m)
        size = plan.batch_size_at(epoch)
        assert b0 <= size <= (cap or n)
        g_plan = noise_temperature(plan.lr_at(epoch * n / b0), n, size, m)
        assert close(g_plan, g_original, 1e-9), (epoch, size)
    assert plan.updates <= epochs * n / b0 * (1 + 1e-12)


def test_increase_batch_smith_cifar_example():
    """CIFAR-10 schedule: lr 0.1 x0.2 at epochs 60, 120, 160 -> batch x5 up to 5000, then lr x0.3125."""
    plan = s.increase_batch(
        0.1, 128, [60, 120, 160], 0.2, epochs=200, n_train=50_000, max_batch=5000
    )
    assert plan.batch_schedule == ((60.0, 640), (120.0, 3200), (160.0, 5000))
    assert plan.schedule == "multistep" and plan.option("milestones") == (0.8,)
    assert close(plan.option("gamma"), 0.2 * 5000 / 3200)
    assert close(plan.lr_at(200 * 50_000 / 128 - 1), 0.1 * 0.2**3 * 5000 / 128)
    # fewer updates: 60 epochs at 128, 60 at 640, 40 at 3200, 40 at 5000
    expected = 50_000 * (60 / 128 + 60 / 640 + 40 / 3200 + 40 / 5000)
    assert close(plan.updates, expected)


def test_increase_batch_rounds_batches_and_lr_absorbs_it():
    plan = s.increase_batch(0.1, 100, [10, 20], 0.3, epochs=30, n_train=10_000)
    assert plan.batch_schedule == ((10.0, 333), (20.0, 1111))
    gammas = plan.option("gamma")
    assert plan.option("milestones") == (1 / 3, 2 / 3) and len(gammas) == 2
    assert close(gammas[0], 0.3 * 333 / 100) and close(gammas[1], 0.3 * 1111 / 333)
    assert s.increase_batch(0.1, 100, [10], 0.1, epochs=30, n_train=10_000).schedule == "constant"


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"gamma": 1.0}, "gamma"),
        ({"gamma": 0.0}, "gamma"),
        ({"max_batch": 64}, "max_batch"),
        ({"milestones": [10, 40]}, "milestones"),
        ({"milestones": [20, 10]}, "milestones"),
        ({"batch_size": 0}, "batch_size"),
        ({"lr": 0.0}, "lr"),
    ],
)
def test_increase_batch_bad_input(kwargs, field):
    args = {"lr": 0.1, "batch_size": 128, "milestones": [10, 20], "gamma": 0.1, **kwargs}
    with pytest.raises(ValueError, match=rf"^{field}: "):
        s.increase_batch(**args, epochs=30, n_train=10_000)


@pytest.mark.parametrize("name", ["cosine", "multistep", "step"])
def test_regime_adaptation_keeps_updates_and_shape(name):
    """Hoffer et al. 2017: k x the epochs, same number of updates, the same lr curve in steps."""
    lr0, b0, b1, epochs, n, warm = 0.1, 128, 1024, 20, 10_000, 1.0
    plan = s.regime_adaptation(
        lr0,
        b0,
        b1,
        epochs=epochs,
        n_train=n,
        schedule=name,
        schedule_options=OPTIONS[name],
        warmup_epochs=warm,
    )
    assert (plan.batch_size, plan.epochs, plan.warmup_epochs) == (b1, 160.0, 8.0)
    assert close(plan.lr, lr0 * math.sqrt(8))
    assert close(plan.updates, epochs * n / b0) and close(plan.total_steps, epochs * n / b0)
    original = s.build_lr_schedule(
        name, lr0, epochs * n / b0, warmup_steps=warm * n / b0, **OPTIONS[name]
    )
    for t in range(0, math.ceil(plan.total_steps) + 1, 7):
        assert close(plan.lr_at(t) / plan.lr, original(t) / lr0, 1e-9)


def test_batch_size_at_and_spec_fields():
    sched = [(30.0, 640), (60.0, 3200)]
    assert [s.batch_size_at(128, sched, e) for e in (0, 29.99, 30, 59, 60, 90)] == [
        128,
        128,
        640,
        640,
        3200,
        3200,
    ]
    plan = s.increase_batch(0.1, 128, [30, 60], 0.2, epochs=90, n_train=50_000)
    fields = plan.spec_fields()
    assert fields["batch_schedule"] == ((30.0, 640), (60.0, 3200))
    assert (fields["budget_unit"], fields["budget"], fields["schedule"]) == (
        "epochs",
        90.0,
        "constant",
    )
