"""Sweep files: a batch-size x learning-rate grid as a frozen ``SweepSpec``, validated, and its runs.

A sweep trains every (batch size, learning rate, seed) point of a study with the other
hyper-parameters fixed (the scientific / nuisance / fixed split of Google's tuning playbook). The LR
grid is a list, or a geometric grid centred on a scaling rule's prediction at each batch size
(``batchlab.core.rules``), so the grid follows the optimum as the batch grows. The budget is counted
in ``epochs``, ``steps`` or ``samples``: the three give different verdicts about large batches
(Shallue et al. 2019, "Measuring the Effects of Data Parallelism on Neural Network Training"). A
``[per_batch.B]`` table gives batch size B its own budget and evaluation spacing, and
``budget.min_evals`` spaces evaluations so every run has at least that many, so one file covers a
B = 16 ... 4096 fit whose runs differ 256x in steps.

A bad key is one ``SpecError`` naming it as the file spells it (``optimizer.momentum``, ``lr.span``),
raised before any training. Every default is ``RunSpec``'s, declared there once.
"""

from __future__ import annotations

import dataclasses
import math
import tomllib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from batchlab.core.rules import apply_rule
from batchlab.core.schedules import resolve_schedule_options
from batchlab.engine.spec import BUDGET_UNITS, RunSpec, SpecError
from batchlab.engine.tasks import Task, get_task
from batchlab.engine.train import plan as plan_run
from batchlab.errors import FieldError

T = TypeVar("T")

RUN_DEFAULTS: dict[str, Any] = {f.name: f.default for f in dataclasses.fields(RunSpec)}
"""``RunSpec``'s defaults: where every default of a sweep comes from."""

TARGET_METRICS = {"val_metric": True, "val_loss": False, "train_loss": False}
"""History columns a target can name, and whether higher is better."""

LR_DIGITS = 6
"""Significant digits kept of each grid learning rate: clean values and ids stable across platforms."""

TOP_KEYS = (
    "study",
    "task",
    "batch_sizes",
    "lr",
    "seeds",
    "optimizer",
    "schedule",
    "budget",
    "target",
    "eval_every",
    "noise_scale",
    "adaptive_batch",
    "per_batch",
)
OPTIMIZER_KEYS = ("name", "momentum", "nesterov", "beta1", "beta2", "eps", "weight_decay")
SCHEDULE_KEYS = ("name", "warmup_epochs", "warmup")  # plus the schedule's own options
LR_GRID_KEYS = ("rule", "base_batch", "base_lr", "span", "points", "noise_scale", "options")
TASK_KEYS = ("name", "options")
TARGET_KEYS = ("metric", "value")
PER_BATCH_KEYS = ("budget", "eval_every")
MIN_EVALS = "min_evals"  # the spacing rule, a key of a budget table beside its unit
SWEEP_FIELDS = ("task", "batch_size", "lr", "seed")  # RunSpec fields the sweep itself sets

# Where a RunSpec (or core) error field lives in a sweep file.
_FILE_KEY = {
    "batch_size": "batch_sizes",
    "seed": "seeds",
    "optimizer": "optimizer.name",
    **{k: f"optimizer.{k}" for k in OPTIMIZER_KEYS[1:]},
    "schedule": "schedule.name",
    "schedule_options": "schedule",
    "warmup_epochs": "schedule.warmup_epochs",
    "warmup": "schedule.warmup",
    "task_options": "task.options",
    "budget_unit": "budget",
    "adaptive_options": "adaptive_batch",
}
_KINDS = {"float": "a number", "int": "an integer", "bool": "true or false", "str": "a string"}
_FIELD_KINDS = {f.name: str(f.type) for f in dataclasses.fields(RunSpec)}


def file_key(field_name: str) -> str:
    """The sweep-file key of a RunSpec or core error field.

    >>> file_key("momentum"), file_key("task_options.n_train"), file_key("schedule_options.gamma")
    ('optimizer.momentum', 'task.options.n_train', 'schedule.gamma')
    """
    head, dot, rest = field_name.partition(".")
    return _FILE_KEY.get(head, head) + dot + rest


