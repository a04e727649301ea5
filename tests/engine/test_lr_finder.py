"""LR range test on torch models: divergence on least squares, exact state restore, bad input."""

from __future__ import annotations

import math
import subprocess
import sys
from typing import Any

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from batchlab.core.range_test import SUGGESTIONS, consensus
from batchlab.engine.lr_finder import LRRangeResult, lr_find, lr_range_test
from batchlab.engine.spec import SpecError


def mse(out: Tensor, y: Tensor) -> Tensor:
    return ((out.squeeze(-1) - y) ** 2).mean()


@pytest.fixture(scope="module")
def least_squares() -> tuple[Tensor, Tensor, float]:
    """Noisy linear regression and its largest stable GD learning rate 2 / L, L = lambda_max(H)."""
    gen = torch.Generator().manual_seed(0)
    n, d = 2048, 10
    x = torch.randn(n, d, generator=gen) * torch.linspace(0.3, 2.0, d)
    y = x @ torch.randn(d, generator=gen) + 0.5 * torch.randn(n, generator=gen)
    hessian = 2.0 * x.double().T @ x.double() / n
    return x, y, 2.0 / float(torch.linalg.eigvalsh(hessian)[-1])


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_divergence_point_on_least_squares_within_factor_1_5(least_squares, seed: int) -> None:
    x, y, max_lr = least_squares
    result = lr_range_test(
        nn.Linear(10, 1, bias=False),
        mse,
        (x, y),
        batch_size=32,
        start_lr=1e-4,
        end_lr=10.0,
        steps=400,
        seed=seed,
    )
    assert result.divergence_lr is not None
    assert max_lr / 1.5 <= result.divergence_lr <= 1.5 * max_lr
    assert result.suggestions["divergence"] == result.divergence_lr
    # the test stopped soon after divergence instead of running to end_lr
    assert result.lrs[-1] < 2.0 * max_lr
    # every reading suggests training below the edge
    for name in ("steepest", "valley", "min_over_10"):
        assert result.suggestions[name] is not None
        assert result.suggestions[name] < max_lr


