"""GradientNoiseScale against ground truth: exact per-example gradients (torch.func) on MNIST-1D, a
closed-form linear regression, mode-against-mode agreement, 2-rank DDP on gloo, and bad input."""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn.parallel import DistributedDataParallel

from batchlab.core.noise import NoiseWindow, two_batch_estimate
from batchlab.engine.monitor import GradientNoiseScale
from batchlab.engine.spec import SpecError

ce = nn.functional.cross_entropy


@pytest.fixture(scope="module")
def mnist1d() -> tuple[Tensor, Tensor]:
    from mnist1d.data import get_dataset_args, make_dataset

    data = make_dataset(get_dataset_args())
    x = torch.tensor(data["x"], dtype=torch.float32)
    return (x - x.mean(0)) / x.std(0), torch.tensor(data["y"])


def mlp(seed: int = 0, width: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(40, width), nn.Tanh(), nn.Linear(width, 10))


class Sequence(nn.Module):
    """Linear layers on (B, T, C) inputs, one of them called twice: the Gram and materialised paths."""

    def __init__(self) -> None:
        super().__init__()
        self.wide = nn.Linear(40, 48)  # T * (in + out) < in * out: Gram form
        self.narrow = nn.Linear(48, 10)  # materialised

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.wide(x.reshape(x.shape[0], 4, 10).repeat(1, 1, 4)))
        return self.narrow(h).mean(1) + self.narrow(h[:, :2] * 0.5).mean(1)


def conv1d() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 40)),
        nn.Conv1d(1, 4, 5, stride=2, padding=2),
        nn.ReLU(inplace=True),
        nn.Conv1d(4, 4, 3, dilation=2, bias=False),
        nn.Flatten(),
        nn.Linear(4 * 16, 10),
    )


def conv2d() -> nn.Module:
    return nn.Sequential(
        nn.Unflatten(1, (1, 5, 8)),
        nn.Conv2d(1, 3, 3, padding=1),
        nn.Tanh(),
        nn.Conv2d(3, 2, (2, 3), stride=(1, 2), padding=(0, 1)),
        nn.Flatten(),
        nn.Linear(2 * 4 * 4, 10),
    )


MODELS: dict[str, Callable[[], nn.Module]] = {
    "mlp": mlp,
    "sequence": Sequence,
    "conv1d": conv1d,
    "conv2d": conv2d,
}


