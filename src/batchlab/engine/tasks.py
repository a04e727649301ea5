"""Tasks: a seeded model factory, train/validation tensors, a loss and a metric.

Built-in tasks, all offline (``get_task(name, **options)``; ``list_tasks()`` describes them):

- ``mnist1d-mlp``, ``mnist1d-cnn``: MNIST-1D (Greydanus 2020, "Scaling down deep learning"),
  generated with ``mnist1d.data.make_dataset`` (never its download path) and the paper's MLP and CNN.
- ``fashion-mlp``, ``fashion-cnn``: Fashion-MNIST (Xiao, Rasul & Vollgraf 2017), read from the IDX
  files Debian's ``dataset-fashion-mnist`` installs, or from ``data_dir`` / ``$BATCHLAB_FASHION_DIR``.
- ``digits-mlp``: scikit-learn's bundled 8x8 digits, small and fast, for tests.
- ``teacher-mlp``: synthetic teacher-student classification with a label-noise knob, so the
  gradient noise scale can be controlled.
- ``module:function``: a user's callable that takes the task options as keyword arguments and
  returns a ``Task``; the module is imported with the current directory on ``sys.path``.

Data sets are generated or read once per process (``functools.lru_cache`` on the options that
decide them), so a sweep that builds the same task many times pays once; the cached tensors are
shared by every ``Task`` built from them and are never modified in place. Models are built under a
forked torch RNG seeded with the run's seed: ``make_model(s)`` is deterministic and leaves the global
RNG untouched. Models without batch norm are pure functions of their inputs (no in-place ops on
inputs, no data-dependent control flow), so ``torch.func.functional_call`` + ``vmap`` can train an
ensemble of them at once.
"""

from __future__ import annotations

import contextlib
import functools
import gzip
import importlib
import inspect
import itertools
import logging
import math
import os
import random
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batchlab.engine.ghost_bn import GhostBatchNorm
from batchlab.engine.spec import RunSpec, SpecError

NORMS = ("none", "batch", "ghost")
log = logging.getLogger(__name__)

FASHION_DIR_ENV = "BATCHLAB_FASHION_DIR"
DEFAULT_FASHION_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


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

    @property
    def n_val(self) -> int:
        """Number of validation examples."""
        return int(self.x_val.shape[0])

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one input example (without the batch dimension)."""
        return tuple(self.x_train.shape[1:])

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


@dataclass(frozen=True)
class TaskInfo:
    """What ``batchlab tasks`` shows about a task: sizes, parameters, input shape, options used.

    ``options`` are the values used (defaults filled in), ``option_help`` one line per built-in
    option; ``error`` says why a built-in task cannot be built here (e.g. Fashion-MNIST files
    missing), the sizes are then ``None``.
    """

    name: str
    description: str
    n_train: int | None
    n_val: int | None
    n_params: int | None
    input_shape: tuple[int, ...] | None
    options: dict[str, Any]
    option_help: dict[str, str] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``batchlab tasks --json``)."""
        return {
            "name": self.name,
            "description": self.description,
            "n_train": self.n_train,
            "n_val": self.n_val,
            "n_params": self.n_params,
            "input_shape": list(self.input_shape) if self.input_shape is not None else None,
            "options": dict(self.options),
            "option_help": dict(self.option_help),
            "error": self.error,
        }


# --- loss, metric and seeded models (public: user tasks can reuse them) ---------------------------


def cross_entropy(logits: Tensor, y: Tensor) -> Tensor:
    """Mean cross-entropy of class ``logits`` (..., classes) against integer labels ``y``."""
    return F.cross_entropy(logits, y)


def accuracy(logits: Tensor, y: Tensor) -> Tensor:
    """Fraction of examples whose arg-max logit is the label, as a 0-dim tensor."""
    return (logits.argmax(dim=-1) == y).to(logits.dtype).mean()


