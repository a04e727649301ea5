"""The monitor's estimates along real training runs against the exact noise scale at the same weights
(per-example gradients of every training example, torch.func, float64): plain SGD, and Adam's
preconditioned gradient with ``v_hat`` read from the optimizer at each checkpoint."""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from batchlab.core.noise import NoiseEstimate
from batchlab.engine.monitor import GradientNoiseScale
from batchlab.engine.tasks import Task, get_task

BATCH, STEPS, EVERY = 32, 300, 15


@pytest.fixture(scope="module")
def digits() -> Task:
    return get_task("digits-mlp")


def exact_noise_scale(task: Task, model: nn.Module, scales: list[Tensor] | None = None) -> float:
    """``tr(Sigma) / |G|^2`` over all training examples, each gradient times ``scales`` if given."""
    params = {k: v.detach().double() for k, v in model.named_parameters()}
    x = task.x_train.double()

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return task.loss_fn(functional_call(model, p, (xi[None],)), yi[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, task.y_train)
    flat = [g.flatten(1) for g in per_example.values()]
    if scales is not None:
        flat = [g * s.double().flatten() for g, s in zip(flat, scales, strict=True)]
    g = torch.cat(flat, 1)
    mean = g.mean(0)
    grad_sq = float(mean @ mean)
    return (float(g.square().sum(1).mean()) - grad_sq) / grad_sq


def adam_scales(opt: torch.optim.Adam, params: list[Tensor]) -> list[Tensor]:
    """``1 / (sqrt(v_hat) + eps)`` of each parameter from the optimizer's state, 0 where ``v = 0``."""
    group = opt.param_groups[0]
    out = []
    for p in params:
        state = opt.state[p]
        v_hat = state["exp_avg_sq"] / (1 - group["betas"][1] ** float(state["step"]))
        out.append(torch.where(v_hat > 0, 1 / (v_hat.sqrt() + group["eps"]), 0.0))
    return out


def train_and_check(
    task: Task, opt_fn, preconditioned: bool
) -> list[tuple[int, float, NoiseEstimate]]:
    """Train ``STEPS`` steps on epoch permutations; every ``EVERY`` steps the estimate so far and
    the exact value at the current weights (and Adam state)."""
    torch.manual_seed(0)
    model = task.make_model(0)
    params = list(model.parameters())
    opt = opt_fn(params)
    n = task.n_train
    gns = GradientNoiseScale(
        model,
        "per_example",
        loss_fn=task.loss_fn,
        precondition=opt if preconditioned else None,
        population=n,
    )
    gen, out, step = torch.Generator().manual_seed(1), [], 0
    while step < STEPS:
        for idx in torch.randperm(n, generator=gen)[: n - n % BATCH].split(BATCH):
            if step % EVERY == 0 and step >= 2 * EVERY:
                scales = adam_scales(opt, params) if preconditioned else None
                out.append((step, exact_noise_scale(task, model, scales), gns.estimate()))
            opt.zero_grad()
            gns.forward_backward(task.x_train[idx], task.y_train[idx])
            opt.step()
            step += 1
            if step == STEPS:
                break
    return out


def covered(checks: list[tuple[int, float, NoiseEstimate]]) -> float:
    return sum(est.low <= exact <= est.high for _, exact, est in checks) / len(checks)


def table(checks: list[tuple[int, float, NoiseEstimate]]) -> str:
    """Step, exact value and estimate of each checkpoint, for a failure message."""
    return "\n".join(
        f"{step}: exact {exact:.1f}, estimate {est.value:.1f} [{est.low:.1f}, {est.high:.1f}]"
        for step, exact, est in checks
    )


def test_interval_covers_the_exact_noise_scale_along_sgd_training(digits: Task) -> None:
    checks = train_and_check(digits, lambda p: torch.optim.SGD(p, lr=0.1), preconditioned=False)
    assert covered(checks) >= 0.9, table(checks)
    bounded = [est for _, _, est in checks if est.high < math.inf]
    assert len(bounded) >= len(checks) // 2  # informative, not [0, inf]


def test_adam_preconditioned_interval_is_bounded_and_covers_the_exact_value(digits: Task) -> None:
    checks = train_and_check(digits, lambda p: torch.optim.Adam(p, lr=1e-3), preconditioned=True)
    assert covered(checks) >= 0.9, table(checks)
    bounded = [est for _, _, est in checks if est.high < math.inf]
    assert len(bounded) >= len(checks) // 2
