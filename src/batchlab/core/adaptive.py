"""Adaptive batch size: grow the batch as the measured gradient noise scale grows, lr on its rule.

A pure controller (numpy and stdlib only). Given the batch in force, a reading of the noise scale
B_simple = tr(Sigma) / |G|^2 (value and interval) and the settings, :func:`decide` returns the next
batch size and the learning-rate factor that goes with it:

- **When.** The batch B grows once ``patience`` consecutive readings all have B_simple >=
  ``factor`` x B (hysteresis: one noisy reading changes nothing, and a reading that does not call
  for growth restarts the count). McCandlish et al. 2018 ("An Empirical Model of Large-Batch
  Training", arXiv:1812.06162): steps fall almost linearly with B up to B_noise and barely beyond,
  so a batch well below the noise scale wastes steps.
- **To what.** The largest B x 2^k (1 <= k <= ``max_doublings``, default 1: one doubling per
  change, each earned by its own streak) not above the smallest B_simple of the streak, within
  the bounds: ``max_batch``, the training-set size ``n_train`` and, without accumulation, the
  largest batch that fits in memory ``memory_batch``. Powers of two keep every batch a multiple
  of the first one, so micro-batches keep dividing it.
- **Shrinking** only with ``shrink=True``: ``patience`` readings with B_simple <= B / ``factor``,
  to the largest B / 2^k (k <= ``max_doublings``) not above the largest B_simple of the streak,
  down to ``min_batch``
  (default the first batch).
- **The lr.** ``lr_scale`` multiplies the base lr (the one for ``base_batch``): ``constant`` keeps
  it (Smith et al. 2018, "Don't Decay the Learning Rate, Increase the Batch Size",
  arXiv:1711.00489: growing B at a fixed lr acts as an lr decay), ``linear`` x k (Goyal et al.
  2017), ``critical`` lr_max / (1 + B_noise/B) through the base point with the reading's B_noise
  (McCandlish et al. 2018; the AdaScale gain), ``seesaw`` x 1/sqrt(2) per doubling for Adam
  (Meterez et al. 2025, arXiv:2510.14717). ``auto``: critical for SGD, seesaw for Adam/AdamW.

AdaptDL/Pollux (Qiao et al. 2021, "Pollux: Co-adaptive Cluster Scheduling for Goodput-Optimized
Deep Learning", OSDI) adapts the batch per job from the same statistic inside its scheduler; this
controller is the statistical half alone, for any loop (``batchlab.engine.adaptive`` drives it).

>>> s = AdaptiveSettings(base_batch=64, base_lr=0.1, rule="linear", max_doublings=3)
>>> st = initial_state(s)
>>> d = decide(s, st, 300.0)          # 300 >= 2 x 64, but one reading is not enough
>>> d.changed, d.state.batch_size
(False, 64)
>>> d = decide(s, d.state, 280.0)     # the second agrees: grow to 256 (<= 280), lr x 4
>>> d.changed, d.state.batch_size, d.state.lr_scale
(True, 256, 4.0)
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any, NamedTuple

from batchlab.core.rules import (
    ADAM_OPTIMIZERS,
    OPTIMIZERS,
    SOURCES,
    check_number,
    critical,
    linear,
    seesaw_lr,
)
from batchlab.errors import FieldError

ADAPTIVE_RULES = ("auto", "constant", "linear", "critical", "seesaw")
ADAPTIVE_SOURCES = {
    "constant": SOURCES["temperature"],
    "linear": SOURCES["linear"],
    "critical": SOURCES["critical"],
    "seesaw": SOURCES["seesaw"],
}


@dataclass(frozen=True)
class AdaptiveSettings:
    """How the controller decides; every field is checked on construction (``FieldError``).

    ``factor``: grow when B_simple >= factor x B (and shrink, if allowed, when B_simple <= B /
    factor). ``patience``: consecutive readings that must agree. ``max_doublings``: the most
    doublings (or halvings) one change makes. ``use_low``: compare the lower end
    of the reading's interval instead of its value (grows only when the data are sure).
    ``memory_batch``: the largest batch one forward/backward holds; with ``accumulate`` larger
    batches are split into micro-batches, without it ``memory_batch`` bounds the batch.
    """

    base_batch: int
    base_lr: float
    optimizer: str = "sgd"
    rule: str = "auto"
    factor: float = 2.0
    patience: int = 2
    max_doublings: int = 1
    max_batch: int | None = None
    n_train: int | None = None
    memory_batch: int | None = None
    accumulate: bool = True
    shrink: bool = False
    min_batch: int | None = None
    use_low: bool = False

    def __post_init__(self) -> None:
        check_number("base_batch", self.base_batch, low=1, integer=True)
        check_number("base_lr", self.base_lr, low=0.0)
        if self.optimizer not in OPTIMIZERS:
            raise FieldError(
                "optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        if self.rule not in ADAPTIVE_RULES:
            raise FieldError(
                "rule", f"must be one of {', '.join(ADAPTIVE_RULES)}, got {self.rule!r}"
            )
        check_number("factor", self.factor, low=1.0, low_open=True)
        check_number("patience", self.patience, low=1, integer=True)
        check_number("max_doublings", self.max_doublings, low=1, integer=True)
        for name in ("max_batch", "n_train", "memory_batch", "min_batch"):
            if getattr(self, name) is not None:
                check_number(name, getattr(self, name), low=1, integer=True)
        for name in ("accumulate", "shrink", "use_low"):
            if not isinstance(getattr(self, name), bool):
                raise FieldError(name, f"must be true or false, got {getattr(self, name)!r}")
        if self.limit < self.base_batch:
            raise FieldError(
                "max_batch",
                f"the bounds allow at most {self.limit}, below base_batch {self.base_batch}",
            )
        if self.floor > self.base_batch:
            raise FieldError(
                "min_batch", f"must be <= base_batch {self.base_batch}, got {self.min_batch}"
            )

    @property
    def resolved_rule(self) -> str:
        """The lr rule in force: ``auto`` is critical for SGD, seesaw for Adam and AdamW."""
        if self.rule != "auto":
            return self.rule
        return "seesaw" if self.optimizer in ADAM_OPTIMIZERS else "critical"

    @property
    def limit(self) -> int:
        """The largest batch the bounds allow (max_batch, n_train, memory_batch without
        accumulation); a very large number when none is set."""
        bounds = [self.max_batch, self.n_train, None if self.accumulate else self.memory_batch]
        return min((b for b in bounds if b is not None), default=2**62)

    @property
    def floor(self) -> int:
        """The smallest batch a shrink may reach (``min_batch``, default ``base_batch``)."""
        return self.base_batch if self.min_batch is None else self.min_batch

    def to_dict(self) -> dict[str, Any]:
        """Every field, JSON-ready (stored with the run)."""
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class AdaptiveState:
    """Where the controller stands: the batch and lr factor in force and the current streak.

    ``pending`` holds the compared B_simple of the consecutive readings that call for the same
    change (all above ``factor`` x B, or all below B / ``factor``).
    """

    batch_size: int
    lr_scale: float = 1.0
    pending: tuple[float, ...] = ()
    changes: int = 0

    def to_dict(self) -> dict[str, Any]:
        """Plain numbers, for a state dict."""
        return {**dataclasses.asdict(self), "pending": list(self.pending)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaptiveState:
        """Inverse of :meth:`to_dict`."""
        return cls(
            batch_size=int(data["batch_size"]),
            lr_scale=float(data["lr_scale"]),
            pending=tuple(float(v) for v in data["pending"]),
            changes=int(data["changes"]),
        )


class Decision(NamedTuple):
    """The controller's answer to one reading: the new state, whether B changed, and why."""

    state: AdaptiveState
    changed: bool
    reason: str