def _build_seeded(build: Callable[[], nn.Module], seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def seeded_model_factory(build: Callable[[], nn.Module]) -> Callable[[int], nn.Module]:
    """Turn a model constructor into ``make_model(seed)``: deterministic per seed, global RNG untouched.

    Example:
        >>> make_model = seeded_model_factory(lambda: nn.Linear(3, 2))
        >>> bool(torch.equal(make_model(1).weight, make_model(1).weight))
        True
    """
    return functools.partial(_build_seeded, build)


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


# --- options ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Option:
    """One task option: default, type, allowed range or choices, and a line of help."""

    default: Any
    help: str
    kind: type = int
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] = ()

    def parse(self, key: str, value: Any) -> Any:
        """``value`` checked and converted to ``kind`` (numbers may come as strings from a CLI)."""
        where = f"task_options.{key}"
        if value is None and self.default is None:
            return None
        converted = _convert(value, self.kind)
        if converted is None:
            raise SpecError(where, f"must be {self._allowed()}, got {value!r}")
        if self.choices and converted not in self.choices:
            raise SpecError(where, f"must be one of {', '.join(self.choices)}, got {value!r}")
        too_low = self.low is not None and converted < self.low
        too_high = self.high is not None and converted > self.high
        if too_low or too_high:
            raise SpecError(where, f"must be {self._allowed()}, got {value!r}")
        return converted

    def _allowed(self) -> str:
        kind = {int: "an integer", float: "a number", str: "a string"}[self.kind]
        if self.low is not None and self.high is not None:
            return f"{kind} in [{self.low:g}, {self.high:g}]"
        if self.low is not None:
            return f"{kind} >= {self.low:g}"
        return kind


def _convert(value: Any, kind: type) -> Any:
    """``value`` as ``kind``, or None when it is not one (bools are not numbers here)."""
    if isinstance(value, bool):
        return None
    if kind is str:
        return str(value) if isinstance(value, str | os.PathLike) else None
    if isinstance(value, str):
        try:
            value = float(value) if kind is float else int(value)
        except ValueError:
            return None
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is int:
        return value if isinstance(value, int) else None
    return float(value) if isinstance(value, int | float) and math.isfinite(value) else None


_NORM_OPTIONS = {
    "norm": _Option(
        "none", "normalization after hidden layers: none, batch, ghost", str, choices=NORMS
    ),
    "ghost_batch_size": _Option(32, "examples per ghost batch when norm = ghost", low=1),
}
COMMON_OPTIONS = tuple(_NORM_OPTIONS)  # options every built-in task takes


def _split_options(n_samples: int, train_split: float, seed: int) -> dict[str, _Option]:
    return {
        "n_samples": _Option(n_samples, "examples generated in all (train + validation)", low=20),
        "train_split": _Option(
            train_split, "fraction of n_samples used for training", float, 0.01, 0.99
        ),
        "data_seed": _Option(seed, "seed of the generated data"),
    }


def _check_split(options: dict[str, Any]) -> tuple[int, int]:
    """Train and validation sizes of ``n_samples`` and ``train_split``; both must be >= 1."""
    n_train = int(options["n_samples"] * options["train_split"])
    if not 1 <= n_train < options["n_samples"]:
        raise SpecError("task_options.train_split", "leaves an empty training or validation set")
    return n_train, options["n_samples"] - n_train


# --- data ------------------------------------------------------------------------------------------

Data = tuple[Tensor, Tensor, Tensor, Tensor]


@contextlib.contextmanager
def _global_rngs_preserved() -> Iterator[None]:
    """Restore Python's and numpy's global RNG states (``mnist1d`` reseeds both)."""
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        yield
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)


def _as_tensors(x_train: Any, y_train: Any, x_val: Any, y_val: Any) -> Data:
    return (
        torch.as_tensor(np.asarray(x_train), dtype=torch.float32),
        torch.as_tensor(np.asarray(y_train), dtype=torch.int64),
        torch.as_tensor(np.asarray(x_val), dtype=torch.float32),
        torch.as_tensor(np.asarray(y_val), dtype=torch.int64),
    )


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


