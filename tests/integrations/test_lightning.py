"""The Lightning callback against the plain monitor on the same batches: per_example at
``accumulate_grad_batches=1``, accumulation, checkpoint/resume, 16-mixed, and a missing extra."""

from __future__ import annotations

import importlib
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

pl = pytest.importorskip("lightning.pytorch")

from batchlab.engine.lr_finder import lr_range_test as plain_lr_range_test  # noqa: E402
from batchlab.engine.monitor import GradientNoiseScale  # noqa: E402
from batchlab.integrations.lightning import GradientNoiseScaleCallback, lr_range_test  # noqa: E402

BATCH, STEPS, LR = 32, 8, 0.2
ce = nn.functional.cross_entropy


def data() -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH * STEPS, 12, generator=gen)
    return x, (x[:, :4].argmax(1) + (torch.rand(len(x), generator=gen) < 0.3)) % 4


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(12, 24), nn.Tanh(), nn.LayerNorm(24), nn.Linear(24, 4))


class Module(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = net()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return ce(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=LR)


class Logged(pl.Callback):
    """Keeps what the trainer's logger receives each step."""

    def __init__(self) -> None:
        self.logged: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        self.logged.append({k: float(v) for k, v in trainer.callback_metrics.items()})


def fit(
    callback: GradientNoiseScaleCallback,
    steps: int = STEPS,
    accumulate: int = 1,
    ckpt_path: Path | None = None,
    root: Path | None = None,
    epoch: int = STEPS,
    **trainer_kw: object,
) -> Module:
    x, y = (t[: epoch * BATCH] for t in data())
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH // accumulate)
    module = Module()
    options = {
        "accelerator": "cpu",
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "log_every_n_steps": 1,
        **trainer_kw,
    }
    trainer = pl.Trainer(
        max_steps=steps,
        accumulate_grad_batches=accumulate,
        callbacks=[callback, *options.pop("callbacks", [])],
        default_root_dir=root,
        **options,
    )
    trainer.fit(module, loader, ckpt_path=ckpt_path)
    return module


def plain(
    mode: str, accumulate: int = 1, steps: int = STEPS, interleave: bool = False
) -> GradientNoiseScale:
    """The same training by hand with the plain monitor; ``interleave``: micro-batch ``r`` is every
    ``accumulate``-th example from ``r`` (what DDP's sampler gives rank ``r``)."""
    x, y = data()
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    gns = GradientNoiseScale(model, mode, loss_fn=ce)
    for xb, yb in list(zip(x.split(BATCH), y.split(BATCH), strict=True))[:steps]:
        opt.zero_grad()
        if mode == "per_example":
            gns.forward_backward(xb, yb)
        else:
            parts = [slice(r, None, accumulate) for r in range(accumulate)]
            if not interleave:
                parts = [
                    slice(r * len(xb) // accumulate, (r + 1) * len(xb) // accumulate)
                    for r in range(accumulate)
                ]
            for part in parts:
                (ce(model(xb[part]), yb[part]) / accumulate).backward()
                gns.after_backward(len(xb[part]))
            gns.before_step()
        opt.step()
    return gns


@pytest.mark.parametrize(("accumulate", "mode"), [(1, "per_example"), (4, "accumulation")])
def test_callback_estimate_equals_the_plain_monitor_on_the_same_batches(
    accumulate: int, mode: str
) -> None:
    callback, logged = GradientNoiseScaleCallback(), Logged()
    fit(callback, accumulate=accumulate, callbacks=[logged])
    assert callback.monitor.gns.mode == mode and callback.monitor.stopped is None
    got, want = callback.estimate(), plain(mode, accumulate).estimate()
    assert got.count == STEPS
    assert got == pytest.approx(want, rel=1e-9)
    last = logged.logged[-1]
    assert last["noise_scale"] == pytest.approx(want.value, rel=1e-6)
    assert last["noise_scale_low"] == pytest.approx(want.low, rel=1e-6)
    assert last["suggested_batch_size"] == round(want.value)


def window(callback: GradientNoiseScaleCallback) -> dict[str, tuple[float, ...]]:
    """The measurements the callback's estimate is made of, from its checkpointed state."""
    fields = callback.state_dict()["monitor"]["estimators"]["_window"]["fields"]
    return {k: tuple(fields[k]) for k in ("grad_sq", "trace_cov")}


def test_resumed_fit_continues_the_same_estimate(tmp_path: Path) -> None:
    """Saved after one epoch and resumed: the first epoch's measurements and then the second's,
    as a resumed run without the saved state measures them."""
    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_epochs=1)
    half = STEPS // 2
    first = GradientNoiseScaleCallback()
    fit(first, steps=half, epoch=half, callbacks=[saver], enable_checkpointing=True)
    (ckpt,) = tmp_path.glob("*.ckpt")
    checkpoint = torch.load(ckpt, weights_only=True)
    assert checkpoint["callbacks"]["GradientNoiseScaleCallback"]["monitor"]["step"] == half
    resumed = GradientNoiseScaleCallback()
    fit(resumed, ckpt_path=ckpt, root=tmp_path, epoch=half)
    del checkpoint["callbacks"]["GradientNoiseScaleCallback"]
    torch.save(checkpoint, tmp_path / "forgetful.ckpt")
    fresh = GradientNoiseScaleCallback()
    fit(fresh, ckpt_path=tmp_path / "forgetful.ckpt", root=tmp_path, epoch=half)
    assert resumed.estimate().count == STEPS and fresh.estimate().count == half
    before, after, got = window(first), window(fresh), window(resumed)
    assert got == {k: before[k] + after[k] for k in got}


@pytest.mark.parametrize("precision", ["16-mixed", "bf16-mixed"])
def test_mixed_precision_agrees_with_float32(precision: str) -> None:
    """16-mixed with a GradScaler (Lightning's CPU default is bf16, so the plugin is given)."""
    scaler = torch.amp.GradScaler("cpu") if precision == "16-mixed" else None
    plugin = pl.plugins.precision.MixedPrecision(precision, "cpu", scaler=scaler)
    callback = GradientNoiseScaleCallback()
    fit(callback, accumulate=2, plugins=[plugin])
    assert callback.monitor.gns.scaler is scaler
    want = plain("accumulation", 2).estimate()
    assert callback.estimate().value == pytest.approx(want.value, rel=0.05)


DDP_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset
from tests.integrations.test_lightning import BATCH, STEPS, Module, data, pl
from batchlab.integrations.lightning import GradientNoiseScaleCallback

callback = GradientNoiseScaleCallback()
trainer = pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=2, strategy="ddp", logger=False,
    callbacks=[callback], use_distributed_sampler=False, enable_checkpointing=False,
    enable_progress_bar=False, enable_model_summary=False)