def initial_state(settings: AdaptiveSettings) -> AdaptiveState:
    """The state before any reading: the base batch at the base lr."""
    return AdaptiveState(batch_size=settings.base_batch)


def lr_scale(settings: AdaptiveSettings, batch_size: int, noise_scale: float) -> float:
    """lr(batch_size) / base_lr on the settings' rule (``noise_scale`` feeds ``critical``).

    >>> s = AdaptiveSettings(base_batch=64, base_lr=1e-3, optimizer="adam")
    >>> round(lr_scale(s, 256, 500.0), 12)   # seesaw: two doublings, (1/sqrt(2))^2
    0.5
    """
    b0, b1, rule = settings.base_batch, batch_size, settings.resolved_rule
    if rule == "constant":
        return 1.0
    lr0 = 1.0  # every rule here is proportional in the base lr: work with lr0 = 1
    if rule == "linear":
        return linear(b0, lr0, b1, warmup_epochs=0.0).lr
    if rule == "critical":
        return critical(b0, lr0, b1, noise_scale=noise_scale, warmup_epochs=0.0).lr
    return seesaw_lr(b0, lr0, b1)


def _target(settings: AdaptiveSettings, batch: int, noise: float) -> int:
    """The batch one streak at ``noise`` asks for: B x 2^k, the largest not beyond ``noise``
    (at least one doubling or halving, at most ``max_doublings``), inside the bounds; ``batch``
    itself if none fits."""
    most = settings.max_doublings
    if noise >= batch:
        k = min(most, max(1, math.floor(math.log2(noise / batch))))
        while k and batch * 2**k > settings.limit:
            k -= 1
        return batch * 2**k
    k = min(most, max(1, math.ceil(math.log2(batch / noise))))
    while k and (batch % 2**k or batch // 2**k < settings.floor):
        k -= 1
    return batch // 2**k


def decide(
    settings: AdaptiveSettings,
    state: AdaptiveState,
    noise_scale: float | None,
    low: float | None = None,
    high: float | None = None,
) -> Decision:
    """Fold one noise-scale reading (value, optional interval) into the state; see the module.

    A missing or non-finite reading (|G|^2 not resolved from zero, or too few measurements) is no
    evidence either way: it restarts the streak.

    >>> s = AdaptiveSettings(base_batch=32, base_lr=0.1, rule="constant", patience=1,
    ...                      max_batch=100, max_doublings=5)
    >>> d = decide(s, initial_state(s), 1000.0)   # asks for 512, the bound allows 64
    >>> d.state.batch_size, d.reason
    (64, 'B_simple 1000 >= 2 x 32 in 1 reading(s): batch 32 -> 64, lr x 1')
    """
    batch = state.batch_size
    value = low if settings.use_low else noise_scale
    if value is None or not math.isfinite(value) or value <= 0:
        return Decision(dataclasses.replace(state, pending=()), False, "no finite reading")
    grow = value >= settings.factor * batch
    shrink = settings.shrink and value <= batch / settings.factor
    if not (grow or shrink):
        return Decision(dataclasses.replace(state, pending=()), False, "within the band")
    same_way = not state.pending or (state.pending[0] >= batch) == grow
    pending = (*state.pending, value) if same_way else (value,)
    if len(pending) < settings.patience:
        why = f"{len(pending)} of {settings.patience} readings call for a change"
        return Decision(dataclasses.replace(state, pending=pending), False, why)
    noise = min(pending) if grow else max(pending)
    new = _target(settings, batch, noise)
    if new == batch:
        why = f"at the bound ({settings.limit if grow else settings.floor})"
        return Decision(dataclasses.replace(state, pending=()), False, why)
    scale = lr_scale(settings, new, noise)
    sign = ">=" if grow else "<="
    threshold = f"{settings.factor:g} x {batch}" if grow else f"{batch} / {settings.factor:g}"
    reason = (
        f"B_simple {noise:.4g} {sign} {threshold} in {len(pending)} reading(s): batch {batch} -> "
        f"{new}, lr x {scale / state.lr_scale:.4g}"
    )
    return Decision(AdaptiveState(new, scale, (), state.changes + 1), True, reason)


def micro_batches(batch_size: int, max_micro: int | None) -> tuple[int, int]:
    """(micro-batch size, count) for gradient accumulation: the fewest equal micro-batches of at
    most ``max_micro`` examples that make up ``batch_size`` (``None``: one pass).

    >>> micro_batches(512, 200), micro_batches(96, None), micro_batches(7, 2)
    ((128, 4), (96, 1), (1, 7))
    """
    b = int(check_number("batch_size", batch_size, low=1, integer=True))
    if max_micro is None or b <= max_micro:
        return b, 1
    m = int(check_number("max_micro", max_micro, low=1, integer=True))
    count = next(c for c in range(math.ceil(b / m), b + 1) if b % c == 0)
    return b // count, count