def _assert_same(a: Any, b: Any) -> None:
    """Recursive bit-exact comparison of (nested) state dicts."""
    if isinstance(a, Tensor):
        assert isinstance(b, Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    elif isinstance(a, dict):
        assert a.keys() == b.keys()
        for key in a:
            _assert_same(a[key], b[key])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for u, v in zip(a, b, strict=True):
            _assert_same(u, v)
    else:
        assert a == b


def _snapshot(obj: Any) -> Any:
    return {k: v.clone() if isinstance(v, Tensor) else v for k, v in obj.items()}


class Net(nn.Module):
    """Batch norm (running buffers), dropout (global RNG) and a frozen parameter."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 16)
        self.bn = nn.BatchNorm1d(16)
        self.drop = nn.Dropout(0.2)
        self.fc2 = nn.Linear(16, 3)
        self.fc2.bias.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.drop(self.bn(self.fc1(x)).relu()))


def _classification(n: int = 256) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(3)
    return torch.randn(n, 8, generator=gen), torch.randint(0, 3, (n,), generator=gen)


@pytest.mark.parametrize(
    "make_opt",
    [
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, nesterov=True),
        lambda p: torch.optim.Adam(p, lr=1e-3),
        lambda p: torch.optim.AdamW([{"params": p[:2]}, {"params": p[2:], "lr": 1e-4}], lr=1e-3),
    ],
)
def test_model_and_optimizer_state_restored_bit_identically(make_opt) -> None:
    torch.manual_seed(0)
    model = Net()
    x, y = _classification()
    loss_fn = nn.functional.cross_entropy
    opt = make_opt([p for p in model.parameters() if p.requires_grad])
    # some real training first, so the optimizer has momentum / moment buffers and step counts
    for _ in range(3):
        opt.zero_grad()
        loss_fn(model(x), y).backward()
        opt.step()
    model.eval()
    model_before = _snapshot(model.state_dict())
    opt_before = {"state": {k: _snapshot(v) for k, v in opt.state_dict()["state"].items()}}
    opt_before["param_groups"] = [dict(g) for g in opt.state_dict()["param_groups"]]
    grads_before = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
    rng_before = torch.get_rng_state()

    result = lr_range_test(model, loss_fn, (x, y), optimizer=opt, batch_size=32, steps=40)

    assert result.lrs.size > 10  # it really trained
    _assert_same(model.state_dict(), model_before)
    _assert_same(opt.state_dict()["state"], opt_before["state"])
    _assert_same(opt.state_dict()["param_groups"], opt_before["param_groups"])
    for p, g in zip(model.parameters(), grads_before, strict=True):
        assert (p.grad is None) == (g is None)
        if g is not None:
            assert torch.equal(p.grad, g)
    assert not model.training and not model.bn.training
    assert torch.equal(torch.get_rng_state(), rng_before)


def test_named_optimizer_leaves_model_untouched_and_is_deterministic() -> None:
    x, y = _classification()
    model = Net()
    before = _snapshot(model.state_dict())
    kwargs = dict(
        optimizer="sgd", momentum=0.9, batch_size=16, start_lr=1e-4, end_lr=10.0, steps=50
    )
    a = lr_range_test(model, nn.functional.cross_entropy, (x, y), seed=5, **kwargs)
    _assert_same(model.state_dict(), before)
    assert model.training  # mode as it was
    b = lr_range_test(model, nn.functional.cross_entropy, (x, y), seed=5, **kwargs)
    c = lr_range_test(model, nn.functional.cross_entropy, (x, y), seed=6, **kwargs)
    assert np.array_equal(a.losses, b.losses) and a.suggestions == b.suggestions
    assert not np.array_equal(a.losses[:10], c.losses[:10])


def test_result_holds_the_numbers_without_plotting() -> None:
    code = (
        "import sys, torch\n"
        "from batchlab.engine.lr_finder import lr_range_test\n"
        "x = torch.randn(64, 4); y = x.sum(1)\n"
        "m = torch.nn.Linear(4, 1)\n"
        "f = lambda o, t: ((o.squeeze(-1) - t) ** 2).mean()\n"
        "r = lr_range_test(m, f, (x, y), batch_size=16, steps=30, end_lr=1e-2)\n"
        "print(sorted(r.suggestions), r.lrs.size, 'matplotlib' in sys.modules)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    ).stdout.split()
    assert out[-1] == "False"  # computing never imports matplotlib
    assert out[-2] == "30"


def test_plot_only_draws(least_squares) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x, y, _ = least_squares
    result = lr_range_test(nn.Linear(10, 1, bias=False), mse, (x, y), batch_size=64, steps=60)
    before = (result.lrs.copy(), result.losses.copy(), result.smoothed.copy(), result.suggestions)
    ax = result.plot()
    assert ax.get_xscale() == "log" and len(ax.get_lines()) >= 2
    after = (result.lrs, result.losses, result.smoothed, result.suggestions)
    for old, new in zip(before[:3], after[:3], strict=True):
        assert np.array_equal(old, new, equal_nan=True)
    assert before[3] == after[3]
    plt.close("all")


def test_iterable_of_batches(least_squares) -> None:
    x, y, _ = least_squares
    batches = [(x[i : i + 64], y[i : i + 64]) for i in range(0, 640, 64)]  # 10 batches, restarted
    result = lr_range_test(nn.Linear(10, 1), mse, batches, steps=25, end_lr=1e-2)
    assert result.lrs.size == 25 and result.batch_size == 64
    one_shot = iter(batches)  # an iterator ends the test when it runs out
    short = lr_range_test(nn.Linear(10, 1), mse, one_shot, steps=25, end_lr=1e-2)
    assert short.lrs.size == 9
    np.testing.assert_allclose(short.lrs, result.lrs[:9])


def test_diverging_loss_is_a_result_not_a_crash() -> None:
    x = torch.randn(128, 4) * 100
    result = lr_range_test(nn.Linear(4, 1), mse, (x, x.sum(1)), batch_size=32, end_lr=1e6)
    assert result.divergence_lr is not None
    assert not math.isfinite(result.losses[-1]) or result.losses[-1] > result.losses.min()
    assert np.isnan(result.smoothed[-1])


class NoParams(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"start_lr": 1e-2, "end_lr": 1e-3}, "end_lr"),
        ({"start_lr": 0.0}, "start_lr"),
        ({"steps": 1}, "steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"optimizer": "lbfgs"}, "optimizer"),
        ({"optimizer": "sgd", "momentum": -1.0}, "optimizer"),
        ({"optimizer": "sgd", "bogus": 1}, "optimizer"),
        ({"method": "best"}, "method"),
        ({"diverge_factor": 1.0}, "diverge_factor"),
    ],
)
def test_bad_input_is_a_clear_error(kwargs: dict, field: str) -> None:
    x = torch.randn(32, 4)
    with pytest.raises(SpecError) as err:
        lr_range_test(nn.Linear(4, 1), mse, (x, x.sum(1)), **kwargs)
    assert err.value.field == field


def test_bad_model_and_data() -> None:
    x = torch.randn(32, 4)
    with pytest.raises(SpecError, match=r"^model: has no trainable parameters"):
        lr_range_test(NoParams(), mse, (x, x.sum(1)))
    with pytest.raises(SpecError, match=r"^data:"):
        lr_range_test(nn.Linear(4, 1), mse, (x, x[:10].sum(1)))
    with pytest.raises(SpecError, match=r"^data:"):
        lr_range_test(nn.Linear(4, 1), mse, [])
    with pytest.raises(SpecError, match=r"^data: gave no batches"):
        lr_range_test(nn.Linear(4, 1), mse, iter([]))
    model = nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(SpecError, match=r"^optimizer:"):
        lr_range_test(model, mse, (x, x.sum(1)), optimizer=opt, momentum=0.9)


def test_lr_find_on_digits_consensus_and_exponent() -> None:
    result = lr_find("digits-mlp", batch_sizes=[32, 256], seeds=2, steps=60, start_lr=1e-4)
    assert [e.batch_size for e in result.per_batch_size] == [32, 256]
    for entry in result.per_batch_size:
        assert [r.seed for r in entry.results] == [0, 1]
        assert all(
            isinstance(r, LRRangeResult) and r.batch_size == entry.batch_size for r in entry.results
        )
        expected = consensus([r.suggested_lr for r in entry.results])
        assert entry.consensus == expected
        assert set(entry.suggestions) == set(SUGGESTIONS)
    lrs = [e.consensus.lr for e in result.per_batch_size]
    assert result.exponent is not None
    assert result.exponent.exponent == pytest.approx(math.log(lrs[1] / lrs[0]) / math.log(8))
    summary = result.to_dict()
    assert summary["batch_sizes"][0]["seeds"][0]["steps"] == 60
    assert "lrs" in result.to_dict(curves=True)["batch_sizes"][0]["seeds"][0]


def test_lr_find_bad_input() -> None:
    with pytest.raises(SpecError, match=r"^batch_sizes:"):
        lr_find("digits-mlp", batch_sizes=[0])
    with pytest.raises(SpecError, match=r"^seeds:"):
        lr_find("digits-mlp", batch_sizes=[32], seeds=[])
