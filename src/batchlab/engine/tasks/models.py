"""Model builders the built-in tasks share: the normalization option and a plain MLP."""

from __future__ import annotations

import itertools
from typing import Any

from torch import nn

from batchlab.engine.ghost_bn import GhostBatchNorm
from batchlab.engine.spec import SpecError
from batchlab.engine.tasks.base import _Option

NORMS = ("none", "batch", "ghost")


def norm_layer(norm: str, num_features: int, ghost_batch_size: int, dims: int = 1) -> nn.Module:
    """The normalization layer of a task option ``norm``: identity, batch norm or ghost batch norm.

    ``dims`` is 1 for ``(N, C)`` / ``(N, C, L)`` activations and 2 for ``(N, C, H, W)``.
    """
    if norm == "none":
        return nn.Identity()
    if norm == "batch":
        return nn.BatchNorm2d(num_features) if dims == 2 else nn.BatchNorm1d(num_features)
    if norm == "ghost":
        return GhostBatchNorm(num_features, ghost_batch_size)
    raise SpecError("task_options.norm", f"must be one of {', '.join(NORMS)}, got {norm!r}")


class MLP(nn.Sequential):
    """Fully connected ReLU network ``sizes[0] -> ... -> sizes[-1]``, optional norm after each hidden
    linear layer."""

    def __init__(self, sizes: tuple[int, ...], norm: str = "none", ghost_batch_size: int = 32):
        layers: list[nn.Module] = []
        for n_in, n_out in itertools.pairwise(sizes[:-1]):
            layers += [nn.Linear(n_in, n_out), norm_layer(norm, n_out, ghost_batch_size), nn.ReLU()]
        super().__init__(*layers, nn.Linear(sizes[-2], sizes[-1]))


_NORM_OPTIONS = {
    "norm": _Option(
        "none", "normalization after hidden layers: none, batch, ghost", str, choices=NORMS
    ),
    "ghost_batch_size": _Option(32, "examples per ghost batch when norm = ghost", low=1),
}


COMMON_OPTIONS = tuple(_NORM_OPTIONS)  # options every built-in classifier takes


def _norm_kwargs(o: dict[str, Any]) -> dict[str, Any]:
    return {"norm": o["norm"], "ghost_batch_size": o["ghost_batch_size"]}
