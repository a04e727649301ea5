"""Adaptive batch size: the library object in a plain loop, resuming it, and the engine's runs."""

from __future__ import annotations

import io

import pytest
import torch
from torch import nn

from batchlab.core.adaptive import AdaptiveSettings
from batchlab.engine.adaptive import AdaptiveBatch
from batchlab.engine.monitor import GradientNoiseScale
from batchlab.engine.spec import HistoryKey as H
from batchlab.engine.spec import RunSpec, SpecError
from batchlab.engine.train import train

N = 2048


def data() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(N, 8, generator=gen)
    y = (x[:, 0] + 0.5 * torch.randn(N, generator=gen) > 0).long()
    return x, y


def setup(lr: float = 0.1) -> tuple[nn.Module, torch.optim.Optimizer, AdaptiveBatch]:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    gns = GradientNoiseScale(model, "per_example", loss_fn=nn.functional.cross_entropy, window=4)
    settings = AdaptiveSettings(base_batch=4, base_lr=lr, rule="linear", n_train=N)
    return model, opt, AdaptiveBatch(gns, settings, optimizer=opt, every=4)


def steps(model, opt, ada, first: int, last: int) -> None:
    x, y = data()
    for step in range(first, last + 1):
        idx = torch.randperm(N, generator=torch.Generator().manual_seed(step))[: ada.batch_size]
        opt.zero_grad()
        ada.forward_backward(x[idx], y[idx])
        opt.step()
        ada.update(step)


def test_grows_in_a_plain_loop_and_sets_every_groups_lr() -> None:
    model, opt, ada = setup()
    steps(model, opt, ada, 1, 60)
    assert ada.changes, "the batch never grew"
    assert ada.batch_size > 4 and ada.batch_size % 4 == 0
    first = ada.changes[0]
    assert first["previous_batch_size"] == 4 and first["step"] % 4 == 0
    assert first["noise_scale"] >= 2 * 4
    # the linear rule: lr x (B / B0), written into the optimizer
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 * ada.batch_size / 4)


def test_state_dict_resumes_the_same_decisions() -> None:
    whole = setup()
    steps(*whole, 1, 60)

    model, opt, ada = setup()
    steps(model, opt, ada, 1, 44)  # one change before (step 40), two after
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict(), "ada": ada.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    model, opt, ada = setup()
    model.load_state_dict(saved["model"])
    opt.load_state_dict(saved["opt"])
    ada.load_state_dict(saved["ada"])
    steps(model, opt, ada, 45, 60)

    assert ada.changes == whole[2].changes
    assert ada.state == whole[2].state
    for a, b in zip(model.parameters(), whole[0].parameters(), strict=True):
        torch.testing.assert_close(a, b)


def test_load_refuses_other_settings() -> None:
    _, _, ada = setup()
    state = ada.state_dict()
    _, _, other = setup(lr=0.2)
    with pytest.raises(SpecError) as err:
        other.load_state_dict(state)
    assert err.value.field == "state_dict"


def test_micro_batches_give_the_one_pass_gradient() -> None:
    x, y = data()
    grads = []
    for memory in (None, 16):
        torch.manual_seed(1)
        model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
        gns = GradientNoiseScale(model, "per_example", loss_fn=nn.functional.cross_entropy)
        s = AdaptiveSettings(base_batch=64, base_lr=0.1, memory_batch=memory)
        ada = AdaptiveBatch(gns, s)
        loss = ada.forward_backward(x[:64], y[:64])
        grads.append(([p.grad.clone() for p in model.parameters()], loss))
    assert AdaptiveSettings(base_batch=64, base_lr=0.1, memory_batch=16).limit > 64
    for a, b in zip(grads[0][0], grads[1][0], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-5, atol=1e-7)


def adaptive_spec(**kw) -> RunSpec:
    fields = {
        "task": "digits-mlp",
        "batch_size": 8,
        "lr": 0.05,
        "budget_unit": "steps",
        "budget": 120,
        "eval_every": 10,
        "noise_scale": True,
        "adaptive_batch": True,
        "adaptive_options": {"every": 8, "rule": "linear", "max_batch": 256},
    }
    return RunSpec(**{**fields, **kw})


def test_train_grows_the_batch_and_logs_each_change() -> None:
    result = train(adaptive_spec(), device="cpu")
    assert result.status == "ok"
    log = result.extra["adaptive_batch"]
    assert log["rule"] == "linear" and log["changes"]
    sizes = [8] + [c["batch_size"] for c in log["changes"]]
    assert sizes == sorted(set(sizes)) and log["final_batch_size"] == sizes[-1] <= 256
    for c in log["changes"]:
        assert c["lr"] == pytest.approx(0.05 * c["batch_size"] / 8)
        assert c["noise_scale"] >= 2 * c["previous_batch_size"]
    # the history follows: each row's batch and lr are the ones in force at that step
    for row in result.history[1:]:
        earlier = [c for c in log["changes"] if c["step"] < row[H.STEP]]
        batch = earlier[-1]["batch_size"] if earlier else 8
        assert row[H.BATCH_SIZE] == batch
        assert row[H.LR] == pytest.approx(0.05 * batch / 8)
    assert result.samples > 120 * 8 and result.steps == 120


def test_epoch_budget_ends_on_samples_with_fewer_steps() -> None:
    spec = adaptive_spec(budget_unit="epochs", budget=1.0)
    result = train(spec, device="cpu")
    n = result.extra["n_train"]
    assert n <= result.samples < n + result.extra["adaptive_batch"]["final_batch_size"]
    assert result.steps < -(-n // 8)  # fewer than a fixed batch of 8 needs


def test_spec_fields() -> None:
    plain = RunSpec(task="digits-mlp", batch_size=8, lr=0.1)
    assert "adaptive_batch" not in plain.to_dict()  # old ids are kept
    spec = adaptive_spec()
    assert RunSpec.from_dict(spec.to_dict()) == spec
    assert spec.run_id != spec.replace(adaptive_options={"every": 4}).run_id
    for kw, field in [
        ({"noise_scale": False}, "adaptive_batch"),
        ({"adaptive_options": {"growth": 2}}, "adaptive_options.growth"),
        ({"adaptive_options": {"factor": 0.5}}, "adaptive_options.factor"),
        ({"adaptive_options": {"every": 0}}, "adaptive_options.every"),
        ({"batch_schedule": ((1, 16),)}, "batch_schedule"),
        ({"adaptive_batch": False}, "adaptive_options"),
        (
            {"micro_batch_size": 4, "adaptive_options": {"shrink": True, "min_batch": 4}},
            "adaptive_options.min_batch",
        ),
    ]:
        with pytest.raises(SpecError) as err:
            adaptive_spec(**kw)
        assert err.value.field == field
