"""The training engine: determinism, budgets, divergence, accumulation, ensembles vs solo runs."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from batchlab.engine.spec import RunSpec, SpecError
from batchlab.engine.tasks import Task
from batchlab.engine.train import (
    ENSEMBLE_ROWS,
    _Solo,
    batch_size_in_force,
    can_vectorize,
    ensemble_chunks,
    ensemble_key,
    plan,
    train,
    train_ensemble,
)


def _mlp(seed: int) -> nn.Module:
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3))


def _accuracy(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return (logits.argmax(-1) == y).float().mean()


@pytest.fixture(scope="module")
def task() -> Task:
    """A small 3-class problem with a linear teacher: fast and learnable."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(600, 8, generator=g)
    y = (x @ torch.randn(8, 3, generator=g)).argmax(-1)
    return Task(
        name="toy",
        make_model=_mlp,
        x_train=x[:512],
        y_train=y[:512],
        x_val=x[512:],
        y_val=y[512:],
        loss_fn=F.cross_entropy,
        metric=_accuracy,
    )


def spec(**kw) -> RunSpec:
    base = {"task": "toy", "batch_size": 32, "lr": 0.1, "budget_unit": "steps", "budget": 40}
    return RunSpec(**(base | kw))


def test_same_spec_same_numbers(task):
    a, b = train(spec(momentum=0.9), task=task), train(spec(momentum=0.9), task=task)
    assert a.status == "ok"
    assert a.history == [dict(r, wall_s=a.history[i]["wall_s"]) for i, r in enumerate(b.history)]
    assert a.final == b.final


def test_seed_changes_init_and_order(task):
    a, b = train(spec(seed=0), task=task), train(spec(seed=1), task=task)
    assert a.final["train_loss"] != b.final["train_loss"]


def test_training_learns_and_history_is_complete(task):
    r = train(spec(budget=200, eval_every=50, momentum=0.9), task=task)
    steps = [row["step"] for row in r.history]
    assert steps == [0, 50, 100, 150, 200]
    assert r.steps == 200 and r.samples == 200 * 32
    assert r.history[-1]["epoch"] == pytest.approx(200 * 32 / 512)
    assert math.isnan(r.history[0]["train_loss"])
    assert r.history[-1]["val_loss"] < r.history[0]["val_loss"]
    assert r.final["train_metric"] > 0.8
    assert set(r.history[0]) >= {"step", "samples", "epoch", "lr", "batch_size", "wall_s"}


@pytest.mark.parametrize(
    ("unit", "budget", "steps", "samples"),
    [("epochs", 2, 32, 1024), ("samples", 100, 4, 128), ("steps", 7, 7, 224)],
)
def test_budget_units(task, unit, budget, steps, samples):
    p = plan(spec(budget_unit=unit, budget=budget), task.n_train)
    assert (p.total_steps, p.total_samples) == (steps, samples)


def test_batch_schedule_grows_the_batch(task):
    s = spec(budget_unit="epochs", budget=2, batch_schedule=((1.0, 128),))
    assert batch_size_in_force(s, 0.5) == 32 and batch_size_in_force(s, 1.0) == 128
    p = plan(s, task.n_train)
    assert p.total_steps == 16 + 4  # one epoch at 32, one at 128
    r = train(s, task=task)
    assert r.samples == 1024 and r.history[-1]["batch_size"] == 128


def test_divergence_is_a_result(task):
    r = train(spec(lr=1e4, momentum=0.9), task=task)
    assert r.status == "diverged"
    assert r.diverged_at is not None and r.diverged_at <= 40
    assert r.steps == r.diverged_at
    assert all(math.isnan(v) for v in r.final.values())


def test_bad_specs_raise_before_training(task):
    with pytest.raises(SpecError, match="batch_size"):
        plan(spec(batch_size=1000), task.n_train)
    with pytest.raises(SpecError, match="micro_batch_size"):
        RunSpec(task="toy", batch_size=30, lr=0.1, micro_batch_size=7)
    with pytest.raises(SpecError, match="budget"):
        spec(budget=2.5)
    with pytest.raises(SpecError, match="nesterov"):
        spec(nesterov=True)
    assert spec(lr=1).run_id == spec(lr=1.0).run_id


def test_failure_in_the_model_is_recorded(task):
    def broken(seed: int) -> nn.Module:
        return nn.Linear(5, 3)  # wrong input width: fails at the first forward

    r = train(spec(), task=Task(**{**task.__dict__, "make_model": broken}))
    assert r.status == "failed" and "RuntimeError" in r.error


