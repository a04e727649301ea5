"""scikit-learn's bundled 8x8 digits: small and fast, for tests."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np
from torch import nn

from batchlab.engine.tasks.base import Data, _as_tensors
from batchlab.engine.tasks.models import MLP, _norm_kwargs


@functools.lru_cache(maxsize=4)
def _digits_data(train_split: float, seed: int) -> Data:
    """scikit-learn's 1,797 8x8 digits scaled to [0, 1], split by a seeded permutation."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    train, val = np.split(order, [int(len(y) * train_split)])
    return _as_tensors(x[train] / 16.0, y[train], x[val] / 16.0, y[val])


def _build_digits(o: dict[str, Any]) -> tuple[Callable[[], nn.Module], Data]:
    data = _digits_data(o["train_split"], o["data_seed"])
    return functools.partial(MLP, (64, o["hidden"], 10), **_norm_kwargs(o)), data
