"""The torch adapter matches torch's own schedulers; plans fill a RunSpec the engine runs as planned."""

from __future__ import annotations

import io
import math

import pytest
import torch
from torch.optim import lr_scheduler as tl

from batchlab.core import schedules
from batchlab.engine import train
from batchlab.engine.spec import RunSpec
from batchlab.engine.torch_schedule import ScheduleLR, lr_scheduler

LR, T = 0.4, 100


def _optimizer(groups: int = 1) -> torch.optim.Optimizer:
    params = [{"params": [torch.zeros(1, requires_grad=True)]} for _ in range(groups)]
    return torch.optim.SGD(params, lr=LR)


def _lrs(optimizer: torch.optim.Optimizer, scheduler: tl.LRScheduler, steps: int) -> list[float]:
    out = []
    for _ in range(steps):
        out.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return out


@pytest.mark.parametrize(
    ("name", "options", "reference"),
    [
        ("constant", {}, lambda o: tl.ConstantLR(o, factor=1.0)),
        ("cosine", {"final_factor": 0.1}, lambda o: tl.CosineAnnealingLR(o, T, eta_min=0.1 * LR)),
        ("linear", {"final_factor": 0.0}, lambda o: tl.LinearLR(o, 1.0, 0.0, total_iters=T)),
        (
            "exponential",
            {"final_factor": 0.01},
            lambda o: tl.ExponentialLR(o, gamma=0.01 ** (1 / T)),
        ),
        ("step", {"step_size": 0.25, "gamma": 0.5}, lambda o: tl.StepLR(o, 25, gamma=0.5)),
        (
            "multistep",
            {"milestones": (0.3, 0.6, 0.9), "gamma": 0.1},
            lambda o: tl.MultiStepLR(o, [30, 60, 90], gamma=0.1),
        ),
    ],
)
def test_matches_torch_schedulers(name, options, reference):
    """Same lr at every step of the budget (past it torch's cosine restarts; ours holds the end)."""
    ours_opt, ref_opt = _optimizer(), _optimizer()
    ours = _lrs(ours_opt, lr_scheduler(ours_opt, name, LR, T, **options), T + 1)
    ref = _lrs(ref_opt, reference(ref_opt), T + 1)
    assert ours == pytest.approx(ref, rel=1e-6, abs=1e-12)


def test_warmup_then_cosine_step_by_step():
    opt = _optimizer()
    lrs = _lrs(opt, lr_scheduler(opt, "cosine", LR, T, warmup_steps=10), T)
    expected = schedules.build_lr_schedule("cosine", LR, T, warmup_steps=10)
    assert lrs == [expected(t) for t in range(T)]
    assert lrs[5] == pytest.approx(LR / 2) and lrs[10] == LR


def test_one_schedule_per_group():
    opt = _optimizer(groups=2)
    sched = ScheduleLR(opt, [schedules.constant_schedule(1.0), schedules.linear_schedule(1, 0, 4)])
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [1.0, 0.75]
    with pytest.raises(ValueError, match=r"^schedule: need one schedule per parameter group"):
        ScheduleLR(_optimizer(groups=2), [schedules.constant_schedule(1.0)])


def test_state_dict_round_trip_resumes_the_schedule():
    build = {"name": "multistep", "lr": LR, "total_steps": T, "milestones": (0.1,)}
    opt = _optimizer()
    sched = lr_scheduler(opt, **build)
    assert _lrs(opt, sched, 8)[:3] == [LR] * 3
    buffer = io.BytesIO()
    torch.save({"opt": opt.state_dict(), "sched": sched.state_dict()}, buffer)  # no closures
    buffer.seek(0)
    state = torch.load(buffer)
    resumed_opt = _optimizer()
    resumed = lr_scheduler(resumed_opt, **build)  # before the optimizer's state, as torch asks
    resumed_opt.load_state_dict(state["opt"])
    resumed.load_state_dict(state["sched"])
    assert resumed.last_epoch == sched.last_epoch == 8
    assert _lrs(resumed_opt, resumed, 5) == _lrs(opt, sched, 5)


def test_plans_fill_a_run_spec():
    grow = schedules.increase_batch(0.1, 16, [3, 6], 0.5, epochs=10, n_train=1437, max_batch=50)
    spec = RunSpec(task="digits-mlp", momentum=0.9, **grow.spec_fields())
    assert spec.batch_schedule == ((3.0, 32), (6.0, 50))
    assert spec.schedule == "multistep" and spec.option("milestones") == (0.6,)
    stretch = schedules.regime_adaptation(
        0.1,
        16,
        64,
        epochs=5,
        n_train=1437,
        schedule="cosine",
        schedule_options={"final_factor": 0.1},
    )
    spec2 = spec.replace(**stretch.spec_fields())
    assert (spec2.batch_size, spec2.budget, spec2.batch_schedule) == (64, 20.0, ())
    assert spec2.option("final_factor") == 0.1


def test_engine_keeps_noise_temperature_of_increase_batch():
    """Walk the engine's own plan step by step: lr / B equals the step-decay original's lr / B0."""
    n, b0, milestones, gamma = 1437, 10, [2, 5, 7], 0.3
    plan = schedules.increase_batch(0.1, b0, milestones, gamma, epochs=9, n_train=n, max_batch=300)
    spec = RunSpec(task="digits-mlp", **plan.spec_fields())
    p = train.plan(spec, n)
    lr_at = train.lr_schedule(spec, p)
    samples = 0
    while samples < p.total_samples:
        epoch = samples / n
        batch = train.batch_size_in_force(spec, epoch)
        original = 0.1 * gamma ** sum(epoch >= m for m in milestones)
        assert math.isclose(lr_at(samples / b0) / batch, original / b0, rel_tol=1e-9), epoch
        samples += batch