dataset = TensorDataset(*data())  # rank r: examples r, r + 2, ... in order
sampler = DistributedSampler(dataset, 2, trainer.global_rank, shuffle=False)
trainer.fit(Module(), DataLoader(dataset, batch_size=BATCH // 2, sampler=sampler))
print(json.dumps([trainer.global_rank, callback.monitor.gns.mode, list(callback.estimate())]))
"""


@pytest.mark.slow
def test_ddp_on_two_processes_equals_accumulation_over_the_ranks_halves(tmp_path: Path) -> None:
    """strategy='ddp' on 2 CPU processes (gloo): mode distributed, each rank's local gradient read
    by a comm hook; the estimate is accumulation's over the two halves the sampler deals."""
    script = tmp_path / "ddp.py"
    script.write_text(DDP_SCRIPT, encoding="utf-8")
    root = Path(__file__).resolve().parents[2]
    env = {
        **os.environ,
        "PYTHONPATH": f"{root}:{root / 'src'}",
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",  # no host-name look-ups: start-up 60 s -> 15 s
        "GLOO_SOCKET_IFNAME": "lo",
    }
    done = subprocess.run(
        [sys.executable, str(script), str(root)], cwd=tmp_path, env=env, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("[")]
    assert sorted(r[0] for r in rows) == [0, 1] and {r[1] for r in rows} == {"distributed"}
    want = plain("accumulation", 2, interleave=True).estimate()
    for _, _, got in rows:
        assert got == pytest.approx(list(want), rel=1e-5)


def test_a_model_per_example_cannot_measure_stops_with_one_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Scaled(Module):  # a parameter used outside the layers per_example knows
        def __init__(self) -> None:
            super().__init__()
            self.gain = nn.Parameter(torch.ones(4))

        def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
            x, y = batch
            return ce(self.net(x) * self.gain, y)

    callback = GradientNoiseScaleCallback()
    x, y = data()
    trainer = pl.Trainer(
        max_steps=3, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    with caplog.at_level(logging.WARNING):
        trainer.fit(Scaled(), DataLoader(TensorDataset(x, y), batch_size=BATCH))
    assert "gain" in callback.monitor.stopped
    assert sum("no more measurements" in r.message for r in caplog.records) == 1
    assert callback.estimate() is None


@pytest.mark.parametrize(
    ("kw", "message"),
    [
        ({"mode": "split"}, "mode: must be None or one of"),
        ({"mode": "accumulation"}, "mode: accumulation needs accumulate_grad_batches >= 2"),
        ({"mode": "distributed"}, "mode: distributed needs at least 2 processes"),
        ({"window": 1}, "window: "),
    ],
)
def test_bad_set_up_names_the_field(kw: dict, message: str) -> None:
    with pytest.raises(ValueError, match=f"^{message}"):
        fit(GradientNoiseScaleCallback(**kw), steps=1)


def test_a_missing_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "lightning.pytorch", None)  # import now fails
    monkeypatch.delitem(sys.modules, "batchlab.integrations.lightning")
    with pytest.raises(ImportError, match=r"pip install 'batchlab\[lightning\]'"):
        importlib.import_module("batchlab.integrations.lightning")


def test_lr_range_test_of_a_module_equals_the_plain_range_test() -> None:
    """The training step's loss and the configured optimizer, restored after: the curve of
    ``lr_range_test(model, loss_fn, ...)`` on the same model, optimizer and batches."""
    x, y = data()
    loader = DataLoader(TensorDataset(x, y), batch_size=BATCH)
    module = Module()
    before = {k: v.clone() for k, v in module.state_dict().items()}
    got = lr_range_test(module, loader, start_lr=1e-3, end_lr=10.0, steps=12)
    model = net()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    want = plain_lr_range_test(
        model, ce, loader, optimizer=opt, start_lr=1e-3, end_lr=10.0, steps=12
    )
    assert got.losses.tolist() == pytest.approx(want.losses.tolist(), rel=1e-6)
    assert got.suggested_lr == want.suggested_lr
    assert all(torch.equal(before[k], v) for k, v in module.state_dict().items())


class AdamModule(Module):
    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def test_precondition_measures_the_adam_preconditioned_gradient() -> None:
    """``precondition=True``: the trainer's Adam preconditions, as the plain monitor's does."""
    callback = GradientNoiseScaleCallback(precondition=True)
    x, y = data()
    trainer = pl.Trainer(
        max_steps=STEPS, callbacks=[callback], logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
    )  # fmt: skip
    trainer.fit(AdamModule(), DataLoader(TensorDataset(x, y), batch_size=BATCH))
    model = net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    gns = GradientNoiseScale(model, "per_example", loss_fn=ce, precondition=opt)
    for xb, yb in zip(x.split(BATCH), y.split(BATCH), strict=True):
        opt.zero_grad()
        gns.forward_backward(xb, yb)
        opt.step()
    assert callback.estimate().count == STEPS - 1  # no second moments before Adam's first step
    assert callback.estimate() == pytest.approx(gns.estimate(), rel=1e-6)