def test_accumulation_equals_one_big_batch(task):
    """Batch 256 as 4 x 64 gives the same update as one batch of 256."""
    big = _Solo(task, spec(batch_size=256), torch.device("cpu"))
    acc = _Solo(task, spec(batch_size=256, micro_batch_size=64), torch.device("cpu"))
    idx = torch.randperm(512)[:256]
    for _ in range(3):
        la, lb = big.step([idx], [0.5]), acc.step([idx], [0.5])
        assert torch.allclose(la, lb, rtol=1e-5)
    for pa, pb in zip(big.model.parameters(), acc.model.parameters(), strict=True):
        assert torch.allclose(pa, pb, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "opt",
    [
        {"optimizer": "sgd", "momentum": 0.9, "nesterov": True, "weight_decay": 1e-3},
        {"optimizer": "sgd"},
        {"optimizer": "adam", "weight_decay": 1e-3},
        {"optimizer": "adamw", "weight_decay": 0.1, "beta2": 0.99},
    ],
)
def test_ensemble_member_equals_solo_run(task, opt):
    specs = [
        spec(lr=lr, seed=seed, **opt, budget=30, eval_every=10, schedule="constant")
        for lr in ((0.01, 0.1) if opt["optimizer"] == "sgd" else (1e-3, 1e-2))
        for seed in (0, 1)
    ]
    assert len({ensemble_key(s) for s in specs}) == 1
    together = train_ensemble(specs, task=task, device="cpu")
    assert {r.extra["ensemble_size"] for r in together} == {4}
    for s, r in zip(specs, together, strict=True):
        alone = train(s, task=task)
        assert r.status == alone.status == "ok"
        for a, b in zip(r.history, alone.history, strict=True):
            assert a["step"] == b["step"]
            assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
        assert r.final["train_loss"] == pytest.approx(alone.final["train_loss"], rel=1e-4)


def test_diverged_member_is_masked_while_others_go_on(task):
    specs = [spec(lr=lr, momentum=0.9) for lr in (0.05, 1e4, 0.1)]
    rs = train_ensemble(specs, task=task)
    assert [r.status for r in rs] == ["ok", "diverged", "ok"]
    for s, r in zip(specs, rs, strict=True):
        if r.status == "ok":
            assert r.final["val_loss"] == pytest.approx(
                train(s, task=task).final["val_loss"], rel=1e-4
            )


def test_ensemble_splits_by_batch_size_and_keeps_order(task):
    specs = [spec(batch_size=b, lr=0.1, seed=s) for b in (16, 64) for s in (0, 1)]
    rs = train_ensemble(specs, task=task, max_members=8)
    assert [r.spec for r in rs] == specs
    assert [r.extra["ensemble_size"] for r in rs] == [2, 2, 2, 2]


def test_models_with_buffers_fall_back_to_solo(task):
    def with_bn(seed: int) -> nn.Module:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.Linear(16, 3))

    bn_task = Task(**{**task.__dict__, "make_model": with_bn})
    ok, why = can_vectorize(bn_task)
    assert not ok and "buffers" in why
    rs = train_ensemble([spec(lr=0.1), spec(lr=0.05)], task=bn_task)
    assert [r.status for r in rs] == ["ok", "ok"]
    assert [r.extra["ensemble_size"] for r in rs] == [1, 1]


def test_keep_weights_returns_the_final_state(task):
    r = train(spec(), task=task, keep_weights=True)
    model = _mlp(0)
    model.load_state_dict(r.weights)
    with torch.no_grad():
        loss = F.cross_entropy(model(task.x_val), task.y_val).item()
    assert loss == pytest.approx(r.final["val_loss"], rel=1e-5)
    [member] = train_ensemble([spec(), spec(lr=0.2)], task=task, keep_weights=True)[:1]
    assert member.weights.keys() == r.weights.keys()


@pytest.mark.parametrize("micro", [None, 8])
def test_noise_scale_is_logged_without_changing_the_run(task, micro):
    plain = train(spec(momentum=0.9, micro_batch_size=micro, eval_every=10), task=task)
    measured = train(
        spec(momentum=0.9, micro_batch_size=micro, eval_every=10, noise_scale=True), task=task
    )
    assert measured.final["train_loss"] == pytest.approx(plain.final["train_loss"], rel=1e-5)
    values = [row["noise_scale"] for row in measured.history[1:]]
    assert all(v is not None and v > 0 for v in values)
    assert all(row["noise_scale"] is None for row in plain.history)
    summary = measured.extra["noise_scale"]
    assert summary["end"]["low"] <= summary["end"]["value"] <= summary["end"]["high"]
    assert summary["end"]["step"] == 40


def test_chunks_follow_the_ensemble_groups_and_capacity():
    small = [RunSpec(task="t", batch_size=32, lr=lr, seed=s) for lr in (0.1, 0.2) for s in (0, 1)]
    big_b = ENSEMBLE_ROWS // 2  # the engine vectorizes 2 members at this batch size
    big = [RunSpec(task="t", batch_size=big_b, lr=lr) for lr in (0.1, 0.2, 0.3)]
    other = [RunSpec(task="t", batch_size=32, lr=0.1, optimizer="adam")]
    got = ensemble_chunks(small + big + other)
    assert got == [small, big[:2], big[2:], other]


def test_frozen_parameters_train_solo_and_stay_frozen(task):
    def frozen(seed: int) -> nn.Module:
        model = _mlp(seed)
        model[0].weight.requires_grad_(False)
        return model

    frozen_task = Task(**{**task.__dict__, "make_model": frozen})
    ok, why = can_vectorize(frozen_task)
    assert not ok and "frozen" in why
    [r, _] = train_ensemble([spec(), spec(lr=0.2)], task=frozen_task, keep_weights=True)
    assert torch.equal(r.weights["0.weight"], frozen(0)[0].weight)
