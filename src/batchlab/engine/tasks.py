"""Tasks: a seeded model factory, train/validation tensors, a loss and a metric.

TODO(tasks helper): built-in tasks, registry, ``get_task``, ``list_tasks``, user ``module:function``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch import Tensor, nn


@dataclass(eq=False)
class Task:
    """What a run trains: ``make_model(seed)`` plus data, ``loss_fn`` (mean over the batch) and
    ``metric`` (mean over the batch, higher is better, e.g. accuracy)."""

    name: str
    make_model: Callable[[int], nn.Module]
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    loss_fn: Callable[[Tensor, Tensor], Tensor]
    metric: Callable[[Tensor, Tensor], Tensor]
    metric_name: str = "accuracy"
    options: dict[str, Any] = field(default_factory=dict)
    description: str = ""

    @property
    def n_train(self) -> int:
        """Number of training examples (the epoch length in samples)."""
        return int(self.x_train.shape[0])

    def num_parameters(self) -> int:
        """Trainable parameter count of ``make_model(0)``."""
        return sum(p.numel() for p in self.make_model(0).parameters() if p.requires_grad)

    def to(self, device: torch.device | str) -> Task:
        """The same task with its tensors on ``device`` (data lives on the device)."""
        return replace(
            self,
            x_train=self.x_train.to(device),
            y_train=self.y_train.to(device),
            x_val=self.x_val.to(device),
            y_val=self.y_val.to(device),
        )
