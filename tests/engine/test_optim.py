"""The optimizer registry: one entry per name, vectorized updates equal to torch.optim's, and
per-parameter-group learning rates that keep their ratios under a schedule and the range test."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from batchlab.core import schedules
from batchlab.core.rules import OPTIMIZERS
from batchlab.engine import optim
from batchlab.engine.lr_finder import lr_range_test
from batchlab.engine.spec import RunSpec, SpecError
from batchlab.engine.torch_schedule import ScheduleLR


def test_registry_holds_exactly_the_names_core_knows():
    assert tuple(optim.REGISTRY) == OPTIMIZERS
    assert [e.adaptive for e in optim.REGISTRY.values()] == [n != "sgd" for n in OPTIMIZERS]


@pytest.mark.parametrize(
    ("name", "extra"),
    [
        ("sgd", {"momentum": 0.9, "weight_decay": 1e-2}),
        ("sgd", {"momentum": 0.9, "nesterov": True}),
        ("adam", {"weight_decay": 1e-2, "beta1": 0.8}),
        ("adamw", {"weight_decay": 1e-1, "beta2": 0.99, "eps": 1e-6}),
    ],
)
def test_vectorized_update_matches_torch_for_each_member(name: str, extra: dict) -> None:
    """Two members with different lrs, 5 steps on fixed gradients: each row equals torch.optim."""
    specs = [
        RunSpec(task="digits-mlp", batch_size=8, optimizer=name, lr=lr, **extra)
        for lr in (0.1, 0.03)
    ]
    gen = torch.Generator().manual_seed(0)
    start = torch.randn(2, 7, generator=gen)
    grads = [torch.randn(2, 7, generator=gen) for _ in range(5)]
    flat = start.clone()
    vec = optim.VectorizedOptimizer(specs, flat)
    lr = torch.tensor([[s.lr] for s in specs])
    for g in grads:
        vec.step(flat, g, lr)
    for k, spec in enumerate(specs):
        p = nn.Parameter(start[k].clone())
        ref = optim.REGISTRY[name].cls(
            [p],
            lr=spec.lr,
            weight_decay=spec.weight_decay,
            **optim.REGISTRY[name].spec_options(spec),
        )
        for g in grads:
            p.grad = g[k].clone()
            ref.step()
        torch.testing.assert_close(flat[k], p.detach(), rtol=1e-5, atol=1e-6)


def test_keep_drops_rows_of_state():
    specs = [
        RunSpec(task="digits-mlp", batch_size=8, optimizer="adam", lr=lr) for lr in (0.1, 0.2, 0.3)
    ]
    flat = torch.zeros(3, 4)
    vec = optim.VectorizedOptimizer(specs, flat)
    vec.step(flat, torch.ones(3, 4), torch.full((3, 1), 0.1))
    vec.keep([0, 2])
    assert vec.s1.shape == vec.s2.shape == (2, 4)
    assert all(v.shape[0] == 2 for v in vec.hyper.values())


def test_build_names_the_field_on_bad_input():
    params = [nn.Parameter(torch.zeros(2))]
    with pytest.raises(SpecError, match="must be one of sgd, adam, adamw") as err:
        optim.build("lion", params, 0.1)
    assert err.value.field == "optimizer"
    with pytest.raises(SpecError, match="bad option for sgd") as err:
        optim.build("sgd", params, 0.1, betas=(0.9, 0.99))
    assert err.value.field == "optimizer"


def _two_groups(head_lr: float = 0.1, body_lr: float = 0.01) -> torch.optim.Optimizer:
    a, b = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.zeros(2))
    return torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": body_lr}], lr=head_lr)


def test_one_schedule_keeps_each_groups_ratio_to_the_largest():
    opt = _two_groups()
    sched = ScheduleLR(opt, schedules.linear_schedule(1.0, 0.0, 4))
    seen: list[float] = []
    for _ in range(3):
        seen.extend(g["lr"] for g in opt.param_groups)
        opt.step()
        sched.step()
    assert seen == pytest.approx([1.0, 0.1, 0.75, 0.075, 0.5, 0.05])


def test_range_test_ramps_every_group_in_proportion():
    """A caller's optimizer with a 10x smaller body lr: the body sees the ramp / 10, and both
    groups get their own lr back afterwards."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 1))
    opt = torch.optim.SGD(
        [{"params": model[0].parameters(), "lr": 0.01}, {"params": model[1].parameters()}], lr=0.1
    )
    seen: list[list[float]] = []
    original = opt.step

    def step(*args, **kwargs):
        seen.append([g["lr"] for g in opt.param_groups])
        return original(*args, **kwargs)

    opt.step = step  # type: ignore[method-assign]
    x, y = torch.randn(64, 4), torch.randn(64)
    lr_range_test(
        model,
        lambda out, t: ((out.squeeze(-1) - t) ** 2).mean(),
        (x, y),
        optimizer=opt,
        batch_size=16,
        start_lr=1e-4,
        end_lr=1e-2,
        steps=5,
    )
    assert [body / head for body, head in seen] == pytest.approx([0.1] * len(seen))
    assert seen[0][1] == pytest.approx(1e-4) and seen[-1][1] == pytest.approx(1e-2)
    assert [g["lr"] for g in opt.param_groups] == [0.01, 0.1]
