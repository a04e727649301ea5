"""The gradient noise scale in Lightning: ``Trainer(callbacks=[GradientNoiseScaleCallback()])``.

The callback measures ``B_simple`` (McCandlish et al. 2018) with :class:`GradientNoiseScale` in the
mode that needs no forward pass of its own: ``per_example`` at ``accumulate_grad_batches=1`` (the
training step's forward is recorded between ``on_train_batch_start`` and ``on_before_backward``;
the loss must be a mean over the batch), ``accumulation`` with gradient accumulation,
``distributed`` under DDP (the local gradients, read by a comm hook). Under ``precision="16-mixed"``
it reads the precision plugin's ``GradScaler``. It logs ``noise_scale``, ``noise_scale_low``,
``noise_scale_high`` and ``suggested_batch_size`` with ``pl_module.log`` at the trainer's
``log_every_n_steps``, and its state goes into checkpoints, so ``fit(ckpt_path=...)`` continues
the same estimate. Needs ``pip install 'batchlab[lightning]'``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

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

pl = require("lightning.pytorch", "lightning")
_data = require("lightning.pytorch.utilities.data", "lightning")


class GradientNoiseScaleCallback(pl.Callback):
    """Measure and log the gradient noise scale of the ``LightningModule`` being fitted.

    Args:
        mode: ``None`` (chosen from the trainer), ``"per_example"``, ``"accumulation"`` or
            ``"distributed"``.
        window: measured steps an estimate averages (``None``: all of them).
        every: measure every ``every``-th optimizer step.
        confidence: coverage of the logged interval.
        precondition: measure the Adam-preconditioned gradient of the (single) Adam/AdamW optimizer.
    """

    def __init__(
        self,
        mode: str | None = None,
        *,
        window: int | None = DEFAULT_WINDOW,
        every: int = 1,
        confidence: float = 0.95,
        precondition: bool = False,
    ) -> None:
        check_mode(mode)
        self.mode, self.precondition = mode, precondition
        self.monitor = TrainerMonitor(window=window, every=every, confidence=confidence)
        self._stepped = False

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Build the monitor on the (possibly DDP-wrapped) model, with any restored state."""
        if not pl_module.automatic_optimization or len(trainer.optimizers) != 1:
            raise FieldError(
                "pl_module",
                "GradientNoiseScaleCallback needs automatic optimization with one optimizer",
            )
        mode = choose_mode(
            self.mode,
            trainer.accumulate_grad_batches,
            trainer.world_size,
            "accumulate_grad_batches",
        )
        model = pl_module
        if mode == "distributed":
            model = trainer.strategy.model
            if not isinstance(model, DistributedDataParallel):
                raise FieldError(
                    "mode", "distributed needs strategy 'ddp' (a DistributedDataParallel model)"
                )
        optimizer = trainer.optimizers[0]
        self.monitor.start(
            model,
            mode,
            scaler=getattr(trainer.precision_plugin, "scaler", None),
            precondition=optimizer if self.precondition else None,
        )

    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        """Note the batch size; ``per_example`` starts recording the training step's forward."""
        self.monitor.begin_forward(_data.extract_batch_size(batch))

    def on_before_backward(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: torch.Tensor
    ) -> None:
        """The forward and the loss are done."""
        self.monitor.end_forward()

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Read this (micro-)batch's gradient."""
        self.monitor.after_backward()

    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        """Read the accumulated gradient before clipping and the step."""
        self.monitor.before_step()
        self._stepped = True

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        """Log the estimate after an optimizer step, at the trainer's logging interval."""
        self.monitor.end_forward()  # a training step that returned no loss ran no backward
        stepped, self._stepped = self._stepped, False
        every = trainer.log_every_n_steps
        if stepped and every > 0 and trainer.global_step % every == 0:
            values = self.monitor.metrics()
            if values:
                pl_module.log_dict(values, on_step=True, on_epoch=False)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Remove the monitor's hooks (its estimate stays readable)."""
        self.monitor.finish()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        """Remove the hooks when fitting stops on an exception."""
        self.monitor.close()

    def estimate(self) -> NoiseEstimate | None:
        """The current estimate (``None`` before two measurements)."""
        return None if self.monitor.gns is None else self.monitor.gns.estimate()

    def state_dict(self) -> dict[str, Any]:
        """The monitor's state, saved in Lightning checkpoints (plain numbers)."""
        return {"monitor": self.monitor.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the saved estimate (applied when training starts)."""
        self.monitor.load_state_dict(state_dict.get("monitor"))


def _optimizer(configured: Any) -> torch.optim.Optimizer:
    """The optimizer of ``configure_optimizers()`` (alone, first of a list, or under ``"optimizer"``)."""
    if isinstance(configured, Mapping):
        configured = configured.get("optimizer")
    elif isinstance(configured, list | tuple) and configured:
        return _optimizer(configured[0])
    if not isinstance(configured, torch.optim.Optimizer):
        raise FieldError(
            "configure_optimizers", f"must give a torch optimizer, got {type(configured).__name__}"
        )
    return configured


def lr_range_test(
    module: pl.LightningModule, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], **options: Any
) -> LRRangeResult:
    """LR range test of a ``LightningModule``: its ``training_step`` loss on ``(x, y)`` batches
    (e.g. the train ``DataLoader``) with the optimizer of its ``configure_optimizers``; weights,
    optimizer state and RNG are restored after. ``options`` go to
    :func:`batchlab.engine.lr_finder.lr_range_test` (``start_lr``, ``end_lr``, ``steps``, ...)."""

    def step_loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = module.training_step((x, y), 0)
        return out["loss"] if isinstance(out, Mapping) else out

    return step_range_test(
        module, step_loss, batches, _optimizer(module.configure_optimizers()), **options
    )
