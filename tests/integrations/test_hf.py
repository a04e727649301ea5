"""The Hugging Face callback in a real ``Trainer`` on a tiny randomly initialised GPT-2 (built from a
config, nothing downloaded) against the plain monitor on the batches the Trainer drew."""

from __future__ import annotations

import importlib
import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

transformers = pytest.importorskip("transformers")

from batchlab.engine.monitor import GradientNoiseScale  # noqa: E402
from batchlab.integrations.hf import GradientNoiseScaleCallback, lr_range_test  # noqa: E402

VOCAB, SEQ, N = 48, 12, 48


def gpt2() -> nn.Module:
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_positions=SEQ, n_embd=32, n_layer=2, n_head=2,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def examples() -> list[dict[str, Tensor]]:
    """Counting sequences (random start, stride 1 or 3): a clear gradient signal from the start."""
    gen = torch.Generator().manual_seed(0)
    start = torch.randint(0, VOCAB, (N, 1), generator=gen)
    stride = 1 + 2 * torch.randint(0, 2, (N, 1), generator=gen)
    seqs = (start + stride * torch.arange(SEQ)) % VOCAB
    return [{"input_ids": s, "labels": s} for s in seqs]


def lm_loss(logits: Tensor, ids: Tensor) -> Tensor:
    """The Trainer's loss: next-token cross-entropy summed, over the number of labels (all
    ``SEQ`` of each sequence, though ``SEQ - 1`` are predicted)."""
    pred, target = logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten()
    return nn.functional.cross_entropy(pred, target, reduction="sum") / ids.numel()


class Logits(nn.Module):
    """``model(x)`` -> logits, for the plain monitor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: Tensor) -> Tensor:
        return self.model(input_ids=ids).logits


def train(
    callback: GradientNoiseScaleCallback,
    out: Path,
    accumulate: int = 1,
    steps: int = 4,
    resume: Path | None = None,
    **kw: object,
) -> tuple[nn.Module, list[Tensor], transformers.Trainer]:
    """A Trainer run at learning rate 0 (the weights stay, so any monitor sees the same gradients);
    returns the model, the micro-batches it trained on and the trainer."""
    model = gpt2()
    seen: list[Tensor] = []
    model.register_forward_pre_hook(
        lambda m, a, k: seen.append(k["input_ids"]) if m.training else None, with_kwargs=True
    )
    args = transformers.TrainingArguments(
        output_dir=str(out),
        per_device_train_batch_size=8 // accumulate,
        gradient_accumulation_steps=accumulate,
        max_steps=steps,
        learning_rate=0.0,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
        **{"save_strategy": "no", **kw},
    )
    trainer = transformers.Trainer(
        model=model, args=args, train_dataset=examples(), callbacks=[callback]
    )
    trainer.train(resume_from_checkpoint=None if resume is None else str(resume))
    return model, seen, trainer


def plain(mode: str, batches: list[Tensor], accumulate: int) -> GradientNoiseScale:
    model = Logits(gpt2())
    gns = GradientNoiseScale(model, mode, loss_fn=lm_loss)
    for i in range(0, len(batches), accumulate):
        model.zero_grad()
        step = batches[i : i + accumulate]
        if mode == "per_example":
            gns.forward_backward(step[0], step[0])
            continue
        for ids in step:
            (lm_loss(model(ids), ids) / len(step)).backward()
            gns.after_backward(len(ids))
        gns.before_step()
    return gns


@pytest.mark.parametrize(("accumulate", "mode"), [(1, "per_example"), (2, "accumulation")])
def test_callback_estimate_equals_the_plain_monitor_on_the_same_batches(
    tmp_path: Path, accumulate: int, mode: str
) -> None:
    callback = GradientNoiseScaleCallback()
    _, seen, trainer = train(callback, tmp_path, accumulate)
    assert callback.monitor.gns.mode == mode and callback.monitor.stopped is None
    assert len(seen) == 4 * accumulate
    got, want = callback.estimate(), plain(mode, seen, accumulate).estimate()
    assert got.count == 4
    assert got == pytest.approx(want, rel=1e-4)
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert logged[-1]["noise_scale"] == pytest.approx(want.value, rel=1e-4)
    assert logged[-1]["suggested_batch_size"] == round(want.value)
    assert "noise_scale" not in logged[0]  # one measurement is no estimate yet


def test_resumed_training_continues_the_same_estimate(tmp_path: Path) -> None:
    first = GradientNoiseScaleCallback()
    train(first, tmp_path / "a", steps=4, save_strategy="steps", save_steps=2)
    saved = json.loads((tmp_path / "a" / "checkpoint-2" / "trainer_state.json").read_text())
    assert (
        saved["stateful_callbacks"]["GradientNoiseScaleCallback"]["args"]["saved_state"]["step"]
        == 2
    )
    resumed = GradientNoiseScaleCallback()
    train(resumed, tmp_path / "a", steps=4, resume=tmp_path / "a" / "checkpoint-2")
    assert resumed.estimate().count == 4
    assert resumed.estimate() == pytest.approx(first.estimate(), rel=1e-9)


def test_bf16_autocast_agrees_with_float32(tmp_path: Path) -> None:
    callback = GradientNoiseScaleCallback()
    _, seen, _ = train(callback, tmp_path, accumulate=2, bf16=True)
    want = plain("accumulation", seen, 2).estimate()
    assert callback.estimate().value == pytest.approx(want.value, rel=0.05)


def test_bad_mode_names_the_field(tmp_path: Path) -> None:
    with pytest.raises(
        ValueError, match=r"^mode: per_example needs gradient_accumulation_steps = 1"
    ):
        train(GradientNoiseScaleCallback("per_example"), tmp_path, accumulate=2)
    with pytest.raises(ValueError, match=r"^mode: must be None or one of"):
        GradientNoiseScaleCallback("split")


def test_a_missing_extra_says_what_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # import now fails
    monkeypatch.delitem(sys.modules, "batchlab.integrations.hf")
    with pytest.raises(ImportError, match=r"pip install 'batchlab\[hf\]'"):
        importlib.import_module("batchlab.integrations.hf")


def test_import_batchlab_loads_no_integration() -> None:
    import subprocess

    code = "import batchlab, sys; print(sorted(m for m in sys.modules if 'integrations' in m or m in ('lightning', 'transformers')))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
    logging.getLogger(__name__).debug(done.stderr)


def test_lr_range_test_of_a_model_runs_on_trainer_batches_and_restores_it() -> None:
    model = gpt2()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    loader = torch.utils.data.DataLoader(examples(), batch_size=8)  # dicts, as the Trainer's
    result = lr_range_test(model, loader, start_lr=1e-4, end_lr=1.0, steps=10)
    assert len(result.losses) == 10  # the loader restarts when it runs out, as the Trainer's
    assert 1e-4 <= result.suggested_lr <= 1.0
    assert result.initial_loss == pytest.approx(float(model(**next(iter(loader))).loss), rel=1e-5)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
