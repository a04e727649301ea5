"""Adapter from ``batchlab.core.schedules`` (pure ``step -> lr`` functions) to a torch LR scheduler.

``ScheduleLR`` sets each parameter group's lr to ``schedule(step)``, with the step counted by
``scheduler.step()`` calls (one per optimizer update, as the engine counts). Unlike ``LambdaLR`` the
schedule returns the learning rate itself, not a factor of the optimizer's initial lr, so a schedule
built for lr 3.2 gives 3.2 whatever the optimizer was created with. With one schedule for groups of
different initial lrs, the largest group gets ``schedule(step)`` and every other group keeps its
ratio to it (``engine.optim.set_lr``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from batchlab.core.schedules import Schedule, build_lr_schedule
from batchlab.engine.optim import ratios_to_largest


class ScheduleLR(LRScheduler):
    """Set every parameter group's lr to ``schedule(step)``; one schedule for all groups (each
    keeping its initial ratio to the largest group's lr) or a sequence of one per group.

    The schedules are plain functions, so ``state_dict`` keeps only the step count; rebuild the
    scheduler with the same schedules before ``load_state_dict``.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        schedule: Schedule | Sequence[Schedule],
        last_epoch: int = -1,
    ) -> None:
        groups = len(optimizer.param_groups)
        schedules = [schedule] * groups if callable(schedule) else list(schedule)
        if len(schedules) != groups:
            raise ValueError(
                f"schedule: need one schedule per parameter group ({groups}), got {len(schedules)}"
            )
        self.schedules = schedules
        self.shared = callable(schedule)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        """The learning rate of each group at the current step (``last_epoch``)."""
        ratios = ratios_to_largest(self.base_lrs) if self.shared else [1.0] * len(self.schedules)
        return [float(s(self.last_epoch)) * r for s, r in zip(self.schedules, ratios, strict=True)]

    _get_closed_form_lr = get_lr

    def state_dict(self) -> dict[str, Any]:
        """Scheduler state without the schedule functions (which may be closures)."""
        return {k: v for k, v in self.__dict__.items() if k not in ("optimizer", "schedules")}


def lr_scheduler(
    optimizer: Optimizer, name: str, lr: float, total_steps: float, **options: Any
) -> ScheduleLR:
    """A torch scheduler for ``build_lr_schedule(name, lr, total_steps, **options)`` (``options``:
    its ``warmup_steps``, ``warmup`` and the schedule's own); call ``.step()`` after each
    ``optimizer.step()``.

    >>> import torch
    >>> opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    >>> sched = lr_scheduler(opt, "cosine", 0.1, 100, warmup_steps=10)
    >>> for _ in range(5):
    ...     opt.step()
    ...     sched.step()
    >>> round(opt.param_groups[0]["lr"], 12)
    0.05
    """
    return ScheduleLR(optimizer, build_lr_schedule(name, lr, total_steps, **options))
