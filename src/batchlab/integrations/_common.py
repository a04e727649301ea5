"""What the trainer callbacks share: importing an optional extra, choosing the mode from the
trainer's set-up, driving ``GradientNoiseScale`` from a trainer's hooks, the numbers logged."""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Callable, Iterable
from contextlib import ExitStack
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from batchlab.engine.lr_finder import LRRangeResult, lr_range_test
from batchlab.engine.monitor import GradientNoiseScale
from batchlab.errors import FieldError

log = logging.getLogger(__name__)

TRAINER_MODES = ("per_example", "accumulation", "distributed")


def require(module: str, extra: str) -> ModuleType:
    """Import ``module`` of an optional extra, or say which extra installs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(
            f"batchlab.integrations.{extra} needs {module.split('.')[0]}, which is not installed: "
            f"pip install 'batchlab[{extra}]'"
        ) from exc


def check_mode(mode: str | None) -> None:
    """A callback's ``mode``: ``None`` (chosen from the trainer) or one that needs no forward pass
    of its own."""
    if mode is not None and mode not in TRAINER_MODES:
        raise FieldError(
            "mode",
            f"must be None or one of {', '.join(TRAINER_MODES)} (split needs forward passes of "
            f"its own), got {mode!r}",
        )


def choose_mode(mode: str | None, accumulation: int, world_size: int, setting: str) -> str:
    """The mode for a trainer with ``accumulation`` micro-batches per step on ``world_size``
    processes: the one that needs no forward pass of its own, or ``mode`` if it fits.

    ``setting`` names the trainer's accumulation option in errors.

    >>> choose_mode(None, 1, 1, "accumulate_grad_batches"), choose_mode(None, 4, 1, "x")
    ('per_example', 'accumulation')
    """
    check_mode(mode)
    if mode is None:
        if world_size > 1:
            return "distributed"
        return "accumulation" if accumulation > 1 else "per_example"
    if world_size > 1 and mode != "distributed":
        raise FieldError("mode", f"{mode} cannot run on {world_size} processes: use 'distributed'")
    if mode == "distributed" and world_size < 2:
        raise FieldError("mode", "distributed needs at least 2 processes (strategy 'ddp')")
    if mode == "accumulation" and accumulation < 2:
        raise FieldError("mode", f"accumulation needs {setting} >= 2, got {accumulation}")
    if mode == "per_example" and accumulation > 1:
        raise FieldError(
            "mode", f"per_example needs {setting} = 1, got {accumulation}: use 'accumulation'"
        )
    return mode


def noise_metrics(gns: GradientNoiseScale | None) -> dict[str, float]:
    """``noise_scale``, its interval and ``suggested_batch_size`` (the critical batch, about
    ``B_simple``; McCandlish et al. 2018); empty before two measurements."""
    est = None if gns is None else gns.estimate()
    if est is None:
        return {}
    out = {"noise_scale": est.value, "noise_scale_low": est.low, "noise_scale_high": est.high}
    if math.isfinite(est.value) and est.value > 0:
        out["suggested_batch_size"] = float(max(1, round(est.value)))
    return out


class TrainerMonitor:
    """A ``GradientNoiseScale`` driven by a trainer's hooks: ``begin_forward`` / ``end_forward``
    around each training forward, ``after_backward`` after its backward, ``before_step`` before
    the optimizer step. Keeps a loaded state until the monitor starts (trainers restore
    checkpoints before their models are ready); stops measuring, with one warning, when
    ``per_example`` cannot measure the model (its fallback needs forward passes of its own)."""

    def __init__(self, *, window: int | None, every: int, confidence: float) -> None:
        self.options = {"window": window, "every": every, "confidence": confidence}
        GradientNoiseScale(nn.Linear(1, 1), "accumulation", **self.options).remove()  # checks
        self.gns: GradientNoiseScale | None = None
        self.stopped: str | None = None
        self._saved: dict[str, Any] | None = None
        self._forward = ExitStack()
        self._batch = 0

    def start(
        self,
        model: nn.Module,
        mode: str,
        scaler: torch.amp.GradScaler | None,
        precondition: torch.optim.Optimizer | None,
    ) -> None:
        """Build the monitor on the trainer's model and apply any saved state."""
        self.close()
        self.gns = GradientNoiseScale(
            model, mode, scaler=scaler, precondition=precondition, **self.options
        )
        self.stopped = None
        if self._saved is not None:
            self.gns.load_state_dict(self._saved)
            self._saved = None
            self._check_fallback()

    @property
    def active(self) -> bool:
        """Started and measuring."""
        return self.gns is not None and self.stopped is None

    def begin_forward(self, batch_size: int) -> None:
        """A training forward of ``batch_size`` examples starts (``per_example`` records it)."""
        self.end_forward()
        self._batch = batch_size
        if self.active and self.gns.mode == "per_example":
            self._forward.enter_context(self.gns.recording(batch_size))

    def end_forward(self) -> None:
        """The training forward (and its loss) is over."""
        self._forward.close()

    def after_backward(self) -> None:
        """The backward of the last forward is over: its gradients are read."""
        self.end_forward()
        if self.active and self._batch > 0:
            self.gns.after_backward(self._batch)
            self._check_fallback()

    def before_step(self) -> None:
        """The optimizer is about to step with the accumulated gradient."""
        if self.active:
            self.gns.before_step()
        self._batch = 0

    def _check_fallback(self) -> None:
        if self.gns.fallback is not None and self.stopped is None:
            self.stopped = self.gns.fallback
            log.warning(
                "noise scale: per_example cannot measure this model (%s); no more measurements: "
                "use gradient accumulation (mode 'accumulation') or DDP ('distributed')",
                self.stopped,
            )
            self.gns.remove()

    def _sync(self) -> None:
        """``distributed``: share the measurements not yet shared (every rank calls this)."""
        if self.gns is not None and self.gns.mode == "distributed":
            self.gns.sync()

    def metrics(self) -> dict[str, float]:
        """What the callback logs (see :func:`noise_metrics`); collective in ``distributed``."""
        self._sync()
        return noise_metrics(self.gns)

    def state_dict(self) -> dict[str, Any] | None:
        """The monitor's state for a checkpoint (``None`` before it starts and loads nothing)."""
        if self.gns is None:
            return self._saved
        self._sync()
        return self.gns.state_dict()

    def load_state_dict(self, state: dict[str, Any] | None) -> None:
        """Continue from :meth:`state_dict`, now or when the monitor starts."""
        if state is None:
            return
        if self.gns is None:
            self._saved = state
        else:
            self.gns.load_state_dict(state)
            self._check_fallback()

    def finish(self) -> None:
        """Training ended on every rank: share what is left, then unhook."""
        self._sync()
        self.close()

    def close(self) -> None:
        """Unhook the monitor (training ended or failed)."""
        self.end_forward()
        if self.gns is not None:
            self.gns.remove()


class _Passthrough(nn.Module):
    """``model(x) = x`` over the trainer's model: its parameters, its train/eval mode and its state
    are what ``lr_range_test`` updates and restores, while the loss function runs the step."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: Tensor) -> Tensor:
        return x


def step_range_test(
    model: nn.Module,
    step_loss: Callable[[Tensor, Tensor], Tensor],
    batches: Iterable[tuple[Tensor, Tensor]],
    optimizer: str | torch.optim.Optimizer,
    **options: Any,
) -> LRRangeResult:
    """:func:`batchlab.engine.lr_finder.lr_range_test` where ``step_loss(x, y)`` is a trainer's
    training-step loss on the batch ``(x, y)``; model, optimizer and RNG are restored after."""
    return lr_range_test(_Passthrough(model), step_loss, batches, optimizer=optimizer, **options)
