"""Sharpness against closed forms: quadratics and linear regression with known Hessians."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batchlab.engine.sharpness import (
    keskar_sharpness,
    run_sharpness,
    sharpness_report,
    top_hessian_eigenvalue,
)
from batchlab.engine.spec import RunSpec, SpecError
from batchlab.engine.tasks import get_task


class Quadratic(nn.Module):
    """``f(w) = 1/2 (w - c)^T A (w - c)`` whatever the input: Hessian ``A`` everywhere."""

    def __init__(self, a: Tensor, w: Tensor | None = None, c: Tensor | None = None) -> None:
        super().__init__()
        self.register_buffer("a", a)
        self.register_buffer("c", torch.zeros(a.shape[0]) if c is None else c)
        self.w = nn.Parameter(torch.zeros(a.shape[0]) if w is None else w.clone())

    def forward(self, x: Tensor) -> Tensor:
        r = self.w - self.c
        return 0.5 * r @ self.a @ r + 0.0 * x.sum()


def value(out: Tensor, y: Tensor) -> Tensor:
    return out


def mse(out: Tensor, y: Tensor) -> Tensor:
    return ((out.squeeze(-1) - y) ** 2).mean()


def dummy_data(n: int = 4) -> tuple[Tensor, Tensor]:
    return torch.zeros(n, 1), torch.zeros(n)


def symmetric_with(eigenvalues: list[float], seed: int = 0) -> Tensor:
    q, _ = torch.linalg.qr(
        torch.randn(
            len(eigenvalues), len(eigenvalues), generator=torch.Generator().manual_seed(seed)
        )
    )
    return q @ torch.diag(torch.tensor(eigenvalues)) @ q.T


@pytest.mark.parametrize("seed", [0, 1])
def test_quadratic_top_eigenvalue(seed: int) -> None:
    eig = torch.linspace(0.1, 10.0, 30).tolist()
    eig[-2] = 9.9  # a small gap: Lanczos still resolves it
    model = Quadratic(symmetric_with(eig, seed), w=torch.randn(30))
    top = top_hessian_eigenvalue(model, value, *dummy_data(), seed=seed)
    assert top == pytest.approx(10.0, rel=1e-3)


def test_largest_algebraic_not_largest_magnitude() -> None:
    model = Quadratic(symmetric_with([-20.0, 0.5, 3.0, 1.0]))
    assert top_hessian_eigenvalue(model, value, *dummy_data()) == pytest.approx(3.0, rel=1e-3)


@pytest.mark.parametrize("chunk_size", [4096, 64])
def test_linear_regression_hessian(chunk_size: int) -> None:
    gen = torch.Generator().manual_seed(0)
    n, d = 500, 12
    x = torch.randn(n, d, generator=gen) * torch.linspace(0.5, 3.0, d)
    y = torch.randn(n, generator=gen)
    model = nn.Linear(d, 1)
    design = torch.cat([x, torch.ones(n, 1)], dim=1).double()
    exact = float(torch.linalg.eigvalsh(2.0 * design.T @ design / n)[-1])
    top = top_hessian_eigenvalue(model, mse, x, y, chunk_size=chunk_size)
    assert top == pytest.approx(exact, rel=1e-3)


def linear_problem(n: int, d: int, outputs: int, seed: int = 0) -> tuple[nn.Linear, Tensor, Tensor]:
    """A float64 linear model at a random point and data with unequal column scales."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 3.0, d)
    y = torch.randn(n, outputs, generator=gen, dtype=torch.float64)
    model = nn.Linear(d, outputs).double()
    with torch.no_grad():
        model.weight.copy_(0.3 * torch.randn(outputs, d, generator=gen, dtype=torch.float64))
        model.bias.copy_(0.3 * torch.randn(outputs, generator=gen, dtype=torch.float64))
    return model, x, y


def with_bias(x: Tensor) -> np.ndarray:
    return torch.cat([x, torch.ones(len(x), 1, dtype=x.dtype)], dim=1).numpy()


