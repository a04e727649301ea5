"""GradientNoiseScale under mixed precision (CPU bf16 autocast, ``GradScaler("cpu")``) against the
float32 answer, and resuming from ``state_dict`` against one uninterrupted run."""

from __future__ import annotations

import io
import math
import warnings

import pytest
import torch
from tests.engine.test_monitor_sequence import TinyGPT, lm_loss, tokens
from torch import Tensor, nn

from batchlab.engine.monitor import GradientNoiseScale
from batchlab.engine.spec import SpecError

ce = nn.functional.cross_entropy
STEPS = 6


def data(seed: int = 0) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(STEPS * 64, 20, generator=gen)
    return x, (x[:, :5].argmax(1) + (torch.rand(len(x), generator=gen) < 0.3)) % 5


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 32), nn.Tanh(), nn.Linear(32, 5))


def train(
    mode: str,
    scaler: torch.amp.GradScaler | None = None,
    unscale_first: bool = True,
    inf_step: int | None = None,
) -> GradientNoiseScale:
    """A few SGD steps with clipping; with a scaler, the usual scale / unscale_ / clip / step / update."""
    x, y = data()
    model = mlp()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    gns = GradientNoiseScale(model, mode, loss_fn=ce, scaler=scaler)
    for step, (xb, yb) in enumerate(zip(x.chunk(STEPS), y.chunk(STEPS), strict=True)):
        if step == inf_step:
            xb = xb.clone()
            xb[0, 0] = math.inf
        opt.zero_grad()
        if mode == "accumulation":
            for xm, ym in zip(xb.chunk(4), yb.chunk(4), strict=True):
                loss = ce(model(xm), ym) / 4
                (loss if scaler is None else scaler.scale(loss)).backward()
                gns.after_backward(len(xm))
        else:
            gns.forward_backward(xb, yb)
        if mode == "accumulation" and not unscale_first:
            gns.before_step()
        if scaler is not None:
            scaler.unscale_(opt)
        nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        if mode == "accumulation" and unscale_first:
            gns.before_step()
        if scaler is None:
            opt.step()
        else:
            scaler.step(opt)
            scaler.update()
    return gns


@pytest.mark.parametrize(
    ("mode", "unscale_first"),
    [("accumulation", True), ("accumulation", False), ("split", True), ("per_example", True)],
    ids=[
        "accumulation-unscale-then-read",
        "accumulation-read-then-unscale",
        "split",
        "per_example",
    ],
)
def test_grad_scaler_gives_the_unscaled_estimate(mode: str, unscale_first: bool) -> None:
    want = train(mode).estimate()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    got = train(mode, scaler, unscale_first).estimate()
    assert scaler.get_scale() == 2.0**16  # no overflow: the same steps were taken
    assert (got.grad_sq, got.trace_cov, got.value) == pytest.approx(
        (want.grad_sq, want.trace_cov, want.value), rel=1e-5
    )


@pytest.mark.parametrize("mode", ["accumulation", "split", "per_example"])
def test_a_non_finite_scaled_step_is_skipped_and_counted(mode: str) -> None:
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        gns = train(mode, scaler, inf_step=2)
    assert scaler.get_scale() == 2.0**15  # the scaler skipped that step too
    est = gns.estimate()
    assert gns.skipped == {"non-finite gradient": 1}
    assert est.count == STEPS - 1 and math.isfinite(est.value) and math.isfinite(est.grad_sq)


AUTOCASTS = [
    pytest.param("cpu", torch.bfloat16, "hand", id="cpu-bf16-hand"),
    pytest.param("cpu", torch.bfloat16, "torch", id="cpu-bf16-mha"),
    pytest.param(
        "cuda",
        torch.float16,
        "torch",
        id="cuda-fp16-mha",
        marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    ),
]


@pytest.mark.parametrize("mode", ["split", "per_example"])
@pytest.mark.parametrize(("device", "dtype", "attention"), AUTOCASTS)
def test_autocast_with_grad_scaler_matches_float32(
    mode: str, device: str, dtype: torch.dtype, attention: str
) -> None:
    def run(amp: bool) -> GradientNoiseScale:
        torch.manual_seed(0)
        model = TinyGPT(attention=attention).to(device)
        opt = torch.optim.SGD(model.parameters(), lr=0.0)  # lr 0: every step sees the same weights
        scaler = torch.amp.GradScaler(device, enabled=amp)
        gns = GradientNoiseScale(model, mode, loss_fn=lm_loss, scaler=scaler)
        for seed in range(3):
            x, y = (t.to(device) for t in tokens(16, seed))
            opt.zero_grad()
            with torch.autocast(device, dtype, enabled=amp):
                gns.forward_backward(x, y)
            scaler.unscale_(opt)
            scaler.step(opt)
            scaler.update()
        return gns

    want, got = run(False), run(True)
    assert got.mode == mode and got.fallback is None and not got.skipped
    w, g = want.estimate(), got.estimate()
    # bf16 keeps 8 significant bits; the norms are sums over many of them
    assert (g.grad_sq, g.trace_cov) == pytest.approx((w.grad_sq, w.trace_cov), rel=2e-2)


# ----- resume -----


def run_steps(gns: GradientNoiseScale, model: nn.Module, mode: str, steps: range) -> None:
    x, y = data(1)
    for step in steps:
        xb, yb = x[step * 32 : (step + 1) * 32], y[step * 32 : (step + 1) * 32]
        if mode == "accumulation":
            for xm, ym in zip(xb.chunk(2), yb.chunk(2), strict=True):
                (ce(model(xm), ym) / 2).backward()
                gns.after_backward(16)
            gns.before_step()
        else:
            gns.forward_backward(xb, yb)
        model.zero_grad()


@pytest.mark.parametrize("mode", ["accumulation", "split", "per_example"])
def test_resumed_monitor_continues_the_same_estimate_exactly(mode: str) -> None:
    model = mlp()
    whole = GradientNoiseScale(model, mode, loss_fn=ce, window=6, every=2)
    run_steps(whole, model, mode, range(12))
    want = whole.estimate()
    whole.remove()

    first = GradientNoiseScale(model, mode, loss_fn=ce, window=6, every=2)
    run_steps(first, model, mode, range(7))  # stops between two measured steps
    buffer = io.BytesIO()
    torch.save(first.state_dict(), buffer)
    first.remove()
    buffer.seek(0)
    resumed = GradientNoiseScale(model, mode, loss_fn=ce, window=6, every=2)
    resumed.load_state_dict(torch.load(buffer, weights_only=True))
    run_steps(resumed, model, mode, range(7, 12))
    assert resumed.estimate() == want and want.count == 6


def test_resume_keeps_a_fallback_and_refuses_another_mode() -> None:
    model = nn.Sequential(nn.Linear(20, 8), nn.GroupNorm(2, 8), nn.Linear(8, 5))
    gns = GradientNoiseScale(model, "per_example", loss_fn=ce)
    run_steps(gns, model, "per_example", range(3))
    state = gns.state_dict()
    assert state["mode"] == "split" and state["skipped"] == {"per_example fell back to split": 1}
    again = GradientNoiseScale(model, "per_example", loss_fn=ce)
    again.load_state_dict(state)
    assert again.mode == "split" and again.fallback == gns.fallback and again.count == 2
    with pytest.raises(SpecError, match=r"^state_dict: was saved in mode 'split'"):
        GradientNoiseScale(model, "accumulation").load_state_dict(state)
