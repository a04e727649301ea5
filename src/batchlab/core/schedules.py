"""Learning-rate schedules and batch-size schedules as pure functions of the step.

A schedule is a function ``step -> value`` (the step may be fractional: the engine counts steps as
samples seen / first batch size). Builders are named for what they return and combine with
functions (``join_schedules``, ``with_warmup``), as in optax. Edge cases are defined, not errors:
negative steps count as step 0, a transition of zero length is the constant start value (optax),
and past its end a transition holds its end value.

``build_lr_schedule`` is what the engine calls. Its schedules and their ``schedule_options``, all in
fractions of the budget (T total steps, W warmup steps; defaults as declared in ``SCHEDULE_OPTIONS``):

- ``constant``: the peak lr throughout; no options.
- ``cosine``: half cosine from lr down to ``final_factor * lr`` over [W, T]; final_factor 0.
- ``linear``: straight line from lr down to ``final_factor * lr`` over [W, T]; final_factor 0.
- ``exponential``: geometric from lr down to ``final_factor * lr`` over [W, T]; final_factor 0.01.
- ``step``: x ``gamma`` at every ``step_size * T``; step_size 1/3, gamma 0.1.
- ``multistep``: x ``gamma`` at each ``milestone * T``; milestones (0.5, 0.75), gamma 0.1 (one
  factor, or a list of one factor per milestone).

Warmup (Goyal et al. 2017, "Accurate, Large Minibatch SGD", arXiv:1706.02677): over the first W
steps the lr ramps from ``warmup_start * lr`` to the peak ``lr`` (``linear``: straight line,
``exponential``: geometric), then the schedule proper runs. Option ``warmup_start`` defaults to
``WARMUP_START`` (0 for linear, 0.01 for exponential); Goyal's own warmup starts at the small-batch
lr, i.e. ``warmup_start = 1/k`` (``RuleResult.warmup_start_factor``). Decays (cosine, linear,
exponential) span [W, T] so the lr is continuous at W (optax ``warmup_cosine_decay_schedule``);
step and multistep milestones stay at their fraction of the whole budget (Goyal: epochs 30, 60, 80
of 90 with 5 warmup epochs), and one that falls inside the warmup takes effect when it ends.

Batch-size schedules: ``increase_batch`` (Smith et al. 2018, "Don't Decay the Learning Rate,
Increase the Batch Size", arXiv:1711.00489) and ``regime_adaptation`` (Hoffer et al. 2017, "Train
longer, generalize better", arXiv:1705.08741) return a ``SchedulePlan`` that fills the ``RunSpec``
fields ``batch_size``, ``lr``, ``schedule``, ``schedule_options``, ``batch_schedule``,
``warmup_epochs`` and the budget.
"""

from __future__ import annotations

import bisect
import itertools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from batchlab.core.rules import (
    ADAM_OPTIMIZERS,
    OPTIMIZERS,
    SOURCES,
    apply_rule,
    check_number,
)
from batchlab.errors import FieldError

Schedule = Callable[[float], float]

LR_SCHEDULES = ("constant", "cosine", "linear", "step", "multistep", "exponential")
WARMUPS = ("linear", "exponential")
SCHEDULE_OPTIONS: dict[str, dict[str, Any]] = {
    "constant": {},
    "cosine": {"final_factor": 0.0},
    "linear": {"final_factor": 0.0},
    "exponential": {"final_factor": 0.01},
    "step": {"step_size": 1 / 3, "gamma": 0.1},
    "multistep": {"milestones": (0.5, 0.75), "gamma": 0.1},
}
WARMUP_START = {"linear": 0.0, "exponential": 0.01}
# A step within this relative distance of a boundary counts as reaching it, so a milestone computed
# as fraction x steps and one computed as epochs x N / B agree despite rounding.
BOUNDARY_RTOL = 1e-9


def _reached(boundary: float) -> float:
    """The value from which a step counts as having reached ``boundary``."""
    return boundary - BOUNDARY_RTOL * max(1.0, abs(boundary))