def _renamed(call: Callable[[], T], prefix: str = "") -> T:
    """``call()``, with a ``SpecError`` or core ``ValueError("field: ...")`` renamed to the file's key."""
    try:
        return call()
    except FieldError as exc:  # a SpecError or a core error: both name their field
        raise SpecError(prefix + file_key(exc.field), exc.message) from exc
    except ValueError as exc:  # names no field: blame the table being read
        raise SpecError(prefix.rstrip(".") or "sweep", str(exc)) from exc


def round_lr(lr: float) -> float:
    """``lr`` to ``LR_DIGITS`` significant digits.

    >>> round_lr(0.05 * 0.125 * 2.0000000000000004)
    0.0125
    """
    return float(f"{lr:.{LR_DIGITS}g}")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _coerce(key: str, value: Any, kind: str) -> Any:
    """``value`` as type ``kind`` (an int becomes a float: ``lr = 1`` and ``1.0`` are one run)."""
    if kind == "float" and _is_number(value):
        return float(value)
    if type(value).__name__ == kind:  # exact: True is not an int here
        return value
    raise SpecError(key, f"must be {_KINDS[kind]}, got {value!r}")


def _grid(key: str, values: Any, kind: str, low: float) -> tuple[Any, ...]:
    """A non-empty list of distinct finite numbers >= ``low``."""
    if not isinstance(values, list | tuple) or not values:
        raise SpecError(key, f"must be a non-empty list, got {values!r}")
    out = tuple(_coerce(key, v, kind) for v in values)
    for i, v in enumerate(out):
        if not (math.isfinite(v) and v >= low):
            raise SpecError(key, f"every value must be a finite number >= {low:g}, got {v!r}")
        if v in out[:i]:
            raise SpecError(key, f"lists {v!r} twice; each grid point runs once")
    return out


def _check_keys(where: str, table: dict[str, Any], allowed: tuple[str, ...]) -> None:
    unknown = sorted(set(table) - set(allowed))
    if unknown:
        key = f"{where}.{unknown[0]}" if where else unknown[0]
        raise SpecError(key, f"unknown key; allowed: {', '.join(allowed)}")


def _amount(key: str, unit: str, amount: Any) -> float:
    """A budget of ``amount`` ``unit``: finite, > 0, and whole for steps and samples."""
    if unit not in BUDGET_UNITS:
        raise SpecError(key, f"unit must be one of {', '.join(BUDGET_UNITS)}, got {unit!r}")
    value = _coerce(f"{key}.{unit}", amount, "float")
    if not (math.isfinite(value) and value > 0):
        raise SpecError(f"{key}.{unit}", f"must be a finite number > 0, got {amount!r}")
    if unit != "epochs" and not value.is_integer():
        raise SpecError(f"{key}.{unit}", f"must be a whole number, got {amount!r}")
    return value


def _spacing(where: str, eval_every: Any, min_evals: Any) -> tuple[int | None, int | None]:
    """A table's evaluation spacing: ``eval_every`` steps (>= 0) or ``budget.min_evals`` (>= 1)."""
    if eval_every is not None:
        eval_every = _coerce(f"{where}eval_every", eval_every, "int")
        if eval_every < 0:
            raise SpecError(f"{where}eval_every", f"must be >= 0 (0 = automatic), got {eval_every}")
    if min_evals is not None:
        key = f"{where}budget.{MIN_EVALS}"
        min_evals = _coerce(key, min_evals, "int")
        if min_evals < 1:
            raise SpecError(key, f"must be an integer >= 1, got {min_evals}")
        if eval_every is not None:
            raise SpecError(key, f"give eval_every or budget.{MIN_EVALS}, not both")
    return eval_every, min_evals


