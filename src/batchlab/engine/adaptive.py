"""Adaptive batch size in any PyTorch loop: :class:`AdaptiveBatch` reads a ``GradientNoiseScale``
every ``every`` steps, lets :mod:`batchlab.core.adaptive` decide, and tells the loop the batch to
draw next (and how to split it into micro-batches); given the optimizer it also sets each param
group's lr on the rule. ``batchlab train --adaptive-batch`` runs the same object inside the engine.

Example (``per_example`` noise; ``split`` is the same call)::

    >>> import torch
    >>> from torch import nn
    >>> from batchlab.core.adaptive import AdaptiveSettings
    >>> from batchlab.engine.adaptive import AdaptiveBatch
    >>> from batchlab.engine.monitor import GradientNoiseScale
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(4096, 10), torch.randint(0, 3, (4096,))
    >>> model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.05)
    >>> gns = GradientNoiseScale(model, "per_example", loss_fn=nn.functional.cross_entropy)
    >>> settings = AdaptiveSettings(base_batch=8, base_lr=0.05, rule="linear", memory_batch=64,
    ...                             n_train=4096)
    >>> ada = AdaptiveBatch(gns, settings, optimizer=opt)
    >>> for step in range(1, 201):
    ...     idx = torch.randint(0, 4096, (ada.batch_size,))   # draw the batch it asks for
    ...     opt.zero_grad()
    ...     loss = ada.forward_backward(x[idx], y[idx])     # micro-batches beyond memory_batch
    ...     opt.step()
    ...     change = ada.update(step)                       # may grow the batch and set the lr
    >>> ada.batch_size > 8, opt.param_groups[0]["lr"] == 0.05 * ada.lr_scale
    (True, True)
    >>> [c["batch_size"] for c in ada.changes] == sorted(c["batch_size"] for c in ada.changes)
    True

Resuming: ``state_dict()`` holds the controller, its log and the monitor's state, as plain numbers.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from batchlab.core.adaptive import (
    ADAPTIVE_SOURCES,
    AdaptiveSettings,
    AdaptiveState,
    decide,
    initial_state,
    micro_batches,
)
from batchlab.core.noise import DEFAULT_WINDOW
from batchlab.engine.monitor import GradientNoiseScale
from batchlab.engine.spec import SpecError

log = logging.getLogger(__name__)


class AdaptiveBatch:
    """The batch size (and lr factor) a loop uses next, grown from the measured noise scale.

    Args:
        noise: the monitor measuring the noise scale of the model being trained.
        settings: the controller's rule and bounds (``base_batch`` and ``base_lr`` are the start).
        optimizer: when given, each param group's lr is multiplied by the change of ``lr_scale``
            at every change (a loop that sets the lr itself multiplies in ``lr_scale`` instead).
        every: steps between readings; the default, the monitor's window, makes consecutive
            readings independent windows of measurements.
    """

    def __init__(
        self,
        noise: GradientNoiseScale,
        settings: AdaptiveSettings,
        *,
        optimizer: torch.optim.Optimizer | None = None,
        every: int = DEFAULT_WINDOW,
    ) -> None:
        if every < 1:
            raise SpecError("every", f"must be >= 1, got {every}")
        self.noise, self.settings, self.optimizer, self.every = noise, settings, optimizer, every
        self.state: AdaptiveState = initial_state(settings)
        self.changes: list[dict[str, Any]] = []

    @property
    def batch_size(self) -> int:
        """Examples per optimizer step the loop should draw next."""
        return self.state.batch_size

    @property
    def lr_scale(self) -> float:
        """lr(batch_size) / base_lr on the settings' rule."""
        return self.state.lr_scale

    @property
    def micro_batches(self) -> tuple[int, int]:
        """(micro-batch size, count) of the next batch under ``settings.memory_batch``."""
        return micro_batches(self.batch_size, self.settings.memory_batch)

    def forward_backward(self, x: Tensor, y: Tensor) -> Tensor:
        """Forward and backward of the batch through the monitor (modes ``split`` and
        ``per_example``), in equal micro-batches of at most ``settings.memory_batch`` examples:
        ``p.grad`` gets the mean-batch gradient; returns the mean loss."""
        size, count = micro_batches(x.shape[0], self.settings.memory_batch)
        if count == 1:
            return self.noise.forward_backward(x, y)
        saved = [p.grad for p in self.noise.params]
        for p in self.noise.params:
            p.grad = None
        loss = sum(
            self.noise.forward_backward(xm, ym)
            for xm, ym in zip(x.split(size), y.split(size), strict=True)
        )
        for p, old in zip(self.noise.params, saved, strict=True):
            if p.grad is not None:
                p.grad.div_(count)  # each micro-batch added its own mean gradient
                if old is not None:
                    p.grad.add_(old)
            else:
                p.grad = old
        return loss / count

    def update(
        self, step: int, samples: int | None = None, lr: float | None = None
    ) -> dict[str, Any] | None:
        """Call after optimizer step ``step``: every ``every`` steps, read the noise scale and
        decide. Returns the change (also appended to ``changes``) or None.

        ``samples`` (examples seen) and ``lr`` (the loop's lr for the base batch now, default
        ``base_lr``) only go into the record of a change.
        """
        if step % self.every:
            return None
        est = self.noise.estimate()
        reading = (None, None, None) if est is None else (est.value, est.low, est.high)
        before = self.state
        decision = decide(self.settings, before, *reading)
        self.state = decision.state
        if not decision.changed:
            return None
        if self.optimizer is not None:
            for group in self.optimizer.param_groups:
                group["lr"] *= decision.state.lr_scale / before.lr_scale
        base_lr = self.settings.base_lr if lr is None else lr
        change = {
            "step": step,
            "samples": samples,
            "batch_size": decision.state.batch_size,
            "previous_batch_size": before.batch_size,
            "lr": base_lr * decision.state.lr_scale,
            "lr_scale": decision.state.lr_scale,
            "noise_scale": reading[0],
            "noise_scale_low": reading[1],
            "noise_scale_high": reading[2],
            "reason": decision.reason,
        }
        self.changes.append(change)
        log.info("adaptive batch at step %d: %s", step, decision.reason)
        return change

    def summary(self) -> dict[str, Any]:
        """What a run stores: the rule in force, the settings, every change, the final batch."""
        return {
            "rule": self.settings.resolved_rule,
            "source": ADAPTIVE_SOURCES[self.settings.resolved_rule],
            "settings": self.settings.to_dict(),
            "every": self.every,
            "changes": list(self.changes),
            "final_batch_size": self.batch_size,
            "final_lr_scale": self.lr_scale,
        }

    def state_dict(self) -> dict[str, Any]:
        """The controller's state, its change log and the monitor's state, as plain numbers."""
        return {
            "settings": self.settings.to_dict(),
            "every": self.every,
            "state": self.state.to_dict(),
            "changes": [dict(c) for c in self.changes],
            "noise": self.noise.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict` (same settings); the optimizer's lr is not touched:
        restore it with the optimizer's own state dict."""
        if state["settings"] != self.settings.to_dict() or state["every"] != self.every:
            raise SpecError(
                "state_dict", "was saved with other adaptive-batch settings than this object's"
            )
        self.noise.load_state_dict(state["noise"])
        self.state = AdaptiveState.from_dict(state["state"])
        self.changes = [dict(c) for c in state["changes"]]