def constant_schedule(value: float) -> Schedule:
    """A schedule that always returns ``value``.

    >>> constant_schedule(0.1)(1000)
    0.1
    """
    return lambda step: value


def _transition(
    init_value: float, transition_steps: float, curve: Callable[[float], float]
) -> Schedule:
    """``curve(p)`` for progress p = step / transition_steps clipped to [0, 1]; constant
    ``init_value`` when the transition has no length (as optax)."""
    if transition_steps <= 0:
        return constant_schedule(init_value)
    return lambda step: curve(min(max(step, 0.0) / transition_steps, 1.0))


def linear_schedule(init_value: float, end_value: float, transition_steps: float) -> Schedule:
    """Straight line from ``init_value`` to ``end_value`` over ``transition_steps``, then flat.

    >>> f = linear_schedule(0.0, 1.0, 10)
    >>> f(0), f(2.5), f(10), f(50)
    (0.0, 0.25, 1.0, 1.0)
    """
    return _transition(
        init_value, transition_steps, lambda p: init_value * (1.0 - p) + end_value * p
    )


def cosine_schedule(init_value: float, end_value: float, transition_steps: float) -> Schedule:
    """Half cosine from ``init_value`` to ``end_value`` over ``transition_steps`` (Loshchilov & Hutter
    2017, SGDR, without restarts), then flat.

    >>> f = cosine_schedule(1.0, 0.0, 100)
    >>> f(0), round(f(50), 12), f(100)
    (1.0, 0.5, 0.0)
    """
    half = 0.5 * (init_value - end_value)
    return _transition(
        init_value, transition_steps, lambda p: end_value + half * (1.0 + math.cos(math.pi * p))
    )


def exponential_schedule(init_value: float, end_value: float, transition_steps: float) -> Schedule:
    """Geometric path from ``init_value`` to ``end_value`` (both > 0): exponential decay, or an
    exponential warmup when end > init.

    >>> f = exponential_schedule(1.0, 0.01, 10)
    >>> round(f(5), 12), round(f(10), 12)
    (0.1, 0.01)
    """
    check_number("init_value", init_value, low=0.0, low_open=True)
    check_number("end_value", end_value, low=0.0, low_open=True)
    return _transition(
        init_value, transition_steps, lambda p: init_value ** (1.0 - p) * end_value**p
    )


def multistep_schedule(
    init_value: float, boundaries: Sequence[float], gamma: float | Sequence[float]
) -> Schedule:
    """``init_value`` times ``gamma`` at each boundary reached (a sequence: one factor per boundary).

    >>> f = multistep_schedule(1.0, [30, 60], 0.1)
    >>> f(29.9), f(30), round(f(75), 12)
    (1.0, 0.1, 0.01)
    >>> multistep_schedule(1.0, [10, 20], [0.5, 4.0])(20)
    2.0
    """
    bounds = [float(b) for b in boundaries]
    if bounds != sorted(bounds):
        raise FieldError("boundaries", f"must be non-decreasing, got {list(boundaries)}")
    factors = [gamma] * len(bounds) if isinstance(gamma, int | float) else list(gamma)
    if len(factors) != len(bounds):
        raise FieldError(
            "gamma", f"needs one factor per boundary ({len(bounds)}), got {len(factors)}"
        )
    values = [init_value]
    for factor in factors:
        values.append(values[-1] * factor)
    edges = [_reached(b) for b in bounds]
    return lambda step: values[bisect.bisect_right(edges, max(step, 0.0))]


def step_schedule(init_value: float, step_size: float, gamma: float) -> Schedule:
    """``init_value * gamma ** floor(step / step_size)``: decay by ``gamma`` every ``step_size`` steps.

    >>> f = step_schedule(1.0, 30, 0.5)
    >>> f(0), f(30), f(89.5), f(90)
    (1.0, 0.5, 0.25, 0.125)
    """
    size = check_number("step_size", step_size, low=0.0, low_open=True)
    return lambda step: init_value * gamma ** math.floor(max(step, 0.0) / size + BOUNDARY_RTOL)