@pytest.mark.parametrize("outputs", [1, 3])
@pytest.mark.parametrize("loss_fn", [F.mse_loss, nn.MSELoss()], ids=["F.mse_loss", "nn.MSELoss"])
@pytest.mark.parametrize("chunk_size", [4096, 64])
def test_least_squares_with_torch_mse(loss_fn: Callable, outputs: int, chunk_size: int) -> None:
    # mse_loss averages over N * outputs: the Hessian is block diagonal, one block per output,
    # each 2 X~^T X~ / (N outputs) with X~ = [X, 1]
    n = 300
    model, x, y = linear_problem(n, 6, outputs)
    design = with_bias(x)
    exact = np.linalg.eigvalsh(2.0 * design.T @ design / (n * outputs))[-1]
    top = top_hessian_eigenvalue(model, loss_fn, x, y, chunk_size=chunk_size)
    assert top == pytest.approx(exact, rel=1e-8)


# the Hessian of mean_n l(z_n, y_n) with z_n = w . x~_n is X~^T diag(l''(z_n)) X~ / N
SECOND_DERIVATIVES: dict[str, tuple[Callable, Callable[[Tensor, Tensor], Tensor]]] = {
    "huber": (F.huber_loss, lambda z, y: ((z - y).abs() < 1.0).double()),
    "smooth_l1": (
        functools.partial(F.smooth_l1_loss, beta=0.5),
        lambda z, y: ((z - y).abs() < 0.5).double() / 0.5,
    ),
    "bce_with_logits": (
        F.binary_cross_entropy_with_logits,
        lambda z, y: torch.sigmoid(z) * (1 - torch.sigmoid(z)),
    ),
    "user_lambda": (lambda out, y: ((out - y) ** 4).mean(), lambda z, y: 12 * (z - y) ** 2),
}


@pytest.mark.parametrize("name", SECOND_DERIVATIVES)
def test_closed_form_hessian_of_a_linear_model(name: str) -> None:
    loss_fn, second = SECOND_DERIVATIVES[name]
    model, x, y = linear_problem(400, 5, 1, seed=1)
    # 2 y: residuals on both sides of the huber / smooth L1 kinks
    y = (y > 0).double() if name == "bce_with_logits" else 2.0 * y
    with torch.no_grad():
        curvature = second(model(x), y).squeeze(-1).numpy()
    if name in ("huber", "smooth_l1"):
        assert 0 < np.count_nonzero(curvature) < len(curvature)
    design = with_bias(x)
    exact = np.linalg.eigvalsh(design.T @ (curvature[:, None] * design) / len(x))[-1]
    assert top_hessian_eigenvalue(model, loss_fn, x, y) == pytest.approx(exact, rel=1e-8)


def tiny_net(outputs: int, seed: int) -> nn.Module:
    """3 -> 4 -> outputs with tanh, float64: a curved loss with an indefinite Hessian."""
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, outputs)).double()


def exact_top_eigenvalue(model: nn.Module, loss_fn: Callable, x: Tensor, y: Tensor) -> float:
    """The full Hessian, block by block, by ``torch.autograd.functional.hessian``; numpy's
    ``eigvalsh`` of it."""
    names, params = zip(*model.named_parameters(), strict=True)

    def loss_at(*values: Tensor) -> Tensor:
        return loss_fn(
            torch.func.functional_call(model, dict(zip(names, values, strict=True)), (x,)), y
        )

    blocks = torch.autograd.functional.hessian(loss_at, tuple(p.detach() for p in params))
    full = np.block(
        [
            [b.reshape(p.numel(), q.numel()).numpy() for b, q in zip(row, params, strict=True)]
            for row, p in zip(blocks, params, strict=True)
        ]
    )
    return float(np.linalg.eigvalsh(full)[-1])


LOSSES: dict[str, Callable[[Tensor, Tensor], Tensor]] = {
    "mse": F.mse_loss,
    "huber": functools.partial(F.huber_loss, delta=0.5),
    "smooth_l1": F.smooth_l1_loss,
    "bce_with_logits": F.binary_cross_entropy_with_logits,
    "user_lambda": lambda out, y: ((out - y) ** 4).mean(),
    "cross_entropy": F.cross_entropy,
}