@functools.lru_cache(maxsize=4)
def _digits_data(train_split: float, seed: int) -> Data:
    """scikit-learn's 1,797 8x8 digits scaled to [0, 1], split by a seeded permutation."""
    from sklearn.datasets import load_digits

    x, y = load_digits(return_X_y=True)
    order = np.random.default_rng(seed).permutation(len(y))
    train, val = np.split(order, [int(len(y) * train_split)])
    return _as_tensors(x[train] / 16.0, y[train], x[val] / 16.0, y[val])


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


# --- built-in registry -----------------------------------------------------------------------------

Builder = Callable[[dict[str, Any]], tuple[Callable[[], nn.Module], Data]]


@dataclass(frozen=True)
class _Builtin:
    """A built-in task: description, options with defaults, and ``build(options) -> (model, data)``.

    ``build`` receives the checked options with defaults filled in and may record resolved values
    in them (e.g. the data directory actually read); they become ``Task.options``.
    """

    description: str
    options: dict[str, _Option]
    build: Builder

    def make(self, name: str, given: dict[str, Any]) -> Task:
        unknown = sorted(set(given) - set(self.options))
        if unknown:
            raise SpecError(
                f"task_options.{unknown[0]}",
                f"unknown option of task {name!r}; allowed: {', '.join(self.options)}",
            )
        resolved = {
            key: opt.parse(key, given.get(key, opt.default)) for key, opt in self.options.items()
        }
        build_model, (x_train, y_train, x_val, y_val) = self.build(resolved)
        return Task(
            name=name,
            make_model=seeded_model_factory(build_model),
            x_train=x_train,
            y_train=y_train,
            x_val=x_val,
            y_val=y_val,
            loss_fn=cross_entropy,
            metric=accuracy,
            options=resolved,
            description=self.description,
        )


def _norm_kwargs(o: dict[str, Any]) -> dict[str, Any]:
    return {"norm": o["norm"], "ghost_batch_size": o["ghost_batch_size"]}


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


def _fashion(model: Callable[..., nn.Module], flat: bool) -> Builder:
    def build(o: dict[str, Any]) -> tuple[Callable[[], nn.Module], Data]:
        directory = fashion_dir(o["data_dir"]).resolve()
        o["data_dir"] = str(directory)
        x_train, y_train, x_val, y_val = _fashion_subset(directory, o["n_train"], o["data_seed"])
        if flat:
            x_train, x_val = x_train.flatten(1), x_val.flatten(1)
        return functools.partial(model, **_norm_kwargs(o)), (x_train, y_train, x_val, y_val)

    return build


def _build_digits(o: dict[str, Any]) -> tuple[Callable[[], nn.Module], Data]:
    data = _digits_data(o["train_split"], o["data_seed"])
    return functools.partial(MLP, (64, o["hidden"], 10), **_norm_kwargs(o)), data


def _build_teacher(o: dict[str, Any]) -> tuple[Callable[[], nn.Module], Data]:
    n_train, n_val = _check_split(o)
    data = _teacher_data(
        n_train, n_val, o["dim"], o["classes"], o["label_noise"], o["teacher_seed"], o["data_seed"]
    )
    sizes = (o["dim"], o["hidden"], o["hidden"], o["classes"])
    return functools.partial(MLP, sizes, **_norm_kwargs(o)), data


_FASHION_OPTIONS = {
    "data_dir": _Option(
        None, f"IDX directory (default ${FASHION_DIR_ENV} or {DEFAULT_FASHION_DIR})", str
    ),
    "n_train": _Option(
        60000, "training examples used: a seeded subset of the 60,000", low=1, high=60000
    ),
    "data_seed": _Option(0, "seed of the training subset"),
}