def join_schedules(schedules: Sequence[Schedule], boundaries: Sequence[float]) -> Schedule:
    """Run ``schedules[i]`` from ``boundaries[i-1]`` on, with its step counted from that boundary
    (optax semantics): ``len(schedules) == len(boundaries) + 1``.

    >>> f = join_schedules([linear_schedule(0.0, 1.0, 10), constant_schedule(0.5)], [10])
    >>> f(5), f(10), f(99)
    (0.5, 0.5, 0.5)
    """
    starts = [0.0, *(float(b) for b in boundaries)]
    if len(schedules) != len(starts):
        raise FieldError(
            "schedules",
            f"need one more schedule than boundaries, got {len(schedules)} and {len(boundaries)}",
        )
    if starts != sorted(starts):
        raise FieldError("boundaries", f"must be non-decreasing and >= 0, got {list(boundaries)}")

    def joined(step: float) -> float:
        i = bisect.bisect_right(starts, step) - 1 if step >= 0 else 0
        return schedules[i](step - starts[i])

    return joined


def with_warmup(
    schedule: Schedule,
    warmup_steps: float,
    *,
    kind: str = "linear",
    start_factor: float | None = None,
    peak: float | None = None,
) -> Schedule:
    """Ramp from ``start_factor * peak`` to ``peak`` (default ``schedule(0)``) over ``warmup_steps``,
    then run ``schedule`` counted from the end of the warmup. ``start_factor`` defaults to
    ``WARMUP_START``.

    >>> f = with_warmup(constant_schedule(1.0), 4)
    >>> [f(s) for s in (0, 1, 2, 4, 9)]
    [0.0, 0.25, 0.5, 1.0, 1.0]
    >>> g = with_warmup(constant_schedule(1.0), 2, kind="exponential", start_factor=0.01)
    >>> round(g(1), 12)
    0.1
    """
    if kind not in WARMUPS:
        raise FieldError("warmup", f"must be one of {', '.join(WARMUPS)}, got {kind!r}")
    check_number("warmup_steps", warmup_steps, low=0.0)
    start = WARMUP_START[kind] if start_factor is None else start_factor
    _check_warmup_start(kind, start, "start_factor")
    if warmup_steps == 0:
        return schedule
    peak = schedule(0.0) if peak is None else peak
    ramp = linear_schedule if kind == "linear" else exponential_schedule
    return join_schedules([ramp(start * peak, peak, warmup_steps), schedule], [warmup_steps])


def _check_warmup_start(kind: str, value: Any, field: str) -> float:
    return check_number(field, value, low=0.0, high=1.0, low_open=kind == "exponential")


def _check_fractions(field: str, value: Any) -> tuple[float, ...]:
    """Fractions of the budget in (0, 1], non-decreasing."""
    ok = isinstance(value, Sequence) and not isinstance(value, str)
    fractions = tuple(value) if ok else ()
    if not ok or not all(
        isinstance(f, int | float) and not isinstance(f, bool) and 0 < f <= 1 for f in fractions
    ):
        raise FieldError(
            field, f"must be a list of fractions of the budget in (0, 1], got {value!r}"
        )
    if list(fractions) != sorted(fractions):
        raise FieldError(field, f"must be non-decreasing, got {value!r}")
    return tuple(float(f) for f in fractions)


