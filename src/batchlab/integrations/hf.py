"""The gradient noise scale in the Hugging Face ``Trainer``: ``callbacks=[GradientNoiseScaleCallback()]``.

The callback measures ``B_simple`` (McCandlish et al. 2018) with :class:`GradientNoiseScale` in the
mode that needs no forward pass of its own: ``per_example`` at ``gradient_accumulation_steps=1``
(the model's training forward, loss included, is recorded by forward hooks), ``accumulation``
otherwise. A callback sees neither the batch nor the end of backward, so hooks on the model give
the batch size (the first tensor argument, e.g. ``input_ids``) and queue a read at the end of each
training backward: gradients are read there, before the Trainer clips them, and the last
micro-batch of a step (accelerate's ``sync_gradients``) closes the measurement. Under fp16 it reads
accelerate's ``GradScaler``. ``noise_scale``, ``noise_scale_low``, ``noise_scale_high`` and
``suggested_batch_size`` are added to the Trainer's training logs (``trainer.state.log_history``
and the callbacks after this one), and the estimate is saved in each checkpoint's
``trainer_state.json``, so ``trainer.train(resume_from_checkpoint=...)`` continues it. Needs
``pip install 'batchlab[hf]'``; one process only.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Any

import torch
from torch import Tensor, nn

from batchlab.core.noise import DEFAULT_WINDOW, NoiseEstimate
from batchlab.engine.lr_finder import LRRangeResult
from batchlab.errors import FieldError
from batchlab.integrations._common import (
    TrainerMonitor,
    check_mode,
    choose_mode,
    require,
    step_range_test,
)

transformers = require("transformers", "hf")
_accelerate_state = require("accelerate.state", "hf")


def _first_tensor(items: Any) -> Tensor | None:
    """The first tensor in a model's arguments or output (a ``ModelOutput`` is a dict)."""
    if isinstance(items, Tensor):
        return items
    if isinstance(items, dict):
        items = list(items.values())
    if isinstance(items, list | tuple):
        for item in items:
            found = _first_tensor(item)
            if found is not None:
                return found
    return None


class GradientNoiseScaleCallback(
    transformers.TrainerCallback, transformers.trainer_callback.ExportableState
):
    """Measure the gradient noise scale of the model the ``Trainer`` trains and log it.

    Args:
        mode: ``None`` (from ``gradient_accumulation_steps``), ``"per_example"`` or
            ``"accumulation"``.
        window: measured steps an estimate averages (``None``: all of them).
        every: measure every ``every``-th optimizer step.
        confidence: coverage of the logged interval.
        precondition: measure the Adam-preconditioned gradient (the optimizer must be Adam/AdamW).
        saved_state: a monitor state to continue (what the Trainer restores from a checkpoint).
    """

    def __init__(
        self,
        mode: str | None = None,
        *,
        window: int | None = DEFAULT_WINDOW,
        every: int = 1,
        confidence: float = 0.95,
        precondition: bool = False,
        saved_state: dict[str, Any] | None = None,
    ) -> None:
        check_mode(mode)
        self.args = {
            "mode": mode,
            "window": window,
            "every": every,
            "confidence": confidence,
            "precondition": precondition,
        }
        self.monitor = TrainerMonitor(window=window, every=every, confidence=confidence)
        self.monitor.load_state_dict(saved_state)
        self._handles: list = []

    def on_train_begin(self, args, state, control, model: nn.Module, optimizer, **kwargs) -> None:
        """Build the monitor and hook the model; continue a state restored with the checkpoint."""
        if args.world_size > 1:
            raise FieldError("world_size", "the Hugging Face callback runs in one process only")
        mode = choose_mode(
            self.args["mode"], args.gradient_accumulation_steps, 1, "gradient_accumulation_steps"
        )
        saved = state.stateful_callbacks.get(type(self).__name__)
        if isinstance(saved, dict) and state.global_step > 0:  # resumed from a checkpoint
            self.monitor.load_state_dict(saved.get("args", {}).get("saved_state"))
        inner = getattr(optimizer, "optimizer", optimizer)  # accelerate wraps the optimizer
        self.monitor.start(
            model,
            mode,
            scaler=getattr(optimizer, "scaler", None),
            precondition=inner if self.args["precondition"] else None,
        )
        self._unhook()
        self._handles = [
            model.register_forward_pre_hook(self._before_forward, with_kwargs=True),
            model.register_forward_hook(self._after_forward, always_call=True),
        ]

    def _before_forward(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if module.training and torch.is_grad_enabled():
            named = kwargs.get("input_ids", kwargs.get("inputs_embeds"))
            first = _first_tensor([named, args, kwargs])
            self.monitor.begin_forward(0 if first is None or first.dim() == 0 else first.shape[0])

    def _after_forward(self, module: nn.Module, args: tuple, output: Any) -> None:
        if not (module.training and torch.is_grad_enabled()):
            return
        self.monitor.end_forward()
        loss = getattr(output, "loss", None)
        out = loss if isinstance(loss, Tensor) else _first_tensor(output)
        if out is not None and out.requires_grad:
            out.register_hook(self._queue_after_backward)

    def _queue_after_backward(self, grad: Tensor) -> None:
        """Runs as backward reaches the output: the read waits for the end of this backward."""
        torch.autograd.Variable._execution_engine.queue_callback(self._after_backward)

    def _after_backward(self) -> None:
        self.monitor.after_backward()
        if _accelerate_state.GradientState().sync_gradients:  # the step's last micro-batch
            self.monitor.before_step()

    def on_log(self, args, state, control, logs: dict[str, float] | None = None, **kwargs) -> None:
        """Add the estimate to a training log (not to evaluation logs)."""
        if logs is None or "loss" not in logs:
            return
        values = self.monitor.metrics()
        logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)

    def on_train_end(self, args, state, control, **kwargs) -> None:
        """Unhook the model (the estimate stays readable)."""
        self._unhook()
        self.monitor.close()

    def _unhook(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def estimate(self) -> NoiseEstimate | None:
        """The current estimate (``None`` before two measurements)."""
        return None if self.monitor.gns is None else self.monitor.gns.estimate()

    def state(self) -> dict[str, Any]:
        """What ``trainer_state.json`` keeps: the arguments and the monitor's state (plain numbers)."""
        return {"args": {**self.args, "saved_state": self.monitor.state_dict()}, "attributes": {}}


class _Pairs:
    """Batches of a Hugging Face ``DataLoader`` (dicts) as ``(input_ids, labels)`` pairs, re-iterable."""

    def __init__(self, batches: Iterable[Mapping[str, Tensor]]) -> None:
        self.batches = batches

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for batch in self.batches:
            yield batch["input_ids"], batch.get("labels", batch["input_ids"])


def lr_range_test(
    model: nn.Module,
    batches: Iterable[Mapping[str, Tensor]],
    optimizer: str | torch.optim.Optimizer = "adamw",
    **options: Any,
) -> LRRangeResult:
    """LR range test of a Hugging Face model on batches of ``input_ids`` (and ``labels``; the
    ``input_ids`` when absent, as for causal LMs), with the loss the model computes; weights,
    optimizer and RNG are restored after. ``options`` go to
    :func:`batchlab.engine.lr_finder.lr_range_test` (``start_lr``, ``end_lr``, ``steps``,
    optimizer options such as ``weight_decay``)."""

    def step_loss(ids: Tensor, labels: Tensor) -> Tensor:
        return model(input_ids=ids, labels=labels).loss

    return step_range_test(model, step_loss, _Pairs(batches), optimizer, **options)