_BUILTINS: dict[str, _Builtin] = {
    "mnist1d-mlp": _Builtin(
        "MNIST-1D, paper's MLP",
        {**_split_options(5000, 0.8, 42), **_NORM_OPTIONS},
        _mnist1d(Mnist1dMLP),
    ),
    "mnist1d-cnn": _Builtin(
        "MNIST-1D, paper's CNN",
        {**_split_options(5000, 0.8, 42), **_NORM_OPTIONS},
        _mnist1d(Mnist1dCNN),
    ),
    "fashion-mlp": _Builtin(
        "Fashion-MNIST, MLP",
        {**_FASHION_OPTIONS, **_NORM_OPTIONS},
        _fashion(functools.partial(MLP, (784, 256, 256, 10)), flat=True),
    ),
    "fashion-cnn": _Builtin(
        "Fashion-MNIST, CNN",
        {**_FASHION_OPTIONS, **_NORM_OPTIONS},
        _fashion(FashionCNN, flat=False),
    ),
    "digits-mlp": _Builtin(
        "sklearn digits, MLP",
        {
            "hidden": _Option(64, "hidden units", low=1),
            "train_split": _Option(
                0.8, "fraction of the 1,797 images used for training", float, 0.05, 0.95
            ),
            "data_seed": _Option(0, "seed of the train/validation split"),
            **_NORM_OPTIONS,
        },
        _build_digits,
    ),
    "teacher-mlp": _Builtin(
        "teacher-student, MLP",
        {
            **_split_options(10000, 0.8, 0),
            "dim": _Option(10, "input dimension", low=1),
            "classes": _Option(10, "number of classes", low=2),
            "label_noise": _Option(0.0, "fraction of training labels made random", float, 0.0, 1.0),
            "hidden": _Option(64, "hidden units of each of the student's two layers", low=1),
            "teacher_seed": _Option(0, "seed of the teacher network"),
            **_NORM_OPTIONS,
        },
        _build_teacher,
    ),
}


def builtin_tasks() -> tuple[str, ...]:
    """Names of the built-in tasks."""
    return tuple(_BUILTINS)