def _check_gamma(field: str, value: Any, count: int) -> float | tuple[float, ...]:
    """One decay factor > 0, or (multistep) one per milestone."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != count:
            raise FieldError(field, f"needs one factor per milestone ({count}), got {value!r}")
        return tuple(check_number(field, v, low=0.0, low_open=True) for v in value)
    return check_number(field, value, low=0.0, low_open=True)


def resolve_schedule_options(
    name: str, options: Mapping[str, Any], warmup: str = "linear"
) -> dict[str, Any]:
    """Validate ``schedule_options`` for schedule ``name`` and fill in every default.

    Raises ``ValueError("schedule_options.<key>: ...")`` for an unknown key or a bad value.

    >>> resolve_schedule_options("multistep", {"gamma": 0.2})
    {'milestones': (0.5, 0.75), 'gamma': 0.2, 'warmup_start': 0.0}
    """
    if name not in SCHEDULE_OPTIONS:
        raise FieldError("schedule", f"must be one of {', '.join(LR_SCHEDULES)}, got {name!r}")
    if warmup not in WARMUPS:
        raise FieldError("warmup", f"must be one of {', '.join(WARMUPS)}, got {warmup!r}")
    resolved = {**SCHEDULE_OPTIONS[name], "warmup_start": WARMUP_START[warmup]}
    for key in options:
        if key not in resolved:
            raise FieldError(
                f"schedule_options.{key}",
                f"unknown for schedule {name!r}; allowed: {', '.join(resolved)}",
            )
    resolved.update(options)
    for key, value in resolved.items():
        field = f"schedule_options.{key}"
        if key == "warmup_start":
            resolved[key] = _check_warmup_start(warmup, value, field)
        elif key == "final_factor":
            resolved[key] = check_number(
                field, value, low=0.0, high=1.0, low_open=name == "exponential"
            )
        elif key == "step_size":
            resolved[key] = check_number(field, value, low=0.0, high=1.0, low_open=True)
        elif key == "milestones":
            resolved[key] = _check_fractions(field, value)
    if "gamma" in resolved:
        count = len(resolved.get("milestones", ()))
        resolved["gamma"] = _check_gamma("schedule_options.gamma", resolved["gamma"], count)
        if name == "step" and isinstance(resolved["gamma"], tuple):
            raise FieldError(
                "schedule_options.gamma", f"must be one number for step, got {resolved['gamma']!r}"
            )
    return resolved


_DECAYS = {
    "cosine": cosine_schedule,
    "linear": linear_schedule,
    "exponential": exponential_schedule,
}


def build_lr_schedule(
    name: str,
    lr: float,
    total_steps: float,
    *,
    warmup_steps: float = 0.0,
    warmup: str = "linear",
    **options: Any,
) -> Schedule:
    """The learning rate at a (possibly fractional) step for schedule ``name`` and its options.

    See the module docstring for each schedule's options, defaults and the warmup convention.
    ``warmup_steps = 0`` means no warmup; ``total_steps <= warmup_steps`` leaves no room to decay, so
    a decaying schedule holds the peak after the warmup.

    >>> f = build_lr_schedule("cosine", 0.1, 100, warmup_steps=10)
    >>> f(0), f(5), f(10), round(f(55), 12), f(100)
    (0.0, 0.05, 0.1, 0.05, 0.0)
    >>> g = build_lr_schedule("multistep", 1.0, 90, milestones=[1 / 3, 2 / 3], gamma=0.1)
    >>> g(29), g(30), round(g(60), 12)
    (1.0, 0.1, 0.01)
    """
    opts = resolve_schedule_options(name, options, warmup)
    lr = check_number("lr", lr, low=0.0)
    total = check_number("total_steps", total_steps, low=0.0)
    w = check_number("warmup_steps", warmup_steps, low=0.0)
    decay = max(total - w, 0.0)
    if name in _DECAYS:
        main = _DECAYS[name](1.0, opts["final_factor"], decay)
    elif name in ("step", "multistep"):
        if name == "step":
            count = math.floor(1.0 / opts["step_size"] + BOUNDARY_RTOL)
            opts["milestones"] = tuple(i * opts["step_size"] for i in range(1, count + 1))
        main = multistep_schedule(1.0, [m * total - w for m in opts["milestones"]], opts["gamma"])
    else:
        main = constant_schedule(1.0)
    unit = with_warmup(main, w, kind=warmup, start_factor=opts["warmup_start"], peak=1.0)
    return lambda step: lr * unit(step)


def batch_size_at(
    batch_size: int, batch_schedule: Sequence[tuple[float, int]], epoch: float
) -> int:
    """The batch size in force at ``epoch``: ``batch_size`` until the first ``(epoch, size)`` entry of
    ``batch_schedule`` is reached (the ``RunSpec.batch_schedule`` convention).

    >>> batch_size_at(128, [(30, 640), (60, 3200)], 45.0)
    640
    """
    size = batch_size
    for start, scheduled in sorted(batch_schedule):
        if epoch >= _reached(start):
            size = int(scheduled)
    return size


@dataclass(frozen=True)
class SchedulePlan:
    """An LR schedule plus a batch-size schedule for one run, in ``RunSpec`` terms.

    ``schedule`` and ``schedule_options`` are evaluated, as the engine does, on the step counted at
    the first batch size (samples seen / ``batch_size``); ``batch_schedule`` is ``((epoch, size),
    ...)``. ``spec_fields()`` gives the ``RunSpec`` fields, e.g. ``spec.replace(**plan.spec_fields())``.
    """

    batch_size: int
    lr: float
    epochs: float
    n_train: int
    schedule: str = "constant"
    schedule_options: tuple[tuple[str, Any], ...] = ()
    batch_schedule: tuple[tuple[float, int], ...] = ()
    warmup_epochs: float = 0.0
    warmup: str = "linear"
    source: str = ""

    @property
    def total_steps(self) -> float:
        """The budget in steps counted at the first batch size (what ``lr_at`` takes)."""
        return self.epochs * self.n_train / self.batch_size

    @property
    def updates(self) -> float:
        """Optimizer updates actually taken: samples of each batch-size phase / its batch size."""
        edges = [0.0, *(min(e, self.epochs) for e, _ in self.batch_schedule), self.epochs]
        sizes = [self.batch_size, *(b for _, b in self.batch_schedule)]
        phases = zip(itertools.pairwise(edges), sizes, strict=True)
        return sum((hi - lo) * self.n_train / b for (lo, hi), b in phases)

    @cached_property
    def lr_schedule(self) -> Schedule:
        """``step -> lr`` exactly as the engine builds it from the spec fields."""
        return build_lr_schedule(
            self.schedule,
            self.lr,
            self.total_steps,
            warmup_steps=self.warmup_epochs * self.n_train / self.batch_size,
            warmup=self.warmup,
            **dict(self.schedule_options),
        )

    def lr_at(self, step: float) -> float:
        """Learning rate at ``step`` (counted at the first batch size)."""
        return self.lr_schedule(step)

    def batch_size_at(self, epoch: float) -> int:
        """Batch size in force at ``epoch``."""
        return batch_size_at(self.batch_size, self.batch_schedule, epoch)

    def option(self, name: str) -> Any:
        """Value of one ``schedule_options`` entry (None when absent)."""
        return dict(self.schedule_options).get(name)

    def spec_fields(self) -> dict[str, Any]:
        """The ``RunSpec`` fields this plan decides (budget in epochs)."""
        return {
            "batch_size": self.batch_size,
            "lr": self.lr,
            "schedule": self.schedule,
            "schedule_options": dict(self.schedule_options),
            "batch_schedule": self.batch_schedule,
            "warmup_epochs": self.warmup_epochs,
            "warmup": self.warmup,
            "budget_unit": "epochs",
            "budget": self.epochs,
        }


def increase_batch(
    lr: float,
    batch_size: int,
    milestones: Sequence[float],
    gamma: float,
    *,
    epochs: float,
    n_train: int,
    max_batch: int | None = None,
    warmup_epochs: float = 0.0,
    optimizer: str = "sgd",
) -> SchedulePlan:
    """Turn a step decay (lr x ``gamma`` at each of ``milestones``, in epochs) into batch growth.

    Smith et al. 2018: at each milestone multiply the batch by 1/gamma instead of decaying the lr,
    until ``max_batch`` (default: the training set), then decay the lr. Batch sizes are rounded to
    integers and the lr absorbs the rounding, so the noise temperature g = lr N / (B (1 - m)) equals
    the original schedule's at every step. For Adam (``optimizer`` adam or adamw) this is Seesaw
    (Meterez et al. 2025): the lr also goes x sqrt(gamma) at each milestone, so lr / sqrt(B) follows
    the original schedule (each doubling of B: lr x 1/sqrt(2)).

    >>> plan = increase_batch(0.1, 128, [60, 120, 160], 0.2, epochs=200, n_train=50_000, max_batch=5000)
    >>> plan.batch_schedule
    ((60.0, 640), (120.0, 3200), (160.0, 5000))
    >>> plan.schedule, plan.option("milestones"), round(plan.option("gamma"), 12)
    ('multistep', (0.8,), 0.3125)
    """
    lr = check_number("lr", lr, low=0.0, low_open=True)
    b0 = int(check_number("batch_size", batch_size, low=1, integer=True))
    epochs = check_number("epochs", epochs, low=0.0, low_open=True)
    n = int(check_number("n_train", n_train, low=1, integer=True))
    gamma = check_number("gamma", gamma, low=0.0, high=1.0, low_open=True, high_open=True)
    cap = max(n, b0) if max_batch is None else max_batch
    cap = int(check_number("max_batch", cap, low=b0, integer=True))
    points = _check_fractions(
        "milestones", [check_number("milestones", m) / epochs for m in milestones]
    )
    if optimizer not in OPTIMIZERS:
        raise FieldError("optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    power = 0.5 if optimizer in ADAM_OPTIMIZERS else 1.0
    batch_schedule, lr_milestones, factors = [], [], []
    size, ideal = b0, float(b0)
    for fraction in points:
        ideal /= gamma
        new_size = round(min(ideal, cap))
        # SGD: lr_i = lr_(i-1) gamma B_i / B_(i-1) keeps lr_i / B_i = lr gamma^i / B0, the original
        # g; Adam: the same with sqrt(B_i / B_(i-1)), keeping lr_i / sqrt(B_i) (Seesaw).
        factor = gamma * (new_size / size) ** power
        if new_size != size:
            batch_schedule.append((fraction * epochs, new_size))
        if abs(factor - 1.0) > BOUNDARY_RTOL:
            lr_milestones.append(fraction)
            factors.append(factor)
        size = new_size
    options: dict[str, Any] = {}
    if lr_milestones:
        same = all(math.isclose(f, factors[0], rel_tol=1e-12) for f in factors)
        options = {
            "milestones": tuple(lr_milestones),
            "gamma": factors[0] if same else tuple(factors),
        }
    return SchedulePlan(
        batch_size=b0,
        lr=lr,
        epochs=epochs,
        n_train=n,
        schedule="multistep" if lr_milestones else "constant",
        schedule_options=tuple(options.items()),
        batch_schedule=tuple(batch_schedule),
        warmup_epochs=check_number("warmup_epochs", warmup_epochs, low=0.0),
        source=SOURCES["seesaw" if power == 0.5 else "temperature"],
    )


def regime_adaptation(
    lr: float,
    batch_size: int,
    to_batch_size: int,
    *,
    epochs: float,
    n_train: int,
    schedule: str = "constant",
    schedule_options: Mapping[str, Any] | None = None,
    warmup_epochs: float = 0.0,
    rule: str = "sqrt",
) -> SchedulePlan:
    """Hoffer et al. 2017 regime adaptation: at k = B1/B0 train k times the epochs (the same number
    of updates) with every schedule point stretched by k, and the lr from ``rule`` (sqrt, as Hoffer).

    Schedule options are fractions of the budget, so they carry over unchanged.

    >>> plan = regime_adaptation(0.1, 128, 512, epochs=10, n_train=50_000)
    >>> plan.lr, plan.epochs, plan.total_steps == 10 * 50_000 / 128
    (0.2, 40.0, True)
    """
    result = apply_rule(rule, base_batch=batch_size, base_lr=lr, batch_size=to_batch_size)
    epochs = check_number("epochs", epochs, low=0.0, low_open=True)
    options = resolve_schedule_options(schedule, schedule_options or {})
    given = {k: options[k] for k in schedule_options or {}}
    return SchedulePlan(
        batch_size=result.batch_size,
        lr=result.lr,
        epochs=epochs * result.k,
        n_train=int(check_number("n_train", n_train, low=1, integer=True)),
        schedule=schedule,
        schedule_options=tuple(given.items()),
        warmup_epochs=check_number("warmup_epochs", warmup_epochs, low=0.0) * result.k,
        source=f"Hoffer et al. 2017, arXiv:1705.08741; lr: {result.source}",
    )
