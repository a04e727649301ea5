"""Synthetic teacher-student classification with a label-noise knob, so that the gradient noise
scale can be controlled."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from torch import nn

from batchlab.engine.tasks.base import Data, _as_tensors, _check_split
from batchlab.engine.tasks.models import MLP, _norm_kwargs


def _teacher(dim: int, classes: int, seed: int) -> Callable[[np.ndarray], np.ndarray]:
    """A random one-hidden-layer tanh network ``x -> label`` whose class biases are calibrated on a
    reference sample so that the classes are about equally frequent under ``x ~ N(0, I)``."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((dim, 32)) / math.sqrt(dim)
    w2 = rng.standard_normal((32, classes)) / math.sqrt(32)
    reference = np.tanh(rng.standard_normal((max(20000, 200 * classes), dim)) @ w1) @ w2
    bias = np.zeros(classes)
    for _ in range(100):
        counts = np.bincount((reference + bias).argmax(axis=1), minlength=classes)
        bias -= 0.1 * np.log((counts + 1) / (len(reference) / classes))
    return lambda x: (np.tanh(x @ w1) @ w2 + bias).argmax(axis=1)


@functools.lru_cache(maxsize=8)
def _teacher_data(
    n_train: int,
    n_val: int,
    dim: int,
    classes: int,
    label_noise: float,
    teacher_seed: int,
    seed: int,
) -> Data:
    """Gaussian inputs labelled by a random teacher network; a ``label_noise`` fraction of training
    labels replaced by uniformly random classes (validation labels stay clean)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n_train + n_val, dim))
    y = _teacher(dim, classes, teacher_seed)(x)
    flip = rng.random(n_train) < label_noise
    y[:n_train][flip] = rng.integers(0, classes, size=int(flip.sum()))
    return _as_tensors(x[:n_train], y[:n_train], x[n_train:], y[n_train:])


def _build_teacher(o: dict[str, Any]) -> tuple[Callable[[], nn.Module], Data]:
    n_train, n_val = _check_split(o)
    data = _teacher_data(
        n_train, n_val, o["dim"], o["classes"], o["label_noise"], o["teacher_seed"], o["data_seed"]
    )
    sizes = (o["dim"], o["hidden"], o["hidden"], o["classes"])
    return functools.partial(MLP, sizes, **_norm_kwargs(o)), data
