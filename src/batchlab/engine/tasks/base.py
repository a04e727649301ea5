"""The ``Task`` record, its loss and metric, seeded models, and the machinery of the built-in
tasks: typed options with defaults and ``_Builtin`` (options + ``build``) that makes a ``Task``."""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from batchlab.engine.spec import SpecError


@dataclass(eq=False)
class Task:
    """What a run trains: ``make_model(seed)`` plus data, ``loss_fn`` (mean over the batch) and
    ``metric`` (mean over the batch, higher is better, e.g. accuracy).

    ``tokens_per_example`` is the sequence length of a language-model task (1 otherwise): batch
    sizes and noise scales count examples (sequences), times it they are tokens. ``train_solo``
    says why runs of the task never train as a ``vmap`` ensemble (None: they may).
    """

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
    tokens_per_example: int = 1
    train_solo: str | None = None

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


Data = tuple[Tensor, Tensor, Tensor, Tensor]


def _as_tensors(x_train: Any, y_train: Any, x_val: Any, y_val: Any) -> Data:
    return (
        torch.as_tensor(np.asarray(x_train), dtype=torch.float32),
        torch.as_tensor(np.asarray(y_train), dtype=torch.int64),
        torch.as_tensor(np.asarray(x_val), dtype=torch.float32),
        torch.as_tensor(np.asarray(y_val), dtype=torch.int64),
    )


Builder = Callable[[dict[str, Any]], tuple[Callable[[], nn.Module], Data]]


@dataclass(frozen=True)
class _Builtin:
    """A built-in task: description, options with defaults, and ``build(options) -> (model, data)``.

    ``build`` receives the checked options with defaults filled in and may record resolved values
    in them (e.g. the data directory actually read); they become ``Task.options``. Classifiers
    keep the default loss and metric; ``tokens_option`` names the option that gives
    ``Task.tokens_per_example`` (a sequence task's length); ``train_solo`` is ``Task.train_solo``.
    """

    description: str
    options: dict[str, _Option]
    build: Builder
    loss_fn: Callable[[Tensor, Tensor], Tensor] = cross_entropy
    metric: Callable[[Tensor, Tensor], Tensor] = accuracy
    metric_name: str = "accuracy"
    tokens_option: str | None = None
    train_solo: str | None = None

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
            loss_fn=self.loss_fn,
            metric=self.metric,
            metric_name=self.metric_name,
            options=resolved,
            description=self.description,
            tokens_per_example=resolved[self.tokens_option] if self.tokens_option else 1,
            train_solo=self.train_solo,
        )
