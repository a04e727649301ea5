"""Fashion-MNIST (Xiao, Rasul & Vollgraf 2017) read from the IDX files Debian's
``dataset-fashion-mnist`` installs, or from ``data_dir`` / ``$BATCHLAB_FASHION_DIR``."""

from __future__ import annotations

import functools
import gzip
import logging
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batchlab.engine.spec import SpecError
from batchlab.engine.tasks.base import Builder, Data, _as_tensors, _Option
from batchlab.engine.tasks.models import _norm_kwargs, norm_layer

log = logging.getLogger(__name__)


FASHION_DIR_ENV = "BATCHLAB_FASHION_DIR"


DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"


FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


class FashionCNN(nn.Module):
    """Two 3x3 conv + 2x2 max-pool blocks (32 and 64 channels) and a linear classifier, 28x28 input."""

    def __init__(self, norm: str = "none", ghost_batch_size: int = 32):
        super().__init__()
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.norm1 = norm_layer(norm, 32, ghost_batch_size, dims=2)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.norm2 = norm_layer(norm, 64, ghost_batch_size, dims=2)
        self.linear = nn.Linear(64 * 7 * 7, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = F.max_pool2d(self.norm1(self.conv1(x)).relu(), 2)
        h = F.max_pool2d(self.norm2(self.conv2(h)).relu(), 2)
        return self.linear(h.flatten(-3))


def fashion_dir(data_dir: str | None = None) -> Path:
    """Directory of the Fashion-MNIST IDX files: ``data_dir``, else ``$BATCHLAB_FASHION_DIR``, else
    Debian's ``/usr/share/datasets/fashion-mnist``."""
    return Path(data_dir or os.environ.get(FASHION_DIR_ENV) or DEFAULT_FASHION_DIR).expanduser()


def read_idx(path: Path) -> np.ndarray:
    """An unsigned-byte IDX array (the MNIST file format), from ``path`` or ``path.gz``."""
    gz = path.with_name(path.name + ".gz")
    opener = gzip.open if gz.exists() else open
    with opener(gz if gz.exists() else path, "rb") as f:
        raw = f.read()
    ndim = raw[3] if len(raw) >= 4 else 0
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if raw[:3] != b"\x00\x00\x08" or ndim == 0 or len(raw) != 4 + 4 * ndim + math.prod(shape):
        raise SpecError("task_options.data_dir", f"{path} is not an unsigned-byte IDX file")
    return np.frombuffer(bytearray(raw), dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


@functools.lru_cache(maxsize=2)
def _fashion_data(directory: Path) -> Data:
    """Full Fashion-MNIST as (N, 1, 28, 28) float32 standardized with the training-set mean/std."""
    missing = [
        name
        for name in FASHION_FILES
        if not (directory / name).exists() and not (directory / f"{name}.gz").exists()
    ]
    if missing:
        raise SpecError(
            "task_options.data_dir",
            f"Fashion-MNIST IDX files not found in {directory} (missing {', '.join(missing)}[.gz]); "
            "install them with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or "
            f"pass the directory holding them as task option data_dir or in ${FASHION_DIR_ENV}",
        )
    log.info("reading Fashion-MNIST from %s", directory)
    x_train, y_train, x_val, y_val = (read_idx(directory / name) for name in FASHION_FILES)
    x_train_t, y_train_t, x_val_t, y_val_t = _as_tensors(x_train, y_train, x_val, y_val)
    mean, std = x_train_t.mean(), x_train_t.std()
    return (
        ((x_train_t - mean) / std).unsqueeze(1),
        y_train_t,
        ((x_val_t - mean) / std).unsqueeze(1),
        y_val_t,
    )


@functools.lru_cache(maxsize=4)
def _fashion_subset(directory: Path, n_train: int, seed: int) -> Data:
    """The first ``n_train`` examples of a seeded permutation of the training set (all when full)."""
    x_train, y_train, x_val, y_val = _fashion_data(directory)
    if n_train >= x_train.shape[0]:
        return x_train, y_train, x_val, y_val
    generator = torch.Generator().manual_seed(seed)
    keep = torch.randperm(x_train.shape[0], generator=generator)[:n_train].sort().values
    return x_train[keep], y_train[keep], x_val, y_val


def _fashion(model: Callable[..., nn.Module], flat: bool) -> Builder:
    def build(o: dict[str, Any]) -> tuple[Callable[[], nn.Module], Data]:
        directory = fashion_dir(o["data_dir"]).resolve()
        o["data_dir"] = str(directory)
        x_train, y_train, x_val, y_val = _fashion_subset(directory, o["n_train"], o["data_seed"])
        if flat:
            x_train, x_val = x_train.flatten(1), x_val.flatten(1)
        return functools.partial(model, **_norm_kwargs(o)), (x_train, y_train, x_val, y_val)

    return build


_FASHION_OPTIONS = {
    "data_dir": _Option(
        None, f"IDX directory (default ${FASHION_DIR_ENV} or {DEFAULT_FASHION_DIR})", str
    ),
    "n_train": _Option(
        60000, "training examples used: a seeded subset of the 60,000", low=1, high=60000
    ),
    "data_seed": _Option(0, "seed of the training subset"),
}