def eval_spacing(unit: str, budget: float, batch_size: int, min_evals: int) -> int:
    """Evaluate every this many steps so a ``budget`` of ``unit`` at ``batch_size`` has at least
    ``min_evals`` evaluations (every step when it has fewer steps than that).

    >>> eval_spacing("samples", 64_000, 64, 20), eval_spacing("samples", 64_000, 4096, 20)
    (50, 1)
    """
    if unit == "epochs":
        raise ValueError("an epochs budget has no step count before the task is known")
    steps = int(budget) if unit == "steps" else math.ceil(budget / batch_size)
    return max(1, steps // min_evals)


@dataclass(frozen=True)
class BatchBudget:
    """One batch size's own budget and evaluation spacing (``[per_batch.B]``), overriding the sweep's.

    ``budget_unit`` and ``budget`` come together; ``eval_every`` (steps) or ``min_evals`` (at least
    that many evaluations, from the budget's steps) sets the spacing. Fields left None fall back to
    the sweep's.
    """

    batch_size: int
    budget_unit: str | None = None
    budget: float | None = None
    eval_every: int | None = None
    min_evals: int | None = None

    def __post_init__(self) -> None:
        if not (isinstance(self.batch_size, int) and not isinstance(self.batch_size, bool)):
            raise SpecError("per_batch", f"keys must be batch sizes, got {self.batch_size!r}")
        where = f"per_batch.{self.batch_size}."
        if (self.budget_unit is None) != (self.budget is None):
            raise SpecError(f"{where}budget", "needs a unit and an amount, e.g. {steps = 200}")
        if self.budget_unit is not None:
            amount = _amount(f"{where}budget", self.budget_unit, self.budget)
            object.__setattr__(self, "budget", amount)
        every, min_evals = _spacing(where, self.eval_every, self.min_evals)
        object.__setattr__(self, "eval_every", every)
        object.__setattr__(self, "min_evals", min_evals)

    def to_dict(self) -> dict[str, Any]:
        """The ``[per_batch.B]`` table as a sweep file writes it."""
        out: dict[str, Any] = {}
        if self.budget_unit is not None:
            out["budget"] = _budget_table(self.budget_unit, self.budget, self.min_evals)
        elif self.min_evals is not None:
            out["budget"] = {MIN_EVALS: self.min_evals}
        if self.eval_every is not None:
            out["eval_every"] = self.eval_every
        return out


@dataclass(frozen=True)
class LRGrid:
    """``points`` learning rates spaced geometrically over ``span`` x a rule's prediction.

    At batch size B the centre is ``apply_rule(rule, base_batch=..., base_lr=..., batch_size=B).lr``
    (only the rule's learning rate is used, not its warmup or beta suggestions); ``span = (0.125, 8)``
    with 7 points tries the prediction / 8, / 4, ... x 8.
    """

    rule: str
    base_batch: int
    base_lr: float
    span: tuple[float, float] = (0.125, 8.0)
    points: int = 7
    noise_scale: float | None = None
    options: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "rule", _coerce("lr.rule", self.rule, "str"))
        object.__setattr__(self, "base_batch", _coerce("lr.base_batch", self.base_batch, "int"))
        object.__setattr__(self, "base_lr", _coerce("lr.base_lr", self.base_lr, "float"))
        object.__setattr__(self, "points", _coerce("lr.points", self.points, "int"))
        object.__setattr__(self, "options", tuple(sorted(dict(self.options).items())))
        span = self.span
        if not (isinstance(span, list | tuple) and len(span) == 2 and all(map(_is_number, span))):
            raise SpecError("lr.span", f"must be [low, high], got {span!r}")
        lo, hi = float(span[0]), float(span[1])
        if not (0 < lo <= hi < math.inf):
            raise SpecError(
                "lr.span", f"must be [low, high] with 0 < low <= high, got {list(span)}"
            )
        object.__setattr__(self, "span", (lo, hi))
        if self.points < 2:
            raise SpecError("lr.points", f"must be >= 2 (a list gives one lr), got {self.points}")
        if self.noise_scale is not None:
            object.__setattr__(
                self, "noise_scale", _coerce("lr.noise_scale", self.noise_scale, "float")
            )
        self.values(self.base_batch, RUN_DEFAULTS["optimizer"])  # rule and options are valid

    def values(self, batch_size: int, optimizer: str) -> tuple[float, ...]:
        """The grid at ``batch_size`` for ``optimizer``, smallest first, rounded by ``round_lr``."""
        result = _renamed(
            lambda: apply_rule(
                self.rule,
                base_batch=self.base_batch,
                base_lr=self.base_lr,
                batch_size=batch_size,
                optimizer=optimizer,
                noise_scale=self.noise_scale,
                **dict(self.options),
            ),
            prefix="lr.",
        )
        lo, hi = self.span
        steps = self.points - 1
        return tuple(
            round_lr(result.lr * lo * (hi / lo) ** (i / steps)) for i in range(self.points)
        )

    def to_dict(self) -> dict[str, Any]:
        """The table as a sweep file writes it."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["span"], out["options"] = list(self.span), dict(self.options)
        return {k: v for k, v in out.items() if v is not None}


@dataclass(frozen=True)
class Target:
    """Steps-to-target threshold: the first evaluated step at which ``metric`` reaches ``value``."""

    metric: str
    value: float

    def __post_init__(self) -> None:
        if self.metric not in TARGET_METRICS:
            raise SpecError(
                "target.metric", f"must be one of {', '.join(TARGET_METRICS)}, got {self.metric!r}"
            )
        object.__setattr__(self, "value", _coerce("target.value", self.value, "float"))
        if not math.isfinite(self.value):
            raise SpecError("target.value", f"must be finite, got {self.value!r}")

    @property
    def higher_is_better(self) -> bool:
        """True for a metric (accuracy), False for a loss."""
        return TARGET_METRICS[self.metric]


@dataclass(frozen=True)
class SweepSpec:
    """A study: every batch size x learning rate x seed, with the other ``RunSpec`` fields ``fixed``.

    ``fixed`` holds the fields shared by every run (optimizer, schedule, budget, ...); the rest take
    ``RunSpec``'s defaults. ``min_evals`` spaces the evaluations of every run by its budget's steps
    (instead of ``eval_every``); ``per_batch`` overrides budget and spacing at some batch sizes.
    Construction validates everything that needs no data; ``check`` adds what needs the task (batch
    sizes against the training set).
    """

    study: str
    task: str
    batch_sizes: tuple[int, ...]
    lr: tuple[float, ...] | LRGrid
    seeds: tuple[int, ...] = (RUN_DEFAULTS["seed"],)
    fixed: tuple[tuple[str, Any], ...] = ()
    target: Target | None = None
    min_evals: int | None = None
    per_batch: tuple[BatchBudget, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.study, str) or not self.study.strip():
            raise SpecError("study", f"must be a non-empty name, got {self.study!r}")
        if not isinstance(self.task, str) or not self.task:
            raise SpecError("task", f"must be a task name, got {self.task!r}")
        object.__setattr__(self, "batch_sizes", _grid("batch_sizes", self.batch_sizes, "int", 1))
        if not isinstance(self.lr, LRGrid):
            object.__setattr__(self, "lr", _grid("lr", self.lr, "float", 0.0))
        object.__setattr__(self, "seeds", _grid("seeds", self.seeds, "int", 0))
        fixed = {}
        for name, value in dict(self.fixed).items():
            if name in SWEEP_FIELDS or name not in RUN_DEFAULTS:
                raise SpecError(file_key(name), "is not a field the sweep file can fix")
            kind = _FIELD_KINDS[name]
            fixed[name] = _coerce(file_key(name), value, kind) if kind in _KINDS else value
        object.__setattr__(self, "fixed", tuple(sorted(fixed.items())))
        d = self.run_defaults()
        if d["nesterov"] and not d["momentum"]:
            raise SpecError("optimizer.nesterov", "needs momentum > 0")
        if d["budget_unit"] != "epochs" and not float(d["budget"]).is_integer():
            raise SpecError(
                f"budget.{d['budget_unit']}", f"must be a whole number, got {d['budget']}"
            )
        _spacing("", dict(self.fixed).get("eval_every"), self.min_evals)
        self._check_per_batch()
        _renamed(
            lambda: resolve_schedule_options(
                d["schedule"], dict(d["schedule_options"]), d["warmup"]
            )
        )
        # Each batch size's first run is validated (errors named as in the file); the rest differ
        # only in lr and seed, so a huge grid is refused by its count without building every run.
        first, *_ = [next(_specs(self, b)) for b in self.batch_sizes]
        shared = first.replace(**{k: d[k] for k in ("budget_unit", "budget", "eval_every")})
        frozen = tuple((name, getattr(shared, name)) for name, _ in self.fixed)
        object.__setattr__(self, "fixed", frozen)  # as RunSpec holds them: hashable

    def _check_per_batch(self) -> None:
        seen: set[int] = set()
        for entry in self.per_batch:
            if not isinstance(entry, BatchBudget):
                raise SpecError("per_batch", f"entries must be BatchBudget, got {entry!r}")
            if entry.batch_size not in self.batch_sizes:
                raise SpecError(
                    f"per_batch.{entry.batch_size}",
                    f"is not one of batch_sizes {list(self.batch_sizes)}",
                )
            if entry.batch_size in seen:
                raise SpecError(f"per_batch.{entry.batch_size}", "is given twice")
            seen.add(entry.batch_size)
        object.__setattr__(
            self, "per_batch", tuple(sorted(self.per_batch, key=lambda e: e.batch_size))
        )
        for b in self.batch_sizes:
            self.budget_of(b)  # a spacing rule that cannot apply is an error now

    def budget_of(self, batch_size: int) -> dict[str, Any]:
        """The budget and evaluation spacing of the runs at ``batch_size``.

        Its ``[per_batch]`` entry where it gives them, else the sweep's; a ``min_evals`` rule becomes
        the ``eval_every`` that gives at least that many evaluations over the budget's steps.
        """
        d = self.run_defaults()
        entry = next((e for e in self.per_batch if e.batch_size == batch_size), None)
        out = {
            "budget_unit": d["budget_unit"],
            "budget": d["budget"],
            "eval_every": d["eval_every"],
        }
        min_evals, key = self.min_evals, f"budget.{MIN_EVALS}"
        if entry is not None and entry.budget_unit is not None:
            out.update(budget_unit=entry.budget_unit, budget=entry.budget)
        if entry is not None and (entry.eval_every, entry.min_evals) != (None, None):
            min_evals, key = entry.min_evals, f"per_batch.{batch_size}.budget.{MIN_EVALS}"
            if entry.eval_every is not None:
                out["eval_every"] = entry.eval_every
        if min_evals is not None:
            try:
                out["eval_every"] = eval_spacing(
                    out["budget_unit"], out["budget"], batch_size, min_evals
                )
            except ValueError:
                raise SpecError(
                    key,
                    f"needs a steps or samples budget, got epochs at batch {batch_size} (an "
                    "epoch's steps depend on the training set); give eval_every instead",
                ) from None
        return out

    @property
    def n_runs(self) -> int:
        """How many runs the sweep plans, counted without building them (a huge grid is refused
        by this count before anything else)."""
        return sum(len(self.lrs(b)) for b in self.batch_sizes) * len(self.seeds)

    def run_defaults(self) -> dict[str, Any]:
        """Every ``RunSpec`` field but batch size, lr and seed: shared by all runs of the sweep."""
        return {**RUN_DEFAULTS, **dict(self.fixed), "task": self.task}

    def lrs(self, batch_size: int) -> tuple[float, ...]:
        """The learning rates tried at ``batch_size``."""
        if isinstance(self.lr, LRGrid):
            return self.lr.values(batch_size, self.run_defaults()["optimizer"])
        return self.lr

    def to_dict(self) -> dict[str, Any]:
        """The resolved config in the shape of a sweep file, saved with the study.

        Defaults are written out, so the store says exactly what ran; reading it back with
        ``from_dict`` plans the same runs.
        """
        d = self.run_defaults()
        out: dict[str, Any] = {
            "study": self.study,
            "task": {"name": self.task, "options": dict(d["task_options"])},
            "batch_sizes": list(self.batch_sizes),
            "lr": self.lr.to_dict() if isinstance(self.lr, LRGrid) else list(self.lr),
            "seeds": list(self.seeds),
            "optimizer": {"name": d["optimizer"], **{k: d[k] for k in OPTIMIZER_KEYS[1:]}},
            "schedule": {
                "name": d["schedule"],
                **{k: d[k] for k in SCHEDULE_KEYS[1:]},
                **dict(d["schedule_options"]),
            },
            "budget": _budget_table(d["budget_unit"], d["budget"], self.min_evals),
            "eval_every": d["eval_every"],
            "noise_scale": d["noise_scale"],
        }
        if d["adaptive_batch"]:
            out["adaptive_batch"] = dict(d["adaptive_options"]) or True
        if self.min_evals is not None:
            del out["eval_every"]  # the rule sets it
        if self.target is not None:
            out["target"] = {"metric": self.target.metric, "value": self.target.value}
        if self.per_batch:
            out["per_batch"] = {str(e.batch_size): e.to_dict() for e in self.per_batch}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, study: str | None = None) -> SweepSpec:
        """Parse a sweep file's table; ``study`` names it when the table has no ``study`` key."""
        if not isinstance(data, dict):
            raise SpecError("sweep", f"must be a table, got {type(data).__name__}")
        _check_keys("", data, TOP_KEYS)
        for key in ("task", "batch_sizes", "lr"):
            if key not in data:
                raise SpecError(key, "missing (required)")
        fixed: dict[str, Any] = {}
        task, options = _named("task", data["task"], TASK_KEYS)
        if "options" in options:
            fixed["task_options"] = tuple(_table("task.options", options["options"]).items())
        if "optimizer" in data:
            fixed["optimizer"], options = _named("optimizer", data["optimizer"], OPTIMIZER_KEYS)
            fixed.update(options)
        if "schedule" in data:
            fixed["schedule"], options = _named("schedule", data["schedule"], None)
            fixed.update((k, options.pop(k)) for k in SCHEDULE_KEYS[1:] if k in options)
            fixed["schedule_options"] = tuple(options.items())
        unit, amount, min_evals = _budget("budget", data.get("budget"), unit_required=True)
        if unit is not None:
            fixed["budget_unit"], fixed["budget"] = unit, amount
        fixed.update((k, data[k]) for k in ("eval_every", "noise_scale") if k in data)
        fixed.update(_adaptive(data.get("adaptive_batch", False)))
        if fixed.get("adaptive_batch"):
            fixed.setdefault("noise_scale", True)
        return cls(
            study=data.get("study", study),
            task=task,
            batch_sizes=data["batch_sizes"],
            lr=_lr_grid(data["lr"]),
            seeds=data.get("seeds", cls.seeds),
            fixed=tuple(fixed.items()),
            target=_target(data.get("target")),
            min_evals=min_evals,
            per_batch=_per_batch(data.get("per_batch", {})),
        )