@pytest.mark.parametrize("name", LOSSES)
def test_nonlinear_model_against_the_full_hessian(name: str) -> None:
    loss_fn = LOSSES[name]
    gen = torch.Generator().manual_seed(2)
    outputs = 3 if name == "cross_entropy" else 1
    model = tiny_net(outputs, seed=2)
    x = 2.0 * torch.randn(64, 3, generator=gen, dtype=torch.float64)
    if name == "cross_entropy":
        y = torch.randint(0, 3, (64,), generator=gen)
    elif name == "bce_with_logits":
        y = torch.randint(0, 2, (64, 1), generator=gen).double()
    else:
        y = torch.randn(64, 1, generator=gen, dtype=torch.float64)
    exact = exact_top_eigenvalue(model, loss_fn, x, y)
    assert top_hessian_eigenvalue(model, loss_fn, x, y, chunk_size=20) == pytest.approx(
        exact, rel=1e-8
    )


def test_zero_hessian_of_a_loss_linear_in_the_weights() -> None:
    model, x, y = linear_problem(32, 4, 1)
    assert top_hessian_eigenvalue(model, lambda out, y: out.mean(), x, y) == 0.0


def test_keskar_with_mse_at_the_least_squares_minimum() -> None:
    # orthogonal design columns (Hadamard): H = 2 diag(s^2) and f(x + z) - f(x) = sum s_j^2 z_j^2,
    # largest at the box corner |z_j| = eps (|x_j| + 1)
    hadamard = np.array([[1.0]])
    for _ in range(3):
        hadamard = np.block([[hadamard, hadamard], [hadamard, -hadamard]])
    scales = np.array([1.0, 2.0, 0.5])
    x = torch.tensor(hadamard[:, 1:4] * scales)
    y = torch.tensor(np.random.default_rng(0).normal(size=(8, 1)))
    model = nn.Linear(3, 1).double()
    solution = np.linalg.lstsq(with_bias(x), y.numpy(), rcond=None)[0][:, 0]
    with torch.no_grad():
        model.weight.copy_(torch.tensor(solution[:3]).unsqueeze(0))
        model.bias.copy_(torch.tensor(solution[3:]))
        f0 = float(F.mse_loss(model(x), y))
    eps, curvature = 1e-2, np.append(scales**2, 1.0)
    rise = np.sum(curvature * (eps * (np.abs(solution) + 1.0)) ** 2)
    phi = keskar_sharpness(model, F.mse_loss, x, y, epsilon=eps)
    assert f0 > 0.1 and phi == pytest.approx(100.0 * rise / (1.0 + f0), rel=1e-6)


def test_model_untouched_and_mode_restored() -> None:
    model = nn.Sequential(nn.Linear(4, 8), nn.Dropout(0.5), nn.Tanh(), nn.Linear(8, 1))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, y = torch.randn(64, 4), torch.randn(64)
    a = sharpness_report(model, mse, x, y, lr=0.1)
    b = sharpness_report(model, mse, x, y, lr=0.1)  # dropout off: deterministic
    assert a == b
    assert model.training
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[key])


def test_keskar_zero_for_constant_loss() -> None:
    model = Quadratic(torch.zeros(5, 5), w=torch.randn(5))
    assert keskar_sharpness(model, value, *dummy_data()) == 0.0


def test_keskar_closed_form_and_growth_with_curvature() -> None:
    # at w = 0 the box is |z_i| <= eps; the max of 1/2 sum h_i z_i^2 is at a corner: eps^2 sum h / 2
    eps = 1e-2
    h = torch.tensor([1.0, 2.0, 4.0, 8.0])
    values = []
    for scale in (1.0, 4.0, 16.0):
        model = Quadratic(torch.diag(scale * h))
        phi = keskar_sharpness(model, value, *dummy_data(), epsilon=eps)
        assert phi == pytest.approx(100.0 * 0.5 * eps**2 * float(scale * h.sum()), rel=1e-3)
        values.append(phi)
    assert values[0] < values[1] < values[2]


