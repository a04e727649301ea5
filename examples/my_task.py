"""A user task for batchlab: two interleaved spirals, classified by a small MLP.

Use it from the repository root as ``--task examples.my_task:make_task`` (or ``my_task:make_task``
from inside ``examples/``); batchlab imports the module with the current directory on ``sys.path``
and calls ``make_task`` with the task options as keyword arguments.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
from torch import nn

from batchlab.engine.tasks import Task, accuracy, cross_entropy, seeded_model_factory


@functools.lru_cache(maxsize=4)  # a sweep builds the task once per run: generate the data once
def spirals(n_samples: int, noise: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n_samples`` points on two noisy spiral arms (float32 inputs, int64 labels 0/1)."""
    rng = np.random.default_rng(seed)
    label = rng.integers(0, 2, n_samples)
    t = rng.uniform(0.25, 3.0, n_samples) * np.pi
    angle = t + np.pi * label
    x = np.stack([t * np.cos(angle), t * np.sin(angle)], axis=1) / np.pi
    x += noise * rng.standard_normal(x.shape)
    return torch.tensor(x, dtype=torch.float32), torch.tensor(label, dtype=torch.int64)


def make_task(n_samples: int = 2000, noise: float = 0.05, hidden: int = 64, seed: int = 0) -> Task:
    """The spirals task; every argument is a task option (``get_task(name, hidden=128)``)."""
    x, y = spirals(int(n_samples), float(noise), int(seed))
    n_train = int(0.8 * len(y))

    def build() -> nn.Module:
        return nn.Sequential(
            nn.Linear(2, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
            nn.Linear(hidden, 2),
        )

    # seeded_model_factory: make_model(seed) is deterministic and leaves the global RNG untouched
    return Task(
        name="spirals",
        make_model=seeded_model_factory(build),
        x_train=x[:n_train],
        y_train=y[:n_train],
        x_val=x[n_train:],
        y_val=y[n_train:],
        loss_fn=cross_entropy,  # mean cross-entropy
        metric=accuracy,  # mean accuracy, a 0-dim tensor
        options={"n_samples": n_samples, "noise": noise, "hidden": hidden, "seed": seed},
        description=f"two spirals, MLP 2-{hidden}-{hidden}-2",
    )
