"""MNIST-1D (Greydanus 2020, "Scaling down deep learning"): data generated with
``mnist1d.data.make_dataset`` (never its download path), the paper's MLP and CNN."""

from __future__ import annotations

import contextlib
import functools
import logging
import random
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
from torch import Tensor, nn

from batchlab.engine.spec import SpecError
from batchlab.engine.tasks.base import Builder, Data, _as_tensors, _check_split
from batchlab.engine.tasks.models import _norm_kwargs, norm_layer

log = logging.getLogger(__name__)


class Mnist1dMLP(nn.Module):
    """The MNIST-1D paper's MLP: 40 -> 100 -> 100 -> 10, ReLU, the second layer residual."""

    def __init__(self, norm: str = "none", ghost_batch_size: int = 32, width: int = 100):
        super().__init__()
        self.linear1 = nn.Linear(40, width)
        self.norm1 = norm_layer(norm, width, ghost_batch_size)
        self.linear2 = nn.Linear(width, width)
        self.norm2 = norm_layer(norm, width, ghost_batch_size)
        self.linear3 = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm1(self.linear1(x)).relu()
        h = h + self.norm2(self.linear2(h)).relu()
        return self.linear3(h)


class Mnist1dCNN(nn.Module):
    """The MNIST-1D paper's CNN: three stride-2 Conv1d layers of 25 channels, then a linear layer."""

    def __init__(self, norm: str = "none", ghost_batch_size: int = 32, channels: int = 25):
        super().__init__()
        self.convs = nn.ModuleList(
            [
                nn.Conv1d(1, channels, 5, stride=2, padding=1),  # 40 -> 19
                nn.Conv1d(channels, channels, 3, stride=2, padding=1),  # 19 -> 10
                nn.Conv1d(channels, channels, 3, stride=2, padding=1),  # 10 -> 5
            ]
        )
        self.norms = nn.ModuleList(norm_layer(norm, channels, ghost_batch_size) for _ in range(3))
        self.linear = nn.Linear(channels * 5, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = x.unsqueeze(-2)  # (N, 40) -> (N, 1, 40)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            h = norm(conv(h)).relu()
        return self.linear(h.flatten(-2))


@contextlib.contextmanager
def _global_rngs_preserved() -> Iterator[None]:
    """Restore Python's and numpy's global RNG states (``mnist1d`` reseeds both)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


@functools.lru_cache(maxsize=8)
def _mnist1d_data(n_samples: int, train_split: float, seed: int) -> Data:
    """MNIST-1D generated with the package's defaults except the three given fields."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples, args.train_split, args.seed = n_samples, train_split, seed
    log.info("generating MNIST-1D: %d samples, seed %d", n_samples, seed)
    with _global_rngs_preserved():
        data = make_dataset(args)
    return _as_tensors(data["x"], data["y"], data["x_test"], data["y_test"])


def _mnist1d(model: type[nn.Module]) -> Builder:
    def build(o: dict[str, Any]) -> tuple[Callable[[], nn.Module], Data]:
        if o["n_samples"] % 10:
            raise SpecError(
                "task_options.n_samples",
                f"must be a multiple of 10 (one tenth per digit), got {o['n_samples']}",
            )
        _check_split(o)
        data = _mnist1d_data(o["n_samples"], o["train_split"], o["data_seed"])
        return functools.partial(model, **_norm_kwargs(o)), data

    return build