def test_keskar_box_scales_with_weights() -> None:
    # the box half-width is eps (|x_i| + 1): at w = 3 it is 4 eps, so phi grows 16x; the loss at the
    # point (f(x) = 0 when the minimum c moves with w) stays the same
    eps, a = 1e-2, torch.eye(3)
    at_zero = keskar_sharpness(Quadratic(a), value, *dummy_data(), epsilon=eps)
    w = torch.full((3,), 3.0)
    at_three = keskar_sharpness(Quadratic(a, w=w, c=w), value, *dummy_data(), epsilon=eps)
    assert at_three == pytest.approx(16.0 * at_zero, rel=1e-3)


def test_report_and_stability_edge() -> None:
    model = Quadratic(torch.diag(torch.tensor([1.0, 5.0])))
    report = sharpness_report(model, value, *dummy_data(), lr=0.3, keskar=False)
    assert report["top_eigenvalue"] == pytest.approx(5.0, rel=1e-4)
    assert report["stability_edge"] == pytest.approx(2 / 0.3)
    assert report["edge_ratio"] == pytest.approx(5.0 * 0.3 / 2)
    assert report["keskar"] is None and report["loss"] == 0.0 and report["n_params"] == 2
    no_lr = sharpness_report(model, value, *dummy_data())
    assert no_lr["stability_edge"] is None and no_lr["edge_ratio"] is None
    assert no_lr["keskar"] > 0


def test_diverged_weights_give_nan_not_a_crash() -> None:
    model = nn.Linear(3, 1)
    with torch.no_grad():
        model.weight.fill_(math.nan)
    report = sharpness_report(model, mse, torch.randn(16, 3), torch.randn(16))
    assert math.isnan(report["loss"]) and math.isnan(report["top_eigenvalue"])
    assert math.isnan(report["keskar"])


class NoParams(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.sum(-1)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"lr": 0.0}, "lr"),
        ({"iters": 0}, "iters"),
        ({"tol": -1.0}, "tol"),
        ({"epsilon": 0.0}, "epsilon"),
        ({"maxiter": 0}, "maxiter"),
        ({"chunk_size": 0}, "chunk_size"),
    ],
)
def test_bad_input(kwargs: dict, field: str) -> None:
    with pytest.raises(SpecError) as err:
        sharpness_report(nn.Linear(2, 1), mse, torch.randn(8, 2), torch.randn(8), **kwargs)
    assert err.value.field == field


def test_bad_model_and_data() -> None:
    with pytest.raises(SpecError, match=r"^model: has no trainable parameters"):
        top_hessian_eigenvalue(NoParams(), mse, torch.randn(8, 2), torch.randn(8))
    with pytest.raises(SpecError, match=r"^x:"):
        keskar_sharpness(nn.Linear(2, 1), mse, torch.randn(8, 2), torch.randn(7))


def test_run_sharpness_rebuilds_the_stored_model() -> None:
    task = get_task("digits-mlp")
    spec = RunSpec(task="digits-mlp", batch_size=64, lr=0.1, seed=3)
    trained = task.make_model(3)
    with torch.no_grad():
        for p in trained.parameters():
            p.mul_(1.5)  # weights that differ from a fresh init
    weights = {k: v.clone() for k, v in trained.state_dict().items()}
    report = run_sharpness(spec, weights, task=task, keskar=False)
    direct = top_hessian_eigenvalue(trained, task.loss_fn, task.x_train, task.y_train)
    assert report["top_eigenvalue"] == pytest.approx(direct, rel=1e-6)
    assert report["stability_edge"] == pytest.approx(20.0)
    assert report["n_examples"] == task.n_train
    with pytest.raises(SpecError, match=r"^weights:"):
        run_sharpness(spec, {"bogus": torch.zeros(1)}, task=task)