def _adaptive(value: Any) -> dict[str, Any]:
    """``adaptive_batch = true`` or ``{rule = ..., factor = ..., ...}``: the RunSpec fields (the
    noise scale measured unless the file says ``noise_scale = false``, which is then an error)."""
    if value is False:
        return {}
    if not isinstance(value, bool | dict):
        raise SpecError(
            "adaptive_batch", f"must be true, false or a table {{rule = ..., ...}}, got {value!r}"
        )
    options = {} if value is True else value
    return {"adaptive_batch": True, "adaptive_options": tuple(options.items())}


def _table(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise SpecError(key, f"must be a table {{...}}, got {value!r}")
    return value


def _named(key: str, value: Any, allowed: tuple[str, ...] | None) -> tuple[str, dict[str, Any]]:
    """A ``"name"`` or ``{name = "...", ...}`` entry: the name and the other keys."""
    if isinstance(value, str):
        return value, {}
    table = dict(_table(key, value))
    if allowed is not None:
        _check_keys(key, table, allowed)
    if "name" not in table:
        raise SpecError(f"{key}.name", "missing (required)")
    return _coerce(f"{key}.name", table.pop("name"), "str"), table


def _budget(
    key: str, value: Any, *, unit_required: bool = False
) -> tuple[str | None, float | None, int | None]:
    """A budget table (None: not given): its unit, amount and ``min_evals`` (each None if absent).

    Only a table with ``min_evals`` may leave out the unit (the sweep's budget then applies).
    """
    if value is None:
        return None, None, None
    table = dict(_table(key, value))
    _check_keys(key, table, (*BUDGET_UNITS, MIN_EVALS))
    min_evals = table.pop(MIN_EVALS, None)
    if len(table) > 1 or (not table and (unit_required or min_evals is None)):
        raise SpecError(key, f"give exactly one of {', '.join(BUDGET_UNITS)}, got {value}")
    if not table:
        return None, None, min_evals
    ((unit, amount),) = table.items()
    return unit, _coerce(f"{key}.{unit}", amount, "float"), min_evals


def _budget_table(unit: str, amount: float, min_evals: int | None) -> dict[str, Any]:
    """A budget as a sweep file writes it."""
    return {unit: amount} | ({MIN_EVALS: min_evals} if min_evals is not None else {})


def _per_batch(value: Any) -> tuple[BatchBudget, ...]:
    """The ``[per_batch.B]`` tables: B's own ``budget`` and ``eval_every``."""
    entries = []
    for key, table in _table("per_batch", value).items():
        if not key.isdigit():
            raise SpecError(f"per_batch.{key}", "must be a batch size (an integer)")
        where = f"per_batch.{int(key)}"
        table = _table(where, table)
        _check_keys(where, table, PER_BATCH_KEYS)
        unit, amount, min_evals = _budget(f"{where}.budget", table.get("budget"))
        entries.append(BatchBudget(int(key), unit, amount, table.get("eval_every"), min_evals))
    return tuple(entries)


def _lr_grid(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    _check_keys("lr", value, LR_GRID_KEYS)
    for key in ("rule", "base_batch", "base_lr"):
        if key not in value:
            raise SpecError(
                f"lr.{key}", "missing (a rule-centred grid needs rule, base_batch, base_lr)"
            )
    options = tuple(_table("lr.options", value.get("options", {})).items())
    return LRGrid(**{**value, "options": options})


def _target(value: Any) -> Target | None:
    if value is None:
        return None
    table = _table("target", value)
    _check_keys("target", table, TARGET_KEYS)
    for key in TARGET_KEYS:
        if key not in table:
            raise SpecError(f"target.{key}", "missing: a target needs a metric and a value")
    return Target(**table)


def plan(sweep: SweepSpec) -> list[RunSpec]:
    """Every run of the sweep, by batch size, then lr, then seed: a stable order of stable ids."""
    return list(_specs(sweep))


def _specs(sweep: SweepSpec, *only: int) -> Iterator[RunSpec]:
    """The runs of ``plan`` (at the batch sizes ``only``, else all), built one at a time."""
    base = sweep.run_defaults()
    for b in only or sweep.batch_sizes:
        budget = sweep.budget_of(b)
        for lr in sweep.lrs(b):
            for s in sweep.seeds:
                point = {**base, **budget, "batch_size": b, "lr": lr, "seed": s}
                yield _renamed(lambda point=point: RunSpec(**point))


def load_sweep(path: str | Path) -> SweepSpec:
    """Read and validate a sweep file (TOML); the study defaults to the file's stem."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except OSError as exc:
        raise SpecError("sweep", f"cannot read '{path}': {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise SpecError(
            "sweep",
            f"'{path}' is not UTF-8 text (byte {exc.object[exc.start]:#x} at offset "
            f"{exc.start}); save it as UTF-8",
        ) from exc
    except tomllib.TOMLDecodeError as exc:
        raise SpecError("sweep", f"'{path}' is not valid TOML: {exc}") from exc
    return SweepSpec.from_dict(data, study=path.stem)


def check(sweep: SweepSpec, task: Task | None = None, max_steps: int | None = None) -> Task:
    """Validate the sweep against its task (built unless given) and return the task.

    Catches, before any training, what needs the data: a batch size above the training set, a
    steps budget that is not whole, a run planning more than ``max_steps`` optimizer steps.
    """
    if task is None:
        options = dict(sweep.run_defaults()["task_options"])
        task = _renamed(lambda: get_task(sweep.task, **options))
    n_train = task.n_train
    for spec in plan(sweep):
        steps = _renamed(lambda s=spec: plan_run(s, n_train)).total_steps
        if max_steps is not None and steps > max_steps:
            raise SpecError(
                "budget",
                f"run at batch size {spec.batch_size} plans {steps:,} steps, more than the "
                f"limit of {max_steps:,} (raise it with `batchlab sweep --max-steps`)",
            )
    return task