# --- user tasks ------------------------------------------------------------------------------------


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """The current directory first on ``sys.path`` while a user's task is imported and built."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _load_user_task(name: str, options: dict[str, Any]) -> Task:
    """Import ``module:function``, call it with ``options`` as keyword arguments, check the Task."""
    module_name, _, attr = name.partition(":")
    if not module_name or not attr:
        raise SpecError("task", f"expected 'module:function', got {name!r}")
    try:
        with _cwd_on_path():
            module = importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name is None or not (module_name + ".").startswith(exc.name + "."):
            raise SpecError(  # the module exists but imports something missing
                "task", f"importing {module_name!r} failed: ModuleNotFoundError: {exc}"
            ) from exc
        raise SpecError(
            "task",
            f"cannot import module {module_name!r} ({exc}); it must be importable from the current "
            f"directory {os.getcwd()} or installed",
        ) from exc
    except Exception as exc:
        raise SpecError(
            "task", f"importing {module_name!r} failed: {type(exc).__name__}: {exc}"
        ) from exc
    fn: Any = module
    for part in attr.split("."):
        if not hasattr(fn, part):
            raise SpecError("task", f"module {module_name!r} has no attribute {attr!r}")
        fn = getattr(fn, part)
    if not callable(fn):
        raise SpecError("task", f"{name} is a {type(fn).__name__}, not a callable returning a Task")
    _check_signature(name, fn, options)
    try:
        with _cwd_on_path():  # the task may import sibling modules lazily
            task = fn(**options)
    except SpecError:
        raise
    except Exception as exc:
        raise SpecError("task", f"{name} raised {type(exc).__name__}: {exc}") from exc
    _check_task(name, task)
    return task


def _check_signature(name: str, fn: Callable[..., Any], options: dict[str, Any]) -> None:
    """Name the option a user's task function does not accept, or the ones it requires."""
    try:
        signature = inspect.signature(fn)
    except (TypeError, ValueError):
        return
    try:
        signature.bind(**options)
    except TypeError as exc:
        params = signature.parameters
        takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
        accepted = [
            p.name for p in params.values() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
        for key in options:
            if key not in accepted and not takes_any:
                raise SpecError(
                    f"task_options.{key}",
                    f"not accepted by {name}; it takes: {', '.join(accepted) or 'no options'}",
                ) from exc
        raise SpecError("task", f"{name} cannot be called with options {options}: {exc}") from exc


def _check_task(name: str, task: Any) -> None:
    """A user's task must be a ``Task`` with tensors of matching lengths and callables."""
    if not isinstance(task, Task):
        raise SpecError(
            "task", f"{name} must return a batchlab.engine.tasks.Task, got {type(task).__name__}"
        )
    for split in ("train", "val"):
        x, y = getattr(task, f"x_{split}"), getattr(task, f"y_{split}")
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise SpecError("task", f"{name}: x_{split} and y_{split} must be torch tensors")
        if x.dim() == 0 or y.dim() == 0 or len(x) != len(y) or len(x) == 0:
            raise SpecError(
                "task",
                f"{name}: x_{split} and y_{split} need the same number (>= 1) of examples, "
                f"got shapes {tuple(x.shape)} and {tuple(y.shape)}",
            )
    for attr in ("make_model", "loss_fn", "metric"):
        if not callable(getattr(task, attr)):
            raise SpecError("task", f"{name}: Task.{attr} must be callable")


# --- public API ------------------------------------------------------------------------------------


def get_task(name: str, **options: Any) -> Task:
    """The task called ``name`` (built-in or ``module:function``) built with ``options``.

    Raises ``SpecError("task", ...)`` for an unknown task or a user task that fails to load, and
    ``SpecError("task_options.<key>", ...)`` for an unknown or bad option.

    Example:
        >>> task = get_task("digits-mlp")
        >>> task.n_train, task.n_val, task.input_shape
        (1437, 360, (64,))
    """
    if not isinstance(name, str) or not name:
        raise SpecError("task", f"must be a task name, got {name!r}")
    builtin = _BUILTINS.get(name)
    if builtin is not None:
        return builtin.make(name, options)
    if ":" in name:
        return _load_user_task(name, options)
    raise SpecError(
        "task",
        f"unknown task {name!r}; built-in: {', '.join(_BUILTINS)}; or your own as 'module:function'",
    )


def stored_task(
    spec: RunSpec, run_id: str, *, named: str | None = None, trust_code: bool = False
) -> Task:
    """The task of a spec read from a store, refusing user code that only the store names.

    A store someone sends is data, never code: a built-in task is built, a ``module:function`` is
    imported only when the user named the same one (``named``, e.g. ``--task``) or opted in to
    stored task code (``trust_code``). Otherwise ``SpecError("task", ...)`` says which module it
    would import and how to allow it, before anything is imported.
    """
    name = spec.task
    if named is not None and named != name:
        raise SpecError("task", f"run {run_id} was trained on task {name!r}, not {named!r}")
    if isinstance(name, str) and ":" in name and not trust_code and named != name:
        raise SpecError(
            "task",
            f"run {run_id} uses user code {name!r} (would import module "
            f"{name.partition(':')[0]!r}); pass --task {name} to run it",
        )
    return get_task(name, **dict(spec.task_options))


def task_info(name: str, **options: Any) -> TaskInfo:
    """Sizes, parameter count, input shape and options of one task (builds it)."""
    task = get_task(name, **options)
    builtin = _BUILTINS.get(name)
    return TaskInfo(
        name=name,
        description=task.description,
        n_train=task.n_train,
        n_val=task.n_val,
        n_params=task.num_parameters(),
        input_shape=task.input_shape,
        options=dict(task.options) or dict(options),
        option_help={k: o.help for k, o in builtin.options.items()} if builtin else {},
    )


def list_tasks() -> list[TaskInfo]:
    """Every built-in task with its default options; one that cannot be built here has ``error``."""
    infos = []
    for name, builtin in _BUILTINS.items():
        try:
            infos.append(task_info(name))
        except SpecError as exc:
            infos.append(
                TaskInfo(
                    name,
                    builtin.description,
                    None,
                    None,
                    None,
                    None,
                    {key: opt.default for key, opt in builtin.options.items()},
                    {key: opt.help for key, opt in builtin.options.items()},
                    error=str(exc),
                )
            )
    return infos
