"""Time-to-target planning: which batch size reaches a target soonest, or cheapest, on given hardware.

Two measured curves meet here. Statistically, the steps and examples to a target trade off as
``S = S_min (1 + B_crit/B)`` and ``E = E_min (1 + B/B_crit)`` (McCandlish et al. 2018, "An
Empirical Model of Large-Batch Training", arXiv:1812.06162; fitted by ``batchlab.core.fit``).
On the hardware, the time of one optimizer step is close to affine in the per-device batch,
``t(b) = overhead + per_example * b`` (``fit_step_time``), until the batch no longer fits in memory
and the step is split into micro-batches (gradient accumulation). Wall time to target is
``S(B) * t(B / devices)``, device-hours ``devices`` times that; their product with the interval of
B_crit gives the interval of each. Pollux (Qiao et al. 2021, "Pollux: Co-adaptive Cluster
Scheduling for Goodput-Optimized Deep Learning", OSDI) calls throughput x statistical efficiency
the goodput; ``fastest`` is its maximum.

Pure numpy; bad input raises ``ValueError("field: what is allowed, got ...")``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from batchlab.core.rules import ADAM_OPTIMIZERS, Advice, advise, check_number
from batchlab.errors import FieldError

# A step-time fit whose worst relative residual exceeds this is flagged (not refused): the affine
# model then misstates the time at some measured batch size by more than a quarter.
MAX_FIT_RESIDUAL = 0.25


@dataclass(frozen=True)
class StepTimeFit:
    """Seconds per optimizer step at per-device batch b, from measured (batch, seconds) pairs.

    The model is ``t(b) = overhead_s + per_example_s * b``, fitted by least squares on the
    relative error with both coefficients >= 0; ``max_residual`` is its worst |measured / fitted -
    1| and ``ok`` says it is within ``MAX_FIT_RESIDUAL``. Predictions interpolate the measurements
    linearly inside the measured range (exact at each, whatever the fit), keep the smallest
    measurement below it, and extrapolate above it with the larger of the last segment's slope
    and ``per_example_s``. ``max_batch`` is the largest per-device batch that fits in memory;
    beyond it a step runs ``ceil(b / max_batch)`` equal micro-batches (gradient accumulation).
    """

    overhead_s: float
    per_example_s: float
    batch_sizes: tuple[float, ...]
    seconds: tuple[float, ...]
    max_residual: float
    max_batch: int | None = None

    @property
    def ok(self) -> bool:
        """Whether the affine model matches every measurement within ``MAX_FIT_RESIDUAL``."""
        return self.max_residual <= MAX_FIT_RESIDUAL

    def accumulation(self, batch_size: float) -> int:
        """Micro-batches per step at per-device ``batch_size`` (1 when it fits in memory)."""
        if self.max_batch is None:
            return 1
        return max(1, math.ceil(batch_size / self.max_batch))

    def time_per_step(self, batch_size: float) -> float:
        """Seconds per optimizer step at per-device ``batch_size``, accumulating beyond ``max_batch``.

        >>> fit = StepTimeFit(0.01, 0.001, (1.0, 2.0), (0.011, 0.012), 0.0, max_batch=100)
        >>> round(fit.time_per_step(50), 6), round(fit.time_per_step(300), 6)
        (0.06, 0.33)
        """
        b = check_number("batch_size", batch_size, low=0.0, low_open=True)
        n = self.accumulation(b)
        return n * self._one(b / n)

    def _one(self, b: float) -> float:
        """Seconds of one (micro-)batch of ``b`` examples."""
        sizes, secs = self.batch_sizes, self.seconds
        if b <= sizes[0]:
            return secs[0]
        if b <= sizes[-1]:
            return float(np.interp(b, sizes, secs))
        slope = self.per_example_s
        if len(sizes) > 1:
            slope = max(slope, (secs[-1] - secs[-2]) / (sizes[-1] - sizes[-2]))
        return secs[-1] + slope * (b - sizes[-1])


def fit_step_time(
    batch_sizes: Sequence[float], seconds: Sequence[float], *, max_batch: int | None = None
) -> StepTimeFit:
    """Fit the affine step time to measured medians (relative least squares, coefficients >= 0).

    >>> fit = fit_step_time([8, 32, 128], [0.0108, 0.0132, 0.0228])
    >>> round(fit.overhead_s, 6), round(fit.per_example_s, 7), fit.ok
    (0.01, 0.0001, True)
    """
    b = np.asarray(batch_sizes, dtype=float)
    t = np.asarray(seconds, dtype=float)
    if b.shape != t.shape or b.ndim != 1 or b.size == 0:
        raise FieldError("batch_sizes", f"must be 1-D, non-empty and match seconds, got {b.shape}")
    if np.unique(b).size != b.size:
        raise FieldError("batch_sizes", f"must be distinct, got {b.tolist()}")
    order = np.argsort(b)
    b, t = b[order], t[order]
    for name, arr in (("batch_sizes", b), ("seconds", t)):
        if not np.all(np.isfinite(arr) & (arr > 0)):
            raise FieldError(name, f"every value must be finite and > 0, got {arr.tolist()}")
    if max_batch is not None:
        max_batch = int(check_number("max_batch", max_batch, low=1, integer=True))
    # Rows divided by t: minimises sum((fit/t - 1)^2), so fast and slow steps count alike.
    design = np.stack([np.ones_like(b), b], axis=1) / t[:, None]
    coef = (0.0, float(np.mean(t / b)))
    if b.size > 1:
        solved, *_ = np.linalg.lstsq(design, np.ones_like(t), rcond=None)
        coef = (float(solved[0]), float(solved[1]))
    if coef[0] < 0 or coef[1] < 0:  # keep the better of the two one-coefficient models
        through_origin = (0.0, float(np.sum(b / t) / np.sum((b / t) ** 2)))
        constant = (float(np.sum(1 / t) / np.sum(1 / t**2)), 0.0)
        coef = min(through_origin, constant, key=lambda c: _rel_sse(c, b, t))
    fitted = coef[0] + coef[1] * b
    return StepTimeFit(
        overhead_s=coef[0],
        per_example_s=coef[1],
        batch_sizes=tuple(b.tolist()),
        seconds=tuple(t.tolist()),
        max_residual=float(np.max(np.abs(t / fitted - 1.0))),
        max_batch=max_batch,
    )


def _rel_sse(coef: tuple[float, float], b: np.ndarray, t: np.ndarray) -> float:
    return float(np.sum(((coef[0] + coef[1] * b) / t - 1.0) ** 2))


@dataclass(frozen=True)
class Target:
    """Steps to the target at a reference batch, or ``S_min`` itself (``reference_batch`` None).

    With a reference batch B_ref measured to take S_ref steps, S(B) = S_ref (1 + B_crit/B) /
    (1 + B_crit/B_ref): the prediction is exact at B_ref whatever B_crit is, so its interval
    pinches there. With S_min given, S(B) = S_min (1 + B_crit/B).
    """

    steps: float
    reference_batch: float | None = None

    def __post_init__(self) -> None:
        check_number("target_steps", self.steps, low=0.0, low_open=True)
        if self.reference_batch is not None:
            check_number("reference_batch", self.reference_batch, low=0.0, low_open=True)

    @classmethod
    def from_samples(cls, samples: float, reference_batch: float) -> Target:
        """The target as E_ref examples at a reference batch (S_ref = E_ref / B_ref)."""
        b = check_number("reference_batch", reference_batch, low=0.0, low_open=True)
        return cls(check_number("target_samples", samples, low=0.0, low_open=True) / b, b)

    def s_min(self, critical_batch: float) -> float:
        """S_min implied for a given B_crit (0 for an infinite B_crit at a reference batch)."""
        if self.reference_batch is None:
            return self.steps
        return self.steps / (1.0 + critical_batch / self.reference_batch)

    def steps_at(self, batch_size: float, critical_batch: float) -> float:
        """Predicted steps to the target at ``batch_size``; an infinite B_crit (an interval with
        no upper end) is perfect scaling from the reference batch, S_ref B_ref / B.

        >>> Target(2000.0, reference_batch=100.0).steps_at(400.0, 100.0)
        1250.0
        >>> Target(2000.0, reference_batch=100.0).steps_at(400.0, float("inf"))
        500.0
        """
        if math.isinf(critical_batch):
            ref = self.reference_batch
            return math.inf if ref is None else self.steps * ref / batch_size
        return self.s_min(critical_batch) * (1.0 + critical_batch / batch_size)


@dataclass(frozen=True)
class Prediction:
    """Steps, samples, wall time and device-hours to the target at one global batch size.

    Each ``*_interval`` spans the quantity over the B_crit interval (equal ends without one).
    ``per_device_batch`` is B / devices; ``accumulation`` its micro-batches per step.
    """

    batch_size: int
    devices: int
    steps: float
    steps_interval: tuple[float, float]
    samples: float
    samples_interval: tuple[float, float]
    step_time_s: float
    wall_s: float
    wall_interval: tuple[float, float]
    device_hours: float
    device_hours_interval: tuple[float, float]
    per_device_batch: float
    accumulation: int

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict (intervals as [low, high])."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in self.__dict__.items()}


def _span(values: Sequence[float]) -> tuple[float, float]:
    return float(min(values)), float(max(values))


def predict(
    batch_sizes: Sequence[int],
    *,
    target: Target,
    critical_batch: float,
    step_time: StepTimeFit,
    devices: int = 1,
    critical_interval: tuple[float, float] | None = None,
) -> list[Prediction]:
    """Predicted cost to the target at each global batch size on ``devices`` data-parallel devices.

    Communication between devices is not modelled: t(B) = step_time(B / devices). The interval's
    upper end may be ``inf`` (a noise scale whose |G|^2 is not resolved from zero) and its lower end
    0 (a noise trace not resolved from zero: then every batch may need the target's steps).

    >>> fit = StepTimeFit(0.01, 0.0, (1.0,), (0.01,), 0.0)
    >>> [p.steps for p in predict([100, 400], target=Target(1000.0), critical_batch=100.0,
    ...                          step_time=fit)]
    [2000.0, 1250.0]
    """
    bc = check_number("critical_batch", critical_batch, low=0.0, low_open=True)
    d = int(check_number("devices", devices, low=1, integer=True))
    ends = [bc]
    if critical_interval is not None:
        low, high = critical_interval
        check_number("critical_low", low, low=0.0)
        if not math.isinf(high):
            check_number("critical_high", high, low=0.0, low_open=True)
        if not low <= bc <= high:
            raise FieldError(
                "critical_interval",
                f"must contain the critical batch {bc:g}, got [{low:g}, {high:g}]",
            )
        ends = [low, bc, high]
    out = []
    for size in batch_sizes:
        b = int(check_number("batch_sizes", size, low=1, integer=True))
        per_device = b / d
        t = step_time.time_per_step(per_device)
        steps = [target.steps_at(b, c) for c in ends]
        s = target.steps_at(b, bc)
        out.append(
            Prediction(
                batch_size=b,
                devices=d,
                steps=s,
                steps_interval=_span(steps),
                samples=s * b,
                samples_interval=_span([x * b for x in steps]),
                step_time_s=t,
                wall_s=s * t,
                wall_interval=_span([x * t for x in steps]),
                device_hours=s * t * d / 3600.0,
                device_hours_interval=_span([x * t * d / 3600.0 for x in steps]),
                per_device_batch=per_device,
                accumulation=step_time.accumulation(per_device),
            )
        )
    return out


def fastest(predictions: Sequence[Prediction]) -> Prediction:
    """The prediction with the least wall time to target (ties: fewer devices, smaller batch)."""
    if not predictions:
        raise FieldError("batch_sizes", "need at least one candidate batch size")
    return min(predictions, key=lambda p: (p.wall_s, p.devices, p.batch_size))


def cheapest(predictions: Sequence[Prediction]) -> Prediction:
    """The prediction with the fewest device-hours to target (ties: the faster, then smaller)."""
    if not predictions:
        raise FieldError("batch_sizes", "need at least one candidate batch size")
    return min(predictions, key=lambda p: (p.device_hours, p.wall_s, p.batch_size))


def device_counts(devices: int) -> list[int]:
    """Device counts a job of up to ``devices`` may use: powers of two below it, and itself.

    Without communication costs more devices only shorten a step, while each device-hour still
    counts, so ``cheapest`` looks at fewer devices too.

    >>> device_counts(6)
    [1, 2, 4, 6]
    """
    d = int(check_number("devices", devices, low=1, integer=True))
    return sorted({2**k for k in range(d.bit_length()) if 2**k < d} | {d})


def candidate_batches(low: int, high: int) -> list[int]:
    """Powers of two from ``low`` to ``high`` (both included when not powers of two).

    >>> candidate_batches(24, 200)
    [24, 32, 64, 128, 200]
    """
    lo = int(check_number("min_batch", low, low=1, integer=True))
    hi = int(check_number("max_batch", high, low=lo, integer=True))
    sizes = {lo, hi} | {2**k for k in range(lo.bit_length() - 1, hi.bit_length() + 1)}
    return sorted(s for s in sizes if lo <= s <= hi)


THROUGHPUT_FORMAT = "batchlab-throughput/1"


@dataclass(frozen=True)
class ThroughputTable:
    """Measured seconds per optimizer step against batch size on one device (median of repeats).

    ``spread`` is the interquartile range of the timed steps per batch size; ``max_batch`` the
    largest batch that fits in memory, as found by ``max_batch_source``; ``peak_memory`` the peak
    bytes per batch size where the device reports it (CUDA), else None. Plain data, so it is
    written to and read from JSON without torch (``to_dict`` / ``from_dict``).
    """

    device: str
    task: str
    optimizer: str
    batch_sizes: tuple[int, ...]
    seconds: tuple[float, ...]
    spread: tuple[float, ...]
    repeats: int
    warmup_steps: int
    max_batch: int
    max_batch_source: str
    peak_memory: tuple[float | None, ...] = ()

    def step_time(self) -> StepTimeFit:
        """The affine ``time_per_step`` fitted to this table, accumulating beyond ``max_batch``."""
        return fit_step_time(self.batch_sizes, self.seconds, max_batch=self.max_batch)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, tagged with ``THROUGHPUT_FORMAT``."""
        out: dict[str, Any] = {"format": THROUGHPUT_FORMAT}
        out.update((k, list(v) if isinstance(v, tuple) else v) for k, v in self.__dict__.items())
        return out

    @classmethod
    def from_dict(cls, data: Any) -> ThroughputTable:
        """Read a dict written by ``to_dict`` (a file someone sent: checked field by field)."""
        if not isinstance(data, dict) or data.get("format") != THROUGHPUT_FORMAT:
            raise FieldError("throughput", f"not a {THROUGHPUT_FORMAT} object")
        fields = {
            "device": str,
            "task": str,
            "optimizer": str,
            "repeats": int,
            "warmup_steps": int,
            "max_batch": int,
            "max_batch_source": str,
        }
        kw: dict[str, Any] = {}
        for name, kind in fields.items():
            value = data.get(name)
            if not isinstance(value, kind) or isinstance(value, bool):
                raise FieldError("throughput", f"{name} must be a {kind.__name__}, got {value!r}")
            kw[name] = value
        sizes = data.get("batch_sizes")
        if not isinstance(sizes, list) or not sizes:
            raise FieldError("throughput", f"batch_sizes must be a non-empty list, got {sizes!r}")
        kw["batch_sizes"] = tuple(
            int(check_number("throughput: batch_sizes", b, low=1, integer=True)) for b in sizes
        )
        for name in ("seconds", "spread"):
            values = data.get(name)
            if not isinstance(values, list) or len(values) != len(sizes):
                raise FieldError("throughput", f"{name} must be a list as long as batch_sizes")
            kw[name] = tuple(check_number(f"throughput: {name}", v, low=0.0) for v in values)
        memory = data.get("peak_memory", [])
        if not isinstance(memory, list) or (memory and len(memory) != len(sizes)):
            raise FieldError("throughput", "peak_memory must be empty or as long as batch_sizes")
        kw["peak_memory"] = tuple(
            None if v is None else check_number("throughput: peak_memory", v, low=0.0)
            for v in memory
        )
        table = cls(**kw)
        table.step_time()  # refuse a table that cannot be fitted (zero times) now
        return table


@dataclass(frozen=True)
class Recommendation:
    """The batch size for one goal (``fastest`` or ``cheapest``) and how to train at it.

    ``advice`` is ``core.rules.advise`` from the base (batch, lr) by the matching rule: ``critical``
    for SGD, ``surge`` for Adam, with B_noise = B_crit, Goyal's warmup and (Adam) beta2 at the same
    half-life; None when no base lr was given.
    """

    goal: str
    prediction: Prediction
    advice: Advice | None

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: the prediction, then the lr advice when there is one."""
        out: dict[str, Any] = {"goal": self.goal, **self.prediction.to_dict()}
        if self.advice is not None:
            out["advice"] = self.advice.to_dict()
        return out


def recommend(
    predictions: Sequence[Prediction],
    *,
    critical_batch: float,
    base_batch: int | None = None,
    base_lr: float | None = None,
    optimizer: str = "sgd",
    n_train: int | None = None,
    **options: float,
) -> tuple[Recommendation, Recommendation]:
    """The fastest and the cheapest batch size, each with its lr by the matching rule.

    ``options`` go to ``advise``: ``beta1``, ``beta2``, ``eps`` at the base batch, ``warmup_epochs``. With ``n_train`` the advice
    counts the predicted samples to target as its epochs (so it warns of a warmup too long for them).
    """
    picks = []
    for goal, chosen in (("fastest", fastest(predictions)), ("cheapest", cheapest(predictions))):
        advice = None
        if base_lr is not None and base_batch is not None:
            advice = advise(
                base_batch,
                base_lr,
                chosen.batch_size,
                n_train=n_train,
                epochs=None if n_train is None else chosen.samples / n_train,
                optimizer=optimizer,
                rule="surge" if optimizer in ADAM_OPTIMIZERS else "critical",
                noise_scale=critical_batch,
                **options,
            )
        picks.append(Recommendation(goal, chosen, advice))
    return picks[0], picks[1]


def advice_costs(advice: Advice, step_time: StepTimeFit, devices: int = 1) -> dict[str, Any]:
    """Seconds per step at B0 and B1 and, where the advice has them, wall time and device-hours for
    its epochs and (with a noise scale) for reaching the loss B0 reaches in those epochs.

    >>> a = advise(100, 0.1, 400, n_train=10_000, epochs=1, noise_scale=100.0)
    >>> fit = StepTimeFit(0.01, 0.0, (1.0,), (0.01,), 0.0)
    >>> c = advice_costs(a, fit)
    >>> c["wall_s"], c["same_loss_wall_s"]
    ([1.0, 0.25], [1.0, 0.625])
    """
    d = int(check_number("devices", devices, low=1, integer=True))
    r = advice.result
    t = [step_time.time_per_step(b / d) for b in (r.base_batch, r.batch_size)]
    out: dict[str, Any] = {"devices": d, "step_time_s": t}
    if advice.total_steps is not None and advice.base_total_steps is not None:
        wall = [advice.base_total_steps * t[0], advice.total_steps * t[1]]
        out.update(wall_s=wall, device_hours=[w * d / 3600.0 for w in wall])
        if advice.steps_ratio is not None:
            same = [wall[0], advice.base_total_steps * advice.steps_ratio * t[1]]
            out.update(same_loss_wall_s=same, same_loss_device_hours=[w * d / 3600 for w in same])
    return out
