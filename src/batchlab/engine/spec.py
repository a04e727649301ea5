"""RunSpec and RunResult: the frozen description of one training run and what it produced.

A ``RunSpec`` is hashable and JSON-serializable; the same spec always gets the same ``run_id`` so a
sweep can resume by skipping ids already stored. It lives in the engine (not in ``sweep.spec`` as the
first design sketch said) because ``engine.train(spec)`` needs it and imports only run one way
(core <- engine <- sweep). Every default is declared here, once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from batchlab.core.adaptive import AdaptiveSettings
from batchlab.core.noise import DEFAULT_WINDOW
from batchlab.core.rules import MAX_BATCH_SIZE, OPTIMIZERS, check_number
from batchlab.core.schedules import LR_SCHEDULES, WARMUPS
from batchlab.errors import FieldError

BUDGET_UNITS = ("epochs", "steps", "samples")
NOISE_MODES = ("per_example", "split", "accumulation")
"""Noise-scale modes of one process; ``distributed`` needs one process per rank (torchrun)."""
FLOAT_FIELDS = (
    "lr",
    "momentum",
    "beta1",
    "beta2",
    "eps",
    "weight_decay",
    "warmup_epochs",
    "budget",
    "diverge_factor",
)
"""Fields stored as floats whatever number type was given, so ``lr=1`` and ``lr=1.0`` share an id."""
MAX_LR = 1e10
"""Largest learning rate any command accepts: far past divergence, well inside float32 (a larger
one overflows the parameter update, e.g. an LR ramp to 1e308)."""
FLOAT_RANGES: dict[str, dict[str, Any]] = {
    "lr": {"low": 0.0, "high": MAX_LR},
    "momentum": {"low": 0.0, "high": 1.0, "high_open": True},
    "beta1": {"low": 0.0, "high": 1.0, "high_open": True},
    "beta2": {"low": 0.0, "high": 1.0, "high_open": True},
    "eps": {"low": 0.0, "low_open": True},
    "weight_decay": {"low": 0.0},
    "warmup_epochs": {"low": 0.0},
    "budget": {"low": 0.0, "low_open": True},
    "diverge_factor": {"low": 1.0, "low_open": True},
}
"""The interval of each float field (``core.rules.check_number`` arguments); each must be finite."""
MAX_SEED = 2**32 - 1
"""Seeds are integers in [0, 2**32 - 1] (numpy's range): negative seeds are refused."""


def check_integer(name: str, value: Any, low: int, high: int | None = None) -> None:
    """Raise ``SpecError`` unless ``value`` is an integer in ``[low, high]`` (no ``high``: ``>= low``).

    >>> check_integer("seed", -1, 0, 2**32 - 1)
    Traceback (most recent call last):
    ...
    batchlab.engine.spec.SpecError: seed: must be an integer in [0, 4294967295], got -1
    """
    number = isinstance(value, int) and not isinstance(value, bool)
    if number and low <= value and (high is None or value <= high):
        return
    allowed = f">= {low}" if high is None else f"in [{low}, {high}]"
    raise SpecError(name, f"must be an integer {allowed}, got {value!r}")


class RunStatus(StrEnum):
    """How a run ended; the values are what the store keeps (``status`` column)."""

    OK = "ok"
    DIVERGED = "diverged"
    FAILED = "failed"


class HistoryKey(StrEnum):
    """The keys of a history row (one row per evaluation): the engine writes them, the store keeps
    them, analysis and report read them."""

    STEP = "step"
    SAMPLES = "samples"
    EPOCH = "epoch"
    LR = "lr"
    BATCH_SIZE = "batch_size"
    TRAIN_LOSS = "train_loss"
    VAL_LOSS = "val_loss"
    VAL_METRIC = "val_metric"
    WALL_S = "wall_s"
    NOISE_SCALE = "noise_scale"
    NOISE_SCALE_LOW = "noise_scale_low"
    NOISE_SCALE_HIGH = "noise_scale_high"


HISTORY_COLUMNS: tuple[tuple[HistoryKey, type], ...] = (
    (HistoryKey.STEP, int),
    (HistoryKey.SAMPLES, int),
    (HistoryKey.EPOCH, float),
    (HistoryKey.LR, float),
    (HistoryKey.BATCH_SIZE, int),
    (HistoryKey.TRAIN_LOSS, float),
    (HistoryKey.VAL_LOSS, float),
    (HistoryKey.VAL_METRIC, float),
    (HistoryKey.WALL_S, float),
    (HistoryKey.NOISE_SCALE, float),
)
"""Keys every history row has (``noise_scale`` None when not measured), with their types, in the
store's column order; other keys (the noise-scale interval) are optional."""


class SpecError(FieldError):
    """A bad field in a spec (or in an engine call): ``field`` names it, ``message`` what is allowed."""


def _freeze(value: Any) -> Any:
    """Turn dicts and lists into sorted tuples so a spec stays hashable."""
    if isinstance(value, dict):
        return tuple(sorted((str(k), _freeze(v)) for k, v in value.items()))
    if isinstance(value, list | tuple):
        return tuple(_freeze(v) for v in value)
    return value


def _thaw(value: Any) -> Any:
    """JSON-friendly form of a frozen value (tuples of pairs stay lists of pairs)."""
    if isinstance(value, tuple):
        return [_thaw(v) for v in value]
    return value


@dataclass(frozen=True)
class RunSpec:
    """Everything that decides the numbers of one run (device excluded: it is not part of the id).

    Schedules: ``schedule`` is evaluated on the optimizer step counted at the *first* batch size
    (``samples_seen / batch_size``), so an LR decay at a fraction of the budget happens at the same
    epoch whether or not ``batch_schedule`` grows the batch (Smith et al. 2018). ``schedule_options``
    holds the schedule's parameters, e.g. ``{"milestones": (0.5, 0.75), "gamma": 0.1}`` with
    milestones as fractions of the budget. ``batch_schedule`` is ``((epoch, batch_size), ...)``: from
    that epoch on, the batch size is the given one.

    Noise scale: with ``noise_scale`` the run measures it in ``noise_mode`` (default: ``accumulation``
    with a ``micro_batch_size``, else ``per_example``, which falls back to ``split`` for layers it
    cannot handle); ``noise_splits`` is the number of slices per batch of ``split``.

    Adaptive batch: with ``adaptive_batch`` the run starts at ``batch_size`` and grows it as the
    measured noise scale grows (``batchlab.core.adaptive``; it needs ``noise_scale``), with
    ``adaptive_options`` holding the controller's settings (``rule``, ``factor``, ``patience``,
    ``max_doublings``, ``max_batch``, ``shrink``, ``min_batch``, ``use_low``) and ``every`` (steps between readings).
    Both fields are left out of ``to_dict`` at their defaults, so runs stored before they existed
    keep their ids.
    """

    task: str
    batch_size: int
    lr: float
    task_options: tuple[tuple[str, Any], ...] = ()
    optimizer: str = "sgd"
    momentum: float = 0.0
    nesterov: bool = False
    beta1: float = 0.9
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    schedule: str = "constant"
    schedule_options: tuple[tuple[str, Any], ...] = ()
    warmup_epochs: float = 0.0
    warmup: str = "linear"
    batch_schedule: tuple[tuple[float, int], ...] = ()
    budget_unit: str = "epochs"
    budget: float = 1.0
    eval_every: int = 0
    seed: int = 0
    micro_batch_size: int | None = None
    diverge_factor: float = 10.0
    noise_scale: bool = False
    noise_mode: str | None = None
    noise_splits: int = 4
    adaptive_batch: bool = False
    adaptive_options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "task_options", _freeze(dict(self.task_options)))
        object.__setattr__(self, "adaptive_options", _freeze(dict(self.adaptive_options)))
        object.__setattr__(self, "schedule_options", _freeze(dict(self.schedule_options)))
        object.__setattr__(
            self, "batch_schedule", tuple((float(e), int(b)) for e, b in self.batch_schedule)
        )
        for name in FLOAT_FIELDS:
            value = getattr(self, name)
            if isinstance(value, int) and not isinstance(value, bool):
                object.__setattr__(self, name, float(value))
        self.validate()

    def validate(self) -> None:
        """Raise ``SpecError`` naming the first bad field; checks that need no data set."""
        check_integer("batch_size", self.batch_size, 1, MAX_BATCH_SIZE)
        check_integer("seed", self.seed, 0, MAX_SEED)
        for name, interval in FLOAT_RANGES.items():
            check_number(name, getattr(self, name), error=SpecError, **interval)
        if self.optimizer not in OPTIMIZERS:
            raise SpecError(
                "optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.nesterov and (self.optimizer != "sgd" or self.momentum == 0):
            raise SpecError("nesterov", "needs the sgd optimizer with momentum > 0")
        if self.schedule not in LR_SCHEDULES:
            raise SpecError(
                "schedule", f"must be one of {', '.join(LR_SCHEDULES)}, got {self.schedule!r}"
            )
        if self.warmup not in WARMUPS:
            raise SpecError("warmup", f"must be one of {', '.join(WARMUPS)}, got {self.warmup!r}")
        if self.budget_unit not in BUDGET_UNITS:
            raise SpecError(
                "budget", f"unit must be one of {', '.join(BUDGET_UNITS)}, got {self.budget_unit!r}"
            )
        if self.budget_unit == "steps" and self.budget != int(self.budget):
            raise SpecError("budget", f"a steps budget must be a whole number, got {self.budget}")
        if self.eval_every < 0:
            raise SpecError("eval_every", f"must be >= 0 (0 = automatic), got {self.eval_every!r}")
        if self.micro_batch_size is not None and (
            self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size
        ):
            raise SpecError(
                "micro_batch_size",
                f"must divide batch_size {self.batch_size}, got {self.micro_batch_size!r}",
            )
        self._validate_noise()
        self._validate_adaptive()
        for epoch, size in self.batch_schedule:
            if epoch < 0 or size < 1:
                raise SpecError(
                    "batch_schedule",
                    f"entries are (epoch >= 0, batch_size >= 1), got {(epoch, size)}",
                )

    @property
    def resolved_noise_mode(self) -> str:
        """The noise-scale mode in force (``noise_mode``, or the default for this spec)."""
        if self.noise_mode is not None:
            return self.noise_mode
        return "accumulation" if self.micro_batch_size is not None else "per_example"

    def _validate_noise(self) -> None:
        if self.noise_mode is not None and self.noise_mode not in NOISE_MODES:
            raise SpecError(
                "noise_mode",
                f"must be one of {', '.join(NOISE_MODES)} (distributed runs one process per rank: "
                f"use GradientNoiseScale under torchrun), got {self.noise_mode!r}",
            )
        if not self.noise_scale:
            return
        if self.batch_size < 2:
            raise SpecError(
                "batch_size", f"must be >= 2 to measure the noise scale, got {self.batch_size}"
            )
        mode, micro = self.resolved_noise_mode, self.micro_batch_size
        if mode == "accumulation" and (micro is None or micro >= self.batch_size):
            raise SpecError(
                "micro_batch_size",
                f"noise mode accumulation needs micro-batches smaller than the batch, got {micro}",
            )
        if mode != "accumulation" and micro is not None:
            raise SpecError("micro_batch_size", f"applies to noise mode accumulation, not {mode}")
        if not 2 <= self.noise_splits <= self.batch_size:
            raise SpecError(
                "noise_splits",
                f"must be in [2, batch size {self.batch_size}], got {self.noise_splits}",
            )

    def _validate_adaptive(self) -> None:
        if not self.adaptive_batch:
            if self.adaptive_options:
                raise SpecError("adaptive_options", "apply with adaptive_batch only")
            return
        if not self.noise_scale:
            raise SpecError("adaptive_batch", "needs noise_scale: the controller reads it")
        if self.batch_schedule:
            raise SpecError("batch_schedule", "cannot be combined with adaptive_batch")
        settings, _ = self.adaptive_settings(n_train=None)
        micro = self.micro_batch_size
        if settings.shrink and micro is not None and settings.floor <= micro:
            raise SpecError(
                "adaptive_options.min_batch",
                f"must be above micro_batch_size {micro} (accumulation needs 2 micro-batches), "
                f"got {settings.floor}",
            )

    def adaptive_settings(self, n_train: int | None) -> tuple[AdaptiveSettings, int]:
        """The controller's settings for this spec (bounded by ``n_train`` examples) and the
        steps between readings; a bad option is a ``SpecError`` naming it."""
        options = dict(self.adaptive_options)
        every = options.pop("every", DEFAULT_WINDOW)
        if not isinstance(every, int) or isinstance(every, bool) or every < 1:
            raise SpecError("adaptive_options.every", f"must be an integer >= 1, got {every!r}")
        allowed = (
            "rule",
            "factor",
            "patience",
            "max_doublings",
            "max_batch",
            "shrink",
            "min_batch",
            "use_low",
        )
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise SpecError(
                f"adaptive_options.{unknown[0]}",
                f"unknown option; allowed: every, {', '.join(allowed)}",
            )
        try:
            settings = AdaptiveSettings(
                base_batch=self.batch_size,
                base_lr=self.lr,
                optimizer=self.optimizer,
                n_train=n_train,
                **options,
            )
        except FieldError as exc:
            raise SpecError(f"adaptive_options.{exc.field}", exc.message) from None
        return settings, every

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (the resolved config saved with each run); the adaptive
        fields only when the run adapts its batch."""
        out = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if f.name in ("adaptive_batch", "adaptive_options") and not self.adaptive_batch:
                continue
            if f.name in ("task_options", "schedule_options", "adaptive_options"):
                value = {k: _thaw(v) for k, v in value}
            else:
                value = _thaw(value)
            out[f.name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunSpec:
        """Inverse of ``to_dict``; unknown keys are an error naming the key."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise SpecError(unknown[0], f"unknown field; allowed: {', '.join(sorted(names))}")
        return cls(**data)

    @property
    def run_id(self) -> str:
        """Stable id: the same spec gives the same id on any machine and Python version."""
        blob = json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    def replace(self, **changes: Any) -> RunSpec:
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def option(self, name: str, default: Any = None) -> Any:
        """Value of one ``schedule_options`` entry."""
        return dict(self.schedule_options).get(name, default)


@dataclass
class RunResult:
    """What one run produced: status, history rows, final full-set metrics, wall time.

    ``history`` rows are dicts with keys step, samples, epoch, lr, batch_size, train_loss, val_loss,
    val_metric, wall_s and noise_scale (None when not measured). ``final`` holds train_loss,
    train_metric, val_loss and val_metric on the full sets (NaN when the run diverged). ``weights``
    holds the final state dict when the engine was asked to keep it (never serialized by ``to_dict``).
    """

    spec: RunSpec
    status: RunStatus
    steps: int
    samples: int
    wall_s: float
    history: list[dict[str, Any]] = field(default_factory=list)
    final: dict[str, float] = field(default_factory=dict)
    diverged_at: int | None = None
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    weights: dict[str, Any] | None = field(default=None, repr=False)

    @property
    def run_id(self) -> str:
        """The id of the spec that produced this result."""
        return self.spec.run_id

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary used by ``batchlab train --json`` and by the store."""
        n_train = self.extra.get("n_train")
        return {
            "id": self.run_id,
            "status": self.status,
            "steps": self.steps,
            "samples": self.samples,
            "epochs": self.samples / n_train if n_train else 0.0,
            "wall_s": self.wall_s,
            "diverged_at": self.diverged_at,
            "error": self.error,
            "final": self.final,
            "spec": self.spec.to_dict(),
            "extra": self.extra,
        }