def per_example_grads(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    """Exact per-example gradients, flattened: (N, parameters)."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        return ce(functional_call(model, p, (xi[None],)), yi[None])

    grads = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    return torch.cat([g.flatten(1) for g in grads.values()], 1).double()


def exact_noise(per_example: Tensor) -> tuple[float, float]:
    """|G|^2 and tr(Sigma) over the examples."""
    g = per_example.mean(0)
    return float(g @ g), float(((per_example - g) ** 2).sum(1).mean())


def plain_grads(model: nn.Module, x: Tensor, y: Tensor) -> list[Tensor]:
    model.zero_grad()
    ce(model(x), y).backward()
    out = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    return out


def adam_after_one_step(model: nn.Module, x: Tensor, y: Tensor) -> torch.optim.Adam:
    opt = torch.optim.Adam(model.parameters(), lr=0.0)  # lr 0: state fills, weights stay
    ce(model(x), y).backward()
    opt.step()
    model.zero_grad()
    return opt


def measure_twice(gns: GradientNoiseScale, model: nn.Module, x: Tensor, y: Tensor) -> None:
    """Two identical measurements: the estimate is then exactly the single-step measurement."""
    for _ in range(2):
        gns.forward_backward(x, y)
        model.zero_grad()


# ----- one measurement is exact -----


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("adam", [False, True], ids=["plain", "adam"])
def test_per_example_measurement_equals_exact_per_example_norms(
    mnist1d: tuple[Tensor, Tensor], name: str, adam: bool
) -> None:
    x, y = mnist1d[0][:24], mnist1d[1][:24]
    model = MODELS[name]()
    opt = adam_after_one_step(model, x[:8], y[:8]) if adam else None
    gns = GradientNoiseScale(model, "per_example", loss_fn=ce, precondition=opt)
    assert gns.fallback is None
    measure_twice(gns, model, x, y)
    grads = per_example_grads(model, x, y)
    if adam:
        scales = []
        for p in model.parameters():
            st, (_, beta2) = opt.state[p], opt.param_groups[0]["betas"]
            v_hat = st["exp_avg_sq"] / (1 - beta2 ** float(st["step"]))
            scales.append((1 / (v_hat.sqrt() + opt.param_groups[0]["eps"])).flatten())
        grads = grads * torch.cat(scales).double()
    mean = grads.mean(0)
    want = two_batch_estimate(float((grads**2).sum(1).mean()), float(mean @ mean), 1, len(x))
    est = gns.estimate()
    assert (est.grad_sq, est.trace_cov) == pytest.approx(want, rel=1e-4)


# ----- the update is never changed -----


@pytest.mark.parametrize("name", MODELS)
@pytest.mark.parametrize("mode", ["split", "per_example"])
@pytest.mark.parametrize("adam", [False, True], ids=["plain", "adam"])
def test_forward_backward_leaves_the_plain_gradient(
    mnist1d: tuple[Tensor, Tensor], name: str, mode: str, adam: bool
) -> None:
    x, y = mnist1d[0][:30], mnist1d[1][:30]  # 30 = 8 + 8 + 7 + 7 in split
    model = MODELS[name]()
    want = plain_grads(model, x, y)
    opt = adam_after_one_step(model, x[:8], y[:8]) if adam else None
    gns = GradientNoiseScale(model, mode, loss_fn=ce, precondition=opt)
    loss = gns.forward_backward(x, y)
    assert float(loss) == pytest.approx(float(ce(model(x), y).detach()), rel=1e-6)
    for p, g in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    gns.forward_backward(x, y)  # accumulates onto existing gradients like backward() does
    for p, g in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, 2 * g, rtol=1e-5, atol=1e-7)


def test_accumulation_and_per_example_training_matches_plain_training(
    mnist1d: tuple[Tensor, Tensor],
) -> None:
    x, y = mnist1d

    def run(mode: str | None) -> list[Tensor]:
        model = mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.2, momentum=0.9)
        gns = None if mode is None else GradientNoiseScale(model, mode, loss_fn=ce)
        for step in range(10):
            xb, yb = x[step * 64 : (step + 1) * 64], y[step * 64 : (step + 1) * 64]
            opt.zero_grad()
            if mode == "per_example":
                gns.forward_backward(xb, yb)
            else:
                for xm, ym in zip(xb.split(16), yb.split(16), strict=True):
                    (ce(model(xm), ym) / 4).backward()
                    if gns is not None:
                        gns.after_backward(16)
                if gns is not None:
                    gns.before_step()
            opt.step()
        assert gns is None or gns.count == 10
        return [p.detach() for p in model.parameters()]

    plain = run(None)
    for p, q in zip(plain, run("accumulation"), strict=True):
        assert torch.equal(p, q)
    for p, q in zip(plain, run("per_example"), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ----- ground truth over many draws -----


@pytest.mark.parametrize(
    ("model_fn", "mode", "draws"),
    [
        (lambda: nn.Linear(40, 10), "per_example", 400),
        (mlp, "per_example", 400),
        (mlp, "split", 1200),
        (mlp, "accumulation", 1200),
    ],
    ids=["logistic-per_example", "mlp-per_example", "mlp-split", "mlp-accumulation"],
)
def test_estimate_over_draws_is_within_5_percent_of_exact_noise_scale(
    mnist1d: tuple[Tensor, Tensor], model_fn: Callable[[], nn.Module], mode: str, draws: int
) -> None:
    x, y = mnist1d
    torch.manual_seed(1)
    model = model_fn()
    grad_sq, trace = exact_noise(per_example_grads(model, x, y))
    gns = GradientNoiseScale(model, mode, loss_fn=ce, window=None)
    gen = torch.Generator().manual_seed(2)
    for _ in range(draws):
        idx = torch.randint(0, len(x), (64,), generator=gen)  # i.i.d. draws: the estimator's model
        if mode == "accumulation":
            for part in idx.split(16):
                (ce(model(x[part]), y[part]) / 4).backward()
                gns.after_backward(16)
            gns.before_step()
        else:
            gns.forward_backward(x[idx], y[idx])
        model.zero_grad()
    est = gns.estimate()
    assert est.value == pytest.approx(trace / grad_sq, rel=0.05)
    assert est.trace_cov == pytest.approx(trace, rel=0.05)
    assert est.low <= trace / grad_sq <= est.high


def test_batch_gradient_error_is_trace_over_batch(mnist1d: tuple[Tensor, Tensor]) -> None:
    x, y = mnist1d
    model = mlp()
    per_example = per_example_grads(model, x, y)
    g, (_, trace) = per_example.mean(0), exact_noise(per_example)
    gns = GradientNoiseScale(model, "per_example", loss_fn=ce, window=None)
    gen = torch.Generator().manual_seed(3)
    errors = []
    for _ in range(600):
        gns.forward_backward(*mnist1d_batch(x, y, 32, gen))
        batch_grad = torch.cat([p.grad.flatten() for p in model.parameters()]).double()
        errors.append(float(((batch_grad - g) ** 2).sum()))
        model.zero_grad()
    assert sum(errors) / len(errors) == pytest.approx(trace / 32, rel=0.05)
    assert gns.estimate().trace_cov / 32 == pytest.approx(trace / 32, rel=0.05)


def mnist1d_batch(x: Tensor, y: Tensor, batch: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    idx = torch.randint(0, len(x), (batch,), generator=gen)
    return x[idx], y[idx]


@pytest.mark.parametrize("mode", ["per_example", "split"])
def test_linear_regression_matches_closed_form(mode: str) -> None:
    """y = w* x + eps, x ~ N(0, I_d), eps ~ N(0, s^2), squared loss at w = w* + delta:
    G = delta, Sigma = (|delta|^2 + s^2) I + delta delta^T, so B_simple = d (1 + s^2/|delta|^2) + 1."""
    dim, noise_sd = 8, 1.5
    gen = torch.Generator().manual_seed(4)
    w_star = torch.randn(dim, generator=gen)
    delta = torch.full((dim,), 0.5)
    model = nn.Linear(dim, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(w_star + delta)

    def loss(pred: Tensor, target: Tensor) -> Tensor:
        return 0.5 * ((pred.squeeze(1) - target) ** 2).mean()

    gns = GradientNoiseScale(model, mode, loss_fn=loss, window=None)
    for _ in range(1500):
        xb = torch.randn(32, dim, generator=gen)
        gns.forward_backward(xb, xb @ w_star + noise_sd * torch.randn(32, generator=gen))
        model.zero_grad()
    est = gns.estimate()
    d2 = float(delta @ delta)
    assert est.grad_sq == pytest.approx(d2, rel=0.05)
    assert est.trace_cov == pytest.approx(dim * (d2 + noise_sd**2) + d2, rel=0.05)
    assert est.value == pytest.approx(dim * (1 + noise_sd**2 / d2) + 1, rel=0.05)


# ----- modes agree on the same batches -----


def run_mode(
    mode: str, x: Tensor, y: Tensor, sizes: list[int], adam: bool, steps: int = 6
) -> tuple[float, float, float]:
    """Train a few steps on fixed batches cut into micro-batches of ``sizes`` (split, accumulation).

    In float64: in float32 the runs part by rounding, which Adam's 1/sqrt(v_hat) after a single step
    (a ratio of Gaussians) amplifies to ~3e-4 in the estimates."""
    model, x = mlp().double(), x.double()
    opt = torch.optim.Adam(model.parameters(), 1e-3) if adam else None
    gns = GradientNoiseScale(model, mode, loss_fn=ce, n_micro=len(sizes), precondition=opt)
    opt = opt or torch.optim.SGD(model.parameters(), lr=0.1)
    for xb, yb in zip(x.chunk(steps), y.chunk(steps), strict=True):
        opt.zero_grad()
        if mode == "accumulation":
            for xm, ym in zip(xb.split(sizes), yb.split(sizes), strict=True):
                (ce(model(xm), ym) * len(xm) / len(xb)).backward()
                gns.after_backward(len(xm))
            gns.before_step()
        else:
            gns.forward_backward(xb, yb)
        opt.step()
    est = gns.estimate()
    return est.value, est.grad_sq, est.trace_cov


@pytest.mark.parametrize("adam", [False, True], ids=["plain", "adam"])
@pytest.mark.parametrize("batch", [64, 30])  # 30 in 4: micro-batches of 8, 8, 7, 7
def test_split_equals_accumulation_on_the_same_micro_batches(
    mnist1d: tuple[Tensor, Tensor], adam: bool, batch: int
) -> None:
    x, y = mnist1d[0][: 6 * batch], mnist1d[1][: 6 * batch]
    sizes = [batch // 4 + (i < batch % 4) for i in range(4)]
    split = run_mode("split", x, y, sizes, adam)
    accumulation = run_mode("accumulation", x, y, sizes, adam)
    assert split == pytest.approx(accumulation, rel=1e-8)


@pytest.mark.parametrize("adam", [False, True], ids=["plain", "adam"])
def test_per_example_equals_split_into_single_examples(
    mnist1d: tuple[Tensor, Tensor], adam: bool
) -> None:
    x, y = mnist1d[0][:96], mnist1d[1][:96]  # 6 steps of 16
    assert run_mode("per_example", x, y, [1] * 16, adam) == pytest.approx(
        run_mode("split", x, y, [1] * 16, adam), rel=1e-8
    )


# ----- distributed: 2 ranks on gloo agree with accumulation over 2 micro-batches -----

DIST_STEPS, DIST_BATCH = 20, 32  # 16 steps shared by before_step, 4 by sync


def _distributed_run(variant: str, rank: int | None) -> tuple[list[float], int, list[Tensor]]:
    """``rank=None``: the single-process reference, accumulation over the two ranks' halves."""
    gen = torch.Generator().manual_seed(5)
    x = torch.randn(DIST_STEPS * DIST_BATCH, 40, generator=gen, dtype=torch.float64)
    y = (x[:, :10].argmax(1) + (torch.rand(len(x), generator=gen) < 0.3)) % 10
    net = mlp(width=16).double()  # float64: see run_mode
    adam = variant == "ddp-adam"
    opt = (
        torch.optim.Adam(net.parameters(), 0.01) if adam else torch.optim.SGD(net.parameters(), 0.5)
    )
    model = DistributedDataParallel(net) if rank is not None and variant != "manual" else net
    mode = "accumulation" if rank is None else "distributed"
    gns = GradientNoiseScale(model, mode, precondition=opt if adam else None, window=8)
    for xb, yb in zip(x.chunk(DIST_STEPS), y.chunk(DIST_STEPS), strict=True):
        opt.zero_grad()
        halves = list(zip(xb.chunk(2), yb.chunk(2), strict=True))
        for xm, ym in halves if rank is None else [halves[rank]]:
            (ce(model(xm), ym) / (2 if rank is None else 1)).backward()
            gns.after_backward(len(xm))
        if variant == "manual" and rank is not None:
            for p in net.parameters():
                dist.all_reduce(p.grad)
                p.grad /= 2
        gns.before_step()
        opt.step()
    before_sync = gns.count
    gns.sync()  # every rank; nothing to do in accumulation
    est = gns.estimate()
    return (
        [est.value, est.grad_sq, est.trace_cov],
        before_sync,
        [p.detach() for p in net.parameters()],
    )


DIST_VARIANTS = ("ddp", "ddp-adam", "manual")


def _distributed_worker(rank: int, out: str) -> None:
    # a file rendezvous: no port to pick, so no race with another process taking it
    dist.init_process_group("gloo", f"file://{out}/rendezvous", rank=rank, world_size=2)
    try:
        torch.save({v: _distributed_run(v, rank) for v in DIST_VARIANTS}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_gloo_available(), reason="needs the gloo backend")
def test_distributed_two_ranks_equal_accumulation_over_two_micro_batches(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.syspath_prepend(str(Path(__file__).parents[2]))  # spawned ranks import this module
    ctx = mp.start_processes(
        _distributed_worker,
        args=(str(tmp_path),),
        nprocs=2,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for proc in ctx.processes:
                proc.kill()
            pytest.fail("distributed ranks did not finish in 120 s")
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for variant in DIST_VARIANTS:
        want_est, want_count, want_params = _distributed_run(variant, None)
        for got in ranks:
            est, before_sync, params = got[variant]
            assert before_sync == 16 and want_count == DIST_STEPS - (variant == "ddp-adam")
            assert est == pytest.approx(want_est, rel=1e-8), variant
            for p, q in zip(params, want_params, strict=True):
                torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


# ----- fallback, skips and errors -----


def test_per_example_falls_back_to_split_for_other_layers(
    mnist1d: tuple[Tensor, Tensor], caplog: pytest.LogCaptureFixture
) -> None:
    model = nn.Sequential(nn.Linear(40, 16), nn.GroupNorm(4, 16), nn.Linear(16, 10))
    x, y = mnist1d[0][:32], mnist1d[1][:32]
    want = plain_grads(model, x, y)
    gns = GradientNoiseScale(model, "per_example", loss_fn=ce)
    with caplog.at_level(logging.WARNING):
        gns.forward_backward(x, y)  # trains; finds that GroupNorm's weight is beyond it
    assert gns.mode == "split"
    assert (
        gns.fallback
        == "1.weight (GroupNorm) gets its gradient through an operation per_example does not know"
    )
    assert "measuring with split" in caplog.text
    model.zero_grad()
    measure_twice(gns, model, x, y)
    assert gns.count == 2
    gns.forward_backward(x, y)
    for p, g in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)


class FlattensBatch(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(10, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.layer(x.reshape(-1, 10)).reshape(x.shape[0], 4, 10).mean(1)


def weight_penalty(model: nn.Module) -> Callable[[Tensor, Tensor], Tensor]:
    return lambda logits, y: ce(logits, y) + 0.1 * model[0].weight.pow(2).sum()


@pytest.mark.parametrize("case", ["batch-in-dim-0", "weight-outside-forward"])
def test_per_example_detects_what_it_cannot_measure_at_run_time(
    mnist1d: tuple[Tensor, Tensor], case: str
) -> None:
    model = FlattensBatch() if case == "batch-in-dim-0" else mlp()
    loss_fn = ce if case == "batch-in-dim-0" else weight_penalty(model)
    gns = GradientNoiseScale(model, "per_example", loss_fn=loss_fn)
    x, y = mnist1d[0][:32], mnist1d[1][:32]
    model.zero_grad()
    loss_fn(model(x), y).backward()
    want = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    gns.forward_backward(x, y)
    assert gns.mode == "split" and gns.fallback
    assert gns.skipped["per_example fell back to split"] == 1
    for p, g in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-5, atol=1e-7)
    model.zero_grad()
    measure_twice(gns, model, x, y)
    assert gns.count == 2


def test_bad_measurements_are_skipped_and_counted(mnist1d: tuple[Tensor, Tensor]) -> None:
    x, y = mnist1d[0][:32], mnist1d[1][:32]
    model = mlp()
    gns = GradientNoiseScale(model, "split", loss_fn=ce)
    want = plain_grads(model, x[:1], y[:1])
    gns.forward_backward(x[:1], y[:1])  # a batch of 1: trains, measures nothing
    for p, g in zip(model.parameters(), want, strict=True):
        torch.testing.assert_close(p.grad, g)
    model.zero_grad()
    bad = x.clone()
    bad[3, 0] = math.inf
    gns.forward_backward(bad, y)
    model.zero_grad()
    assert gns.estimate() is None
    assert gns.skipped == {
        "a batch of 1 has no gradient noise to measure": 1,
        "non-finite gradient": 1,
    }
    measure_twice(gns, model, x, y)
    assert gns.count == 2 and math.isfinite(gns.estimate().value)

    acc = GradientNoiseScale(model, "accumulation")
    ce(model(x), y).backward()
    acc.after_backward(32)
    acc.before_step()
    assert acc.skipped == {"accumulation needs at least 2 micro-batches per step": 1}

    opt = torch.optim.AdamW(model.parameters())
    pre = GradientNoiseScale(model, "per_example", loss_fn=ce, precondition=opt)
    pre.forward_backward(x, y)
    assert sum(pre.skipped.values()) == 1 and "first step" in next(iter(pre.skipped))


def test_every_measures_every_nth_step(mnist1d: tuple[Tensor, Tensor]) -> None:
    model = mlp()
    gns = GradientNoiseScale(model, "per_example", loss_fn=ce, every=3)
    for _ in range(9):
        gns.forward_backward(mnist1d[0][:16], mnist1d[1][:16])
    assert gns.count == 3


class Gated(nn.Module):
    """An MLP with an extra logit bias used only while ``gate`` is on: parameters that receive no
    gradient in some micro-batches."""

    def __init__(self) -> None:
        super().__init__()
        self.net = mlp().double()
        self.extra = nn.Parameter(torch.linspace(-1, 1, 10, dtype=torch.float64))
        self.gate = False

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x) + self.extra if self.gate else self.net(x)


def test_accumulation_with_parameters_missing_from_some_micro_batches(
    mnist1d: tuple[Tensor, Tensor],
) -> None:
    x, y = mnist1d[0][:48].double(), mnist1d[1][:48]
    model = Gated()
    params = list(model.parameters())
    steps = list(zip(x.chunk(2), y.chunk(2), strict=True))
    want = NoiseWindow(16)
    for step, (xb, yb) in enumerate(steps):  # exact, before the monitor hooks the parameters
        micro = []
        for i, (xm, ym) in enumerate(zip(xb.chunk(3), yb.chunk(3), strict=True)):
            model.gate = i == step  # the extra bias in micro-batch 0, then in micro-batch 1
            grads = torch.autograd.grad(ce(model(xm), ym), params, allow_unused=True)
            zero = [torch.zeros_like(p) for p in params]
            micro.append(
                torch.cat(
                    [(z if g is None else g).flatten() for g, z in zip(grads, zero, strict=True)]
                )
            )
        total = torch.stack(micro).mean(0)
        small = float(torch.stack([m @ m for m in micro]).mean())
        want = want.update(*two_batch_estimate(small, float(total @ total), 8, 24))
    gns = GradientNoiseScale(model, "accumulation", window=16)
    for step, (xb, yb) in enumerate(steps):
        for i, (xm, ym) in enumerate(zip(xb.chunk(3), yb.chunk(3), strict=True)):
            model.gate = i == step
            (ce(model(xm), ym) / 3).backward()
            gns.after_backward(8)
        gns.before_step()
        model.zero_grad()
    got, expected = gns.estimate(), want.estimate()
    assert (got.grad_sq, got.trace_cov) == pytest.approx(
        (expected.grad_sq, expected.trace_cov), rel=1e-9
    )


def test_reset_forgets_and_remove_unhooks(mnist1d: tuple[Tensor, Tensor]) -> None:
    x, y = mnist1d[0][:16], mnist1d[1][:16]
    model = mlp()
    gns = GradientNoiseScale(model, "accumulation")
    for _ in range(3):
        for xm, ym in zip(x.chunk(2), y.chunk(2), strict=True):
            (ce(model(xm), ym) / 2).backward()
            gns.after_backward(8)
        gns.sync()  # nothing to share outside distributed
        gns.before_step()
    assert gns.count == 3
    gns.reset()
    assert gns.count == 0 and gns.estimate() is None
    gns.remove()
    ce(model(x), y).backward()
    with pytest.raises(SpecError, match=r"^after_backward: no gradient arrived"):
        gns.after_backward(16)


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda m: GradientNoiseScale(m, "vmap"), "mode"),
        (lambda m: GradientNoiseScale(m, "split"), "loss_fn"),
        (lambda m: GradientNoiseScale(m, "per_example").forward_backward(torch.ones(2, 40), torch.ones(2)), "loss_fn"),
        (lambda m: GradientNoiseScale(m, "split", loss_fn=ce, n_micro=1), "n_micro"),
        (lambda m: GradientNoiseScale(m, "split", loss_fn=ce, window=1), "window"),
        (lambda m: GradientNoiseScale(m, "accumulation", population=1), "population"),
        (lambda m: GradientNoiseScale(m, "split", loss_fn=ce, every=0), "every"),
        (lambda m: GradientNoiseScale(m, "distributed"), "mode"),
        (lambda m: GradientNoiseScale(m, "accumulation", precondition=torch.optim.SGD(m.parameters(), 0.1)), "precondition"),
        (lambda m: GradientNoiseScale(m, "accumulation", precondition=torch.optim.Adam(m[0].parameters())), "precondition"),
        (lambda m: GradientNoiseScale(nn.Sequential(m, nn.BatchNorm1d(10)), "split", loss_fn=ce), "mode"),
        (lambda m: GradientNoiseScale(m, "accumulation").forward_backward(torch.ones(2, 40), torch.ones(2)), "mode"),
        (lambda m: GradientNoiseScale(m, "split", loss_fn=ce).before_step(), "mode"),
        (lambda m: GradientNoiseScale(m, "accumulation").after_backward(0), "batch_size"),
        (lambda m: GradientNoiseScale(m, "accumulation").after_backward(8), "after_backward"),
        (lambda m: GradientNoiseScale(m, "split", loss_fn=ce).forward_backward(torch.ones(4, 40), torch.ones(3)), "y"),
    ],
)  # fmt: skip
def test_bad_set_up_raises_spec_error_naming_the_field(make: Callable, field: str) -> None:
    with pytest.raises(SpecError, match=f"^{field}: ") as err:
        make(mlp())
    assert err.value.field == field
