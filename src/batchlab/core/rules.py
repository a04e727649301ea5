"""Learning-rate scaling rules: from (B0, lr0) that trains well to the hyper-parameters for B1.

Each rule is a pure function of the base batch size ``base_batch`` (B0), its learning rate ``base_lr``
(lr0) and the new batch size ``batch_size`` (B1), with k = B1 / B0:

- ``linear``: lr x k with a gradual warmup (Goyal et al. 2017, "Accurate, Large Minibatch SGD",
  arXiv:1706.02677); LEGW stretches the warmup epochs by k (You et al. 2019, "Large-Batch Training
  for LSTM and Beyond", arXiv:1901.08256).
- ``sqrt``: lr x sqrt(k) (Krizhevsky 2014, arXiv:1404.5997; Hoffer et al. 2017, "Train longer,
  generalize better", arXiv:1705.08741).
- ``adam_sqrt``: lr x sqrt(k), 1 - beta -> k (1 - beta), eps / sqrt(k) (Malladi et al. 2022, "On the
  SDEs and Scaling Rules for Adaptive Gradient Algorithms", arXiv:2205.10287).
- ``critical``: lr(B) = lr_max / (1 + B_noise / B) from a measured noise scale (McCandlish et al.
  2018, "An Empirical Model of Large-Batch Training", arXiv:1812.06162); lr(B1) / lr(B0) is the
  AdaScale gain (Johnson et al. 2020, arXiv:2007.05105).
- ``surge``: lr(B) = lr_max / (0.5 (sqrt(B_noise / B) + sqrt(B / B_noise))) for Adam, peaking at
  B = B_noise (Li et al. 2024, "Surge Phenomenon in Optimal Learning Rate and Batch Size Scaling",
  arXiv:2405.14578).
- ``auto``: picks one of the above by optimizer and by whether a noise scale is known.

Every rule that raises the lr adds Goyal's gradual warmup: ``warmup_epochs`` (default 5) at the new
batch size, ramping linearly from the old lr to the new one (0 switches it off).

Plus the SGD noise temperature g = lr N / (B (1 - m)) of Smith et al. 2018 ("Don't Decay the Learning
Rate, Increase the Batch Size", arXiv:1711.00489) and ``advise``, which turns all of it into the
numbers of one training job. Bad input raises ``ValueError("field: what is allowed, got ...")``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from batchlab.errors import FieldError

OPTIMIZERS = ("sgd", "adam", "adamw")
ADAM_OPTIMIZERS = ("adam", "adamw")
RULES = ("auto", "linear", "sqrt", "adam_sqrt", "critical", "surge")

SOURCES = {
    "linear": "Goyal et al. 2017, arXiv:1706.02677",
    "legw": "You et al. 2019, arXiv:1901.08256",
    "sqrt": "Krizhevsky 2014, arXiv:1404.5997; Hoffer et al. 2017, arXiv:1705.08741",
    "adam_sqrt": "Malladi et al. 2022, arXiv:2205.10287",
    "critical": "McCandlish et al. 2018, arXiv:1812.06162",
    "adascale": "Johnson et al. 2020, arXiv:2007.05105",
    "surge": "Li et al. 2024, arXiv:2405.14578",
    "temperature": "Smith et al. 2018, arXiv:1711.00489",
}

# Adam's defaults (Kingma & Ba 2015), the base values the Adam rules scale.
ADAM_DEFAULTS = {"beta1": 0.9, "beta2": 0.999, "eps": 1e-8}
# Gradual warmup whenever a rule raises the lr: 5 epochs (Goyal et al. 2017), from the old lr up.
DEFAULT_WARMUP_EPOCHS = 5.0
# Goyal et al. 2017 Table 2a / Sec. 5: linear scaling with warmup matched the baseline up to 8k on
# ImageNet and broke down beyond it.
GOYAL_MAX_BATCH = 8192
MAX_BATCH_SIZE = 10**12
"""Largest batch size any command accepts: a trillion examples, far above what a machine holds."""
# A warmup longer than this share of the run gets a warning (Goyal et al. 2017: 5 of 90 epochs).
WARMUP_SHARE = 0.25


def check_number(
    field: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
    error: type[FieldError] = FieldError,
) -> float:
    """Return ``value`` as a float if it is a finite number in the interval, else raise ``error``
    (a ``FieldError`` subclass: the engine passes ``SpecError``). The one check of every float.

    >>> check_number("lr", 0.1, low=0.0, low_open=True)
    0.1
    >>> check_number("momentum", 1.0, low=0.0, high=1.0, high_open=True)
    Traceback (most recent call last):
    ...
    batchlab.errors.FieldError: momentum: must be a number in [0, 1), got 1.0
    """
    kind = "an integer" if integer else "a number"
    if low is not None and high is not None:
        allowed = (
            f"{kind} in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
        )
    elif low is not None:
        allowed = f"{kind} {'>' if low_open else '>='} {low:g}"
    else:
        allowed = f"a finite {kind[2:] if kind.startswith('a ') else kind}"
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (not integer or float(value).is_integer())
    ok = ok and (low is None or (value > low if low_open else value >= low))
    ok = ok and (high is None or (value < high if high_open else value <= high))
    if not ok:
        raise error(field, f"must be {allowed}, got {value!r}")
    return float(value)


def _check_batch(field: str, value: Any) -> int:
    return int(check_number(field, value, low=1, high=MAX_BATCH_SIZE, integer=True))


def _check_lr(field: str, value: Any) -> float:
    return check_number(field, value, low=0.0, low_open=True)


def _check_beta(field: str, value: Any) -> float:
    return check_number(field, value, low=0.0, high=1.0, high_open=True)


@dataclass(frozen=True)
class RuleResult:
    """New hyper-parameters for ``batch_size`` from one rule, with the paper and the reasoning.

    ``warmup_epochs`` is the warmup at the new batch size; following Goyal et al. 2017 it ramps the
    learning rate from ``warmup_start_factor * lr`` (= the old ``base_lr``) up to ``lr``, and is 0
    when the learning rate does not grow. Adam rules fill ``beta1``, ``beta2`` and ``eps``; SGD rules
    leave them ``None``. Rules built on a noise scale give the fitted peak ``lr_max``.
    """

    rule: str
    lr: float
    base_lr: float
    base_batch: int
    batch_size: int
    reason: str
    source: str
    warmup_epochs: float = 0.0
    warmup_start_factor: float = 1.0
    beta1: float | None = None
    beta2: float | None = None
    eps: float | None = None
    noise_scale: float | None = None
    lr_max: float | None = None
    warmup_source: str = SOURCES["linear"]
    warnings: tuple[str, ...] = ()

    @property
    def k(self) -> float:
        """Batch-size ratio B1 / B0."""
        return self.batch_size / self.base_batch

    @property
    def lr_ratio(self) -> float:
        """lr(B1) / lr(B0)."""
        return self.lr / self.base_lr


def _checked(base_batch: int, base_lr: float, batch_size: int) -> tuple[int, float, int, float]:
    b0 = _check_batch("base_batch", base_batch)
    b1 = _check_batch("batch_size", batch_size)
    return b0, _check_lr("base_lr", base_lr), b1, b1 / b0


def _warmup(base_lr: float, lr: float, warmup_epochs: float) -> dict[str, Any]:
    """Goyal-style warmup fields: ramp from the old lr to the new one, none if lr does not grow."""
    warmup_epochs = check_number("warmup_epochs", warmup_epochs, low=0.0)
    if lr <= base_lr or warmup_epochs == 0:
        return {"warmup_epochs": 0.0, "warmup_start_factor": 1.0}
    return {"warmup_epochs": warmup_epochs, "warmup_start_factor": base_lr / lr}


def _result(
    rule: str,
    lr: float,
    base_lr: float,
    base_batch: int,
    batch_size: int,
    reason: str,
    warmup_epochs: float,
    **fields: Any,
) -> RuleResult:
    """``rule``'s result, citing its paper, with Goyal's warmup from ``base_lr`` up to ``lr``."""
    warm = _warmup(base_lr, lr, warmup_epochs)
    return RuleResult(
        rule, lr, base_lr, base_batch, batch_size, reason, SOURCES[rule], **fields, **warm
    )


def _scaled(
    rule: str,
    base_batch: int,
    base_lr: float,
    batch_size: int,
    exponent: float,
    warmup_epochs: float,
    legw: bool,
) -> RuleResult:
    """lr x k**exponent with Goyal's gradual warmup, stretched by k under LEGW."""
    b0, lr0, b1, k = _checked(base_batch, base_lr, batch_size)
    lr = lr0 * k**exponent
    epochs = check_number("warmup_epochs", warmup_epochs, low=0.0) * (k if legw else 1.0)
    how = "lr x k" if exponent == 1 else "lr x sqrt(k)"
    reason = f"{how} with k = {k:g}" + (", warmup epochs x k (LEGW)" if legw else "")
    legw_source = {"warmup_source": SOURCES["legw"]} if legw else {}
    return _result(rule, lr, lr0, b0, b1, reason, epochs, **legw_source)


def linear(
    base_batch: int,
    base_lr: float,
    batch_size: int,
    *,
    warmup_epochs: float = DEFAULT_WARMUP_EPOCHS,
    legw: bool = False,
) -> RuleResult:
    """Linear scaling lr x k with Goyal's gradual warmup (``legw=True``: warmup epochs x k).

    >>> r = linear(256, 0.1, 8192)
    >>> round(r.lr, 6), r.warmup_epochs, r.warmup_start_factor
    (3.2, 5.0, 0.03125)
    """
    return _scaled("linear", base_batch, base_lr, batch_size, 1.0, warmup_epochs, legw)


def sqrt(
    base_batch: int,
    base_lr: float,
    batch_size: int,
    *,
    warmup_epochs: float = DEFAULT_WARMUP_EPOCHS,
    legw: bool = False,
) -> RuleResult:
    """Square-root scaling lr x sqrt(k) (Krizhevsky 2014; Hoffer et al. 2017; LEGW with ``legw``).

    >>> sqrt(128, 0.1, 512).lr
    0.2
    """
    return _scaled("sqrt", base_batch, base_lr, batch_size, 0.5, warmup_epochs, legw)


def adam_sqrt(
    base_batch: int,
    base_lr: float,
    batch_size: int,
    *,
    beta1: float = ADAM_DEFAULTS["beta1"],
    beta2: float = ADAM_DEFAULTS["beta2"],
    eps: float = ADAM_DEFAULTS["eps"],
    warmup_epochs: float = DEFAULT_WARMUP_EPOCHS,
) -> RuleResult:
    """Malladi et al. 2022 square-root rule for Adam: lr x sqrt(k), 1-beta x k, eps / sqrt(k).

    The SDE argument needs k (1 - beta) <= 1 for both betas; beyond that it raises ValueError.

    >>> r = adam_sqrt(256, 1e-3, 1024)
    >>> round(r.lr, 9), round(r.beta1, 9), round(r.beta2, 9), r.eps
    (0.002, 0.6, 0.996, 5e-09)
    """
    b0, lr0, b1, k = _checked(base_batch, base_lr, batch_size)
    betas = {"beta1": _check_beta("beta1", beta1), "beta2": _check_beta("beta2", beta2)}
    for name, beta in betas.items():
        if k * (1.0 - beta) > 1.0:
            raise FieldError(
                "batch_size",
                f"adam_sqrt needs k (1 - {name}) <= 1, but k = {k:g} with {name} = "
                f"{beta:g} gives {name} = {1 - k * (1 - beta):.3g}; the rule holds for k <= "
                f"{1 / (1 - beta):g} ({SOURCES['adam_sqrt']})",
            )
        betas[name] = 1.0 - k * (1.0 - beta)
    lr = lr0 * math.sqrt(k)
    eps_new = check_number("eps", eps, low=0.0, low_open=True) / math.sqrt(k)
    reason = f"lr x sqrt(k), 1 - beta x k, eps / sqrt(k) with k = {k:g}"
    return _result("adam_sqrt", lr, lr0, b0, b1, reason, warmup_epochs, eps=eps_new, **betas)


def adascale_gain(base_batch: int, batch_size: int, noise_scale: float) -> float:
    """AdaScale gain (B_noise/B0 + 1) / (B_noise/B1 + 1): progress per step at B1 relative to B0.

    Johnson et al. 2020 define r = (tr S / B0 + |G|^2) / (tr S / B1 + |G|^2); dividing by |G|^2 gives
    this form with B_noise = tr S / |G|^2 (McCandlish et al. 2018).

    >>> adascale_gain(100, 400, 100.0)
    1.6
    """
    b0 = _check_batch("base_batch", base_batch)
    b1 = _check_batch("batch_size", batch_size)
    bn = check_number("noise_scale", noise_scale, low=0.0, low_open=True)
    return (1.0 + bn / b0) / (1.0 + bn / b1)


def _critical_shape(batch_size: float, noise_scale: float) -> float:
    """lr(B) / lr_max for the critical rule: 1 / (1 + B_noise/B)."""
    return 1.0 / (1.0 + noise_scale / batch_size)


def _surge_shape(batch_size: float, noise_scale: float) -> float:
    """lr(B) / lr_max for the surge rule: 1 / (0.5 (sqrt(B_noise/B) + sqrt(B/B_noise)))."""
    r = math.sqrt(batch_size / noise_scale)
    return 2.0 / (r + 1.0 / r)


def _noise_rule(
    rule: str,
    base_batch: int,
    base_lr: float,
    batch_size: int,
    noise_scale: float | None,
    shape: Callable[[float, float], float],
    reason: str,
    warmup_epochs: float,
    **adam: float,
) -> RuleResult:
    """lr(B) = lr_max * shape(B, B_noise) with lr_max fitted through (B0, lr0)."""
    b0, lr0, b1, _ = _checked(base_batch, base_lr, batch_size)
    if noise_scale is None:
        raise FieldError("noise_scale", f"rule {rule!r} needs a measured gradient noise scale")
    bn = check_number("noise_scale", noise_scale, low=0.0, low_open=True)
    lr = lr0 * (shape(b1, bn) / shape(b0, bn))
    fit = {"noise_scale": bn, "lr_max": lr0 / shape(b0, bn)}
    return _result(rule, lr, lr0, b0, b1, reason.format(bn=bn), warmup_epochs, **fit, **adam)


def critical(
    base_batch: int,
    base_lr: float,
    batch_size: int,
    *,
    noise_scale: float | None,
    warmup_epochs: float = DEFAULT_WARMUP_EPOCHS,
) -> RuleResult:
    """McCandlish et al. 2018: lr(B) = lr_max / (1 + B_noise/B), lr_max fitted through (B0, lr0);
    lr(B1) / lr(B0) is the AdaScale gain.

    >>> r = critical(100, 0.1, 400, noise_scale=100.0)
    >>> round(r.lr, 9), round(r.lr_max, 9)
    (0.16, 0.2)
    """
    return _noise_rule(
        "critical",
        base_batch,
        base_lr,
        batch_size,
        noise_scale,
        _critical_shape,
        "lr(B) = lr_max / (1 + B_noise/B) with B_noise = {bn:g}; lr ratio = AdaScale gain "
        f"({SOURCES['adascale']})",
        warmup_epochs,
    )


def surge(
    base_batch: int,
    base_lr: float,
    batch_size: int,
    *,
    noise_scale: float | None,
    beta1: float = ADAM_DEFAULTS["beta1"],
    beta2: float = ADAM_DEFAULTS["beta2"],
    eps: float = ADAM_DEFAULTS["eps"],
    warmup_epochs: float = DEFAULT_WARMUP_EPOCHS,
) -> RuleResult:
    """Li et al. 2024 for Adam: lr(B) = lr_max / (0.5 (sqrt(B_noise/B) + sqrt(B/B_noise))).

    The optimal lr rises up to B = B_noise and falls after it; betas and eps are kept.

    >>> r = surge(250, 0.8e-3, 1000, noise_scale=1000.0)
    >>> round(r.lr, 12), round(r.lr_max, 12)
    (0.001, 0.001)
    """
    return _noise_rule(
        "surge",
        base_batch,
        base_lr,
        batch_size,
        noise_scale,
        _surge_shape,
        "lr(B) = lr_max / (0.5 (sqrt(B_noise/B) + sqrt(B/B_noise))) with B_noise = {bn:g}, "
        "peak at B = B_noise",
        warmup_epochs,
        beta1=_check_beta("beta1", beta1),
        beta2=_check_beta("beta2", beta2),
        eps=check_number("eps", eps, low=0.0, low_open=True),
    )


# Why ``auto`` picks each rule, printed with its choice.
_AUTO_WHY = {
    "critical": "SGD's best lr saturates at lr_max as B passes the noise scale, which is measured",
    "surge": "Adam's best lr peaks at B = B_noise and falls beyond it, and the noise scale is "
    "measured",
    "linear": "SGD without a noise scale: linear scaling with warmup holds up to the critical "
    "batch (Goyal: 8k on ImageNet)",
    "adam_sqrt": "Adam without a noise scale: the SDE square-root rule for lr, betas and eps",
}


def auto(
    base_batch: int,
    base_lr: float,
    batch_size: int,
    *,
    optimizer: str = "sgd",
    noise_scale: float | None = None,
    **options: Any,
) -> RuleResult:
    """Pick the rule for the optimizer and say why: with a measured noise scale ``critical`` (SGD) or
    ``surge`` (Adam), else ``linear`` (SGD) or ``adam_sqrt`` (Adam). Where adam_sqrt's betas would
    drop below 0 (k > 1 / (1 - beta)) it keeps the betas and scales lr x sqrt(k), with a warning.

    ``options`` may hold any rule's options (``warmup_epochs``, ``legw``, ``beta1``, ...); each rule
    gets those it takes.

    >>> r = auto(256, 0.1, 1024)
    >>> r.rule, round(r.lr, 9)
    ('linear', 0.4)
    >>> auto(256, 1e-3, 1024, optimizer="adam", noise_scale=1024.0).rule
    'surge'
    """
    _check_optimizer(optimizer)
    _check_options("auto", options)
    adam = optimizer in ADAM_OPTIMIZERS
    known = "a measured noise scale" if noise_scale is not None else "no noise scale"
    if noise_scale is not None:
        name = "surge" if adam else "critical"
    else:
        name = "adam_sqrt" if adam else "linear"
    why = f"auto: {optimizer} with {known} -> {name} ({_AUTO_WHY[name]})"
    try:
        result = _call(name, base_batch, base_lr, batch_size, noise_scale, options)
    except FieldError as err:
        if name != "adam_sqrt" or err.field != "batch_size":
            raise
        result = _call("sqrt", base_batch, base_lr, batch_size, None, options)
        note = (
            f"adam_sqrt does not apply at k = {result.k:g}: 1 - k (1 - beta) would be negative; "
            f"lr x sqrt(k) with betas and eps kept instead ({SOURCES['adam_sqrt']})"
        )
        kept = {k: options.get(k, v) for k, v in ADAM_DEFAULTS.items()}
        result = dataclasses.replace(result, **kept, warnings=(note,))
        why += " (not applicable) -> sqrt"
    return dataclasses.replace(result, reason=f"{why}: {result.reason}")


RULE_FUNCTIONS: dict[str, Callable[..., RuleResult]] = {
    "linear": linear,
    "sqrt": sqrt,
    "adam_sqrt": adam_sqrt,
    "critical": critical,
    "surge": surge,
}


def rule_options(rule: str) -> frozenset[str]:
    """Names of the keyword options a rule takes (``auto``: those of every rule)."""
    if rule == "auto":
        return frozenset().union(*(rule_options(name) for name in RULE_FUNCTIONS))
    if rule not in RULE_FUNCTIONS:
        raise FieldError("rule", f"must be one of {', '.join(RULES)}, got {rule!r}")
    params = inspect.signature(RULE_FUNCTIONS[rule]).parameters.values()
    return frozenset(p.name for p in params if p.kind is p.KEYWORD_ONLY) - {"noise_scale"}


def _check_options(rule: str, options: dict[str, Any]) -> None:
    allowed = rule_options(rule)
    for name in options:
        if name not in allowed:
            raise FieldError(
                name, f"not an option of rule {rule!r}; allowed: {', '.join(sorted(allowed))}"
            )


def _check_optimizer(optimizer: str) -> None:
    if optimizer not in OPTIMIZERS:
        raise FieldError("optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")


def _call(
    name: str,
    base_batch: int,
    base_lr: float,
    batch_size: int,
    noise_scale: float | None,
    options: dict[str, Any],
) -> RuleResult:
    """Run one named rule with the options it takes (and the noise scale if it needs one)."""
    kw = {k: v for k, v in options.items() if k in rule_options(name)}
    if name in ("critical", "surge"):
        kw["noise_scale"] = noise_scale
    return RULE_FUNCTIONS[name](base_batch, base_lr, batch_size, **kw)


def apply_rule(
    rule: str,
    *,
    base_batch: int,
    base_lr: float,
    batch_size: int,
    optimizer: str = "sgd",
    noise_scale: float | None = None,
    **options: Any,
) -> RuleResult:
    """Apply a rule by name (one of ``RULES``); ``options`` are that rule's keyword options.

    A rule derived for the other optimizer family, or sqrt scaling with SGD, adds a warning.

    >>> apply_rule("linear", base_batch=256, base_lr=0.1, batch_size=8192).lr
    3.2
    """
    _check_optimizer(optimizer)
    _check_options(rule, options)
    if rule == "auto":
        return auto(
            base_batch, base_lr, batch_size, optimizer=optimizer, noise_scale=noise_scale, **options
        )
    result = _call(rule, base_batch, base_lr, batch_size, noise_scale, options)
    return dataclasses.replace(result, warnings=result.warnings + _fit_warnings(result, optimizer))


def _fit_warnings(result: RuleResult, optimizer: str) -> tuple[str, ...]:
    """Warnings for a rule chosen by hand that does not fit the optimizer."""
    adam = optimizer in ADAM_OPTIMIZERS
    if adam and result.rule in ("linear", "sqrt", "critical"):
        return (
            f"rule {result.rule} was derived for SGD; for {optimizer} use adam_sqrt "
            f"({SOURCES['adam_sqrt']}) or surge ({SOURCES['surge']})",
        )
    if not adam and result.rule in ("adam_sqrt", "surge"):
        return (f"rule {result.rule} was derived for Adam; for sgd use linear or critical",)
    if not adam and result.rule == "sqrt" and result.k > 1:
        return (
            "square-root scaling with SGD did worse than linear scaling at batch 8k on ImageNet "
            f"({SOURCES['linear']}, Table 2a)",
        )
    return ()


def noise_temperature(lr: float, n_train: int, batch_size: int, momentum: float = 0.0) -> float:
    """SGD noise temperature g = lr N / (B (1 - m)) (Smith et al. 2018): equal g, similar training.

    >>> round(noise_temperature(0.1, 50_000, 128, 0.9), 3)
    390.625
    """
    lr = check_number("lr", lr, low=0.0)
    n = check_number("n_train", n_train, low=1, integer=True)
    b = _check_batch("batch_size", batch_size)
    m = check_number("momentum", momentum, low=0.0, high=1.0, high_open=True)
    return lr * n / (b * (1.0 - m))


def momentum_for_temperature(temperature: float, lr: float, n_train: int, batch_size: int) -> float:
    """Momentum m that gives noise temperature g at (lr, B): m = 1 - lr N / (B g) (Smith et al. 2018).

    Raises ValueError when no m in [0, 1) does (g above lr N / B needs momentum; below it, no
    momentum can lower g).

    >>> round(momentum_for_temperature(390.625, 0.1, 50_000, 640), 9)
    0.98
    """
    g = check_number("temperature", temperature, low=0.0, low_open=True)
    m = 1.0 - noise_temperature(lr, n_train, batch_size) / g
    if not 0.0 <= m < 1.0:
        raise FieldError(
            "momentum",
            f"keeping g = {g:g} at lr = {lr:g}, batch size {batch_size} needs momentum "
            f"{m:.4g}, outside [0, 1)",
        )
    return m


def steps_ratio(base_batch: int, batch_size: int, noise_scale: float) -> float:
    """S(B1) / S(B0) from S = S_min (1 + B_noise/B) (McCandlish et al. 2018): the change in steps to
    reach the same loss; it is 1 / ``adascale_gain``.

    >>> steps_ratio(100, 400, 100.0)
    0.625
    """
    return 1.0 / adascale_gain(base_batch, batch_size, noise_scale)


def samples_ratio(base_batch: int, batch_size: int, noise_scale: float) -> float:
    """E(B1) / E(B0) from E = E_min (1 + B/B_noise) (McCandlish et al. 2018): the change in training
    examples to reach the same loss; 1 / this is the data-parallel efficiency.

    >>> samples_ratio(100, 400, 100.0)
    2.5
    """
    return steps_ratio(base_batch, batch_size, noise_scale) * batch_size / base_batch


@dataclass(frozen=True)
class Advice:
    """Everything ``batchlab advise`` reports for moving one job from B0 to B1, each with a source.

    Steps are counted as the engine counts them: whole steps covering ``epochs`` of ``n_train``
    examples (None without ``n_train`` and ``epochs``; warmup steps need ``n_train``). The noise
    temperature fields are for SGD with ``n_train`` (else None); the ratios need a measured noise
    scale (None without one). ``beta2_source`` names the rule that set Adam's beta2.
    """

    result: RuleResult
    requested_rule: str
    optimizer: str
    n_train: int | None
    epochs: float | None
    momentum: float
    warmup_steps: int | None
    total_steps: int | None
    base_total_steps: int | None
    noise_temperature: float | None
    base_noise_temperature: float | None
    momentum_for_same_temperature: float | None
    steps_ratio: float | None
    samples_ratio: float | None
    warnings: tuple[str, ...]
    base_adam: tuple[float, float, float] | None = None
    beta2_source: str | None = None

    @property
    def steps_per_epoch(self) -> float | None:
        """Optimizer steps per epoch at the new batch size, N / B1 (None without N)."""
        return None if self.n_train is None else self.n_train / self.result.batch_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: the fields of ``batchlab advise --json``."""
        r = self.result
        out: dict[str, Any] = {
            "rule": r.rule,
            "requested_rule": self.requested_rule,
            "reason": r.reason,
            "source": r.source,
            "optimizer": self.optimizer,
            "base_batch": r.base_batch,
            "base_lr": r.base_lr,
            "batch_size": r.batch_size,
            "k": r.k,
            "lr": r.lr,
            "lr_ratio": r.lr_ratio,
        }
        if self.base_adam is not None:
            out.update(beta1=r.beta1, beta2=r.beta2, eps=r.eps, beta2_source=self.beta2_source)
            out.update(zip(("base_beta1", "base_beta2", "base_eps"), self.base_adam, strict=True))
        out.update(
            warmup_epochs=r.warmup_epochs,
            warmup_steps=self.warmup_steps,
            warmup_start_lr=r.lr * r.warmup_start_factor,
            n_train=self.n_train,
            epochs=self.epochs,
            steps_per_epoch=self.steps_per_epoch,
            total_steps=self.total_steps,
            base_total_steps=self.base_total_steps,
        )
        if self.optimizer not in ADAM_OPTIMIZERS and self.noise_temperature is not None:
            out.update(
                momentum=self.momentum,
                noise_temperature=self.noise_temperature,
                base_noise_temperature=self.base_noise_temperature,
                momentum_for_same_temperature=self.momentum_for_same_temperature,
            )
        if self.steps_ratio is not None and self.samples_ratio is not None:
            out.update(
                noise_scale=r.noise_scale,
                steps_ratio=self.steps_ratio,
                samples_ratio=self.samples_ratio,
                speedup=1.0 / self.steps_ratio,
                efficiency=1.0 / self.samples_ratio,
                epochs_for_same_loss=None
                if self.epochs is None
                else self.epochs * self.samples_ratio,
            )
        out["warnings"] = list(self.warnings)
        return out


def advise(
    base_batch: int,
    base_lr: float,
    batch_size: int,
    *,
    n_train: int | None = None,
    epochs: float | None = None,
    optimizer: str = "sgd",
    rule: str = "auto",
    momentum: float = 0.0,
    noise_scale: float | None = None,
    beta1: float = ADAM_DEFAULTS["beta1"],
    beta2: float = ADAM_DEFAULTS["beta2"],
    eps: float = ADAM_DEFAULTS["eps"],
    **options: Any,
) -> Advice:
    """New lr (betas, eps), warmup, steps and the expected cost of moving a job from B0 to B1.

    ``options`` go to the rule (``warmup_epochs``, ``legw``). ``n_train`` and ``epochs`` are
    optional: they only add steps, warmup steps and the noise temperature. For Adam, beta2 keeps
    its half-life in examples (``scale_beta2``) unless the rule sets it (adam_sqrt). Warnings flag a
    batch beyond the critical batch size, above N/10 or N, and rules that do not fit the optimizer.

    >>> a = advise(256, 0.1, 8192, n_train=1_281_167, epochs=90)
    >>> round(a.result.lr, 6), a.warmup_steps, a.total_steps
    (3.2, 782, 14076)
    """
    n = None if n_train is None else int(check_number("n_train", n_train, low=1, integer=True))
    if epochs is not None:
        epochs = check_number("epochs", epochs, low=0.0, low_open=True)
    m = check_number("momentum", momentum, low=0.0, high=1.0, high_open=True)
    if noise_scale is not None:
        noise_scale = check_number("noise_scale", noise_scale, low=0.0, low_open=True)
    adam = {
        "beta1": _check_beta("beta1", beta1),
        "beta2": _check_beta("beta2", beta2),
        "eps": check_number("eps", eps, low=0.0, low_open=True),
    }
    if optimizer in ADAM_OPTIMIZERS:
        options.update((k, v) for k, v in adam.items() if k in rule_options(rule))
    result = apply_rule(
        rule,
        base_batch=base_batch,
        base_lr=base_lr,
        batch_size=batch_size,
        optimizer=optimizer,
        noise_scale=noise_scale,
        **options,
    )
    beta2_source = None
    if optimizer in ADAM_OPTIMIZERS:
        result, beta2_source = _adam_betas(result, adam)
    steps = None
    if n is not None and epochs is not None:
        samples = round(epochs * n)
        steps = (math.ceil(samples / result.batch_size), math.ceil(samples / result.base_batch))
    g = g0 = keep = None
    if optimizer not in ADAM_OPTIMIZERS and n is not None:
        g0 = noise_temperature(result.base_lr, n, result.base_batch, m)
        g = noise_temperature(result.lr, n, result.batch_size, m)
        try:
            keep = momentum_for_temperature(g0, result.lr, n, result.batch_size)
        except ValueError:
            keep = None
    ratios = (None, None)
    if noise_scale is not None:
        ratios = (
            steps_ratio(result.base_batch, result.batch_size, noise_scale),
            samples_ratio(result.base_batch, result.batch_size, noise_scale),
        )
    return Advice(
        result=result,
        requested_rule=rule,
        optimizer=optimizer,
        n_train=n,
        epochs=epochs,
        momentum=m,
        warmup_steps=None if n is None else math.ceil(result.warmup_epochs * n / result.batch_size),
        total_steps=None if steps is None else steps[0],
        base_total_steps=None if steps is None else steps[1],
        noise_temperature=g,
        base_noise_temperature=g0,
        momentum_for_same_temperature=keep,
        steps_ratio=ratios[0],
        samples_ratio=ratios[1],
        warnings=result.warnings + _advice_warnings(result, n, epochs, noise_scale),
        base_adam=(beta1, beta2, eps) if optimizer in ADAM_OPTIMIZERS else None,
        beta2_source=beta2_source,
    )


def _adam_betas(result: RuleResult, base: dict[str, float]) -> tuple[RuleResult, str]:
    """Adam's betas and eps for the advice: the rule's own when it scales beta2 (adam_sqrt), else
    the base ones with beta2 at the half-life of Marek et al. 2025; the second item names the rule."""
    if result.rule == "adam_sqrt":
        return result, SOURCES["adam_sqrt"]
    kept = {k: base[k] if getattr(result, k) is None else getattr(result, k) for k in base}
    kept["beta2"] = scale_beta2(result.base_batch, result.batch_size, base["beta2"])
    return dataclasses.replace(result, **kept), SOURCES["beta2_half_life"]


def _advice_warnings(
    result: RuleResult, n_train: int | None, epochs: float | None, noise_scale: float | None
) -> tuple[str, ...]:
    """Warnings about the new batch size itself (not about the rule)."""
    b1, out = result.batch_size, []
    if noise_scale is not None and b1 > noise_scale:
        out.append(
            f"batch size {b1} is beyond the critical batch size (B_noise = {noise_scale:g}): "
            f"diminishing returns: x{result.k:g} the batch cuts the steps to the same loss only "
            f"x{1 / steps_ratio(result.base_batch, b1, noise_scale):.3g} and needs "
            f"x{samples_ratio(result.base_batch, b1, noise_scale):.3g} the samples "
            f"({SOURCES['critical']})"
        )
    if n_train is not None and b1 > n_train:
        out.append(
            f"batch size {b1} is larger than the training set ({n_train}): every step repeats "
            "examples and an epoch is less than one step"
        )
    elif n_train is not None and b1 > n_train / 10:
        out.append(
            f"batch size {b1} is above ~N/10 = {n_train / 10:g}: g = lr N / B no longer holds "
            f"(it needs B << N) and test accuracy fell there ({SOURCES['temperature']})"
        )
    if result.rule == "linear" and b1 > GOYAL_MAX_BATCH and result.k > 1:
        out.append(
            f"linear scaling with warmup matched small-batch accuracy up to batch {GOYAL_MAX_BATCH} "
            f"on ImageNet and broke down beyond it ({SOURCES['linear']})"
        )
    if epochs is not None and result.warmup_epochs > epochs * WARMUP_SHARE:
        out.append(
            f"warmup ({result.warmup_epochs:g} epochs) takes {result.warmup_epochs / epochs:.0%} of "
            f"the {epochs:g}-epoch run (Goyal et al. 2017 used 5 of 90); set warmup_epochs"
        )
    return tuple(out)


# The newer rules (Marek et al. 2025, Meterez et al. 2025, Wang & Aitchison 2024, DeepSeek 2024).

NEWER_SOURCES = {
    "beta2_half_life": "Marek et al. 2025, 'Small Batch Size Training for Language Models', "
    "arXiv:2507.07101",
    "seesaw": "Meterez et al. 2025, 'Seesaw: Accelerating Training by Balancing Learning Rate and "
    "Batch Size Scheduling', arXiv:2510.14717",
    "adamw_timescale": "Wang & Aitchison 2024, 'How to set AdamW's weight decay as you scale model "
    "and dataset size', arXiv:2405.13698",
    "deepseek": "DeepSeek-AI 2024, 'DeepSeek LLM: Scaling Open-Source Language Models with "
    "Longtermism', arXiv:2401.02954, Eq. 1",
}
SOURCES.update(NEWER_SOURCES)

# DeepSeek LLM (2024) Eq. 1, fitted on their data and models (compute C in FLOPs as M x D with M
# the non-embedding FLOPs per token; batch in tokens): valid for that setting, a prior elsewhere.
DEEPSEEK_BATCH = (0.2920, 0.3271)
DEEPSEEK_LR = (0.3118, -0.1250)


def beta2_half_life(beta2: float, batch_size: float) -> float:
    """Half-life of Adam's second-moment EMA in examples (or tokens, with B in tokens):
    B ln(1/2) / ln(beta2) (Marek et al. 2025).

    >>> round(beta2_half_life(0.95, 512))
    6919
    """
    b2 = check_number("beta2", beta2, low=0.0, high=1.0, low_open=True, high_open=True)
    b = check_number("batch_size", batch_size, low=0.0, low_open=True)
    return b * math.log(0.5) / math.log(b2)


def scale_beta2(
    base_batch: float, batch_size: float, beta2: float = ADAM_DEFAULTS["beta2"]
) -> float:
    """Adam beta2 at a new batch size with the half-life held fixed in examples/tokens:
    beta2' = beta2 ** (B'/B) (Marek et al. 2025, "Small Batch Size Training for Language Models").

    >>> round(scale_beta2(512, 1, 0.95), 6)
    0.9999
    """
    b0 = check_number("base_batch", base_batch, low=0.0, low_open=True)
    b1 = check_number("batch_size", batch_size, low=0.0, low_open=True)
    b2 = check_number("beta2", beta2, low=0.0, high=1.0, low_open=True, high_open=True)
    return b2 ** (b1 / b0)


def seesaw_lr(base_batch: float, base_lr: float, batch_size: float) -> float:
    """Seesaw's lr for Adam after a batch ramp from B0 to B: lr0 sqrt(B0 / B), i.e. each doubling
    of the batch multiplies the lr by 1/sqrt(2) (Meterez et al. 2025, arXiv:2510.14717).

    It stands in for a decay of the lr by B0/B: the batch grows where a scheduler would cut the lr.

    >>> round(seesaw_lr(256, 1e-3, 1024), 12)
    0.0005
    """
    b0 = check_number("base_batch", base_batch, low=0.0, low_open=True)
    lr0 = _check_lr("base_lr", base_lr)
    b1 = check_number("batch_size", batch_size, low=0.0, low_open=True)
    return lr0 * math.sqrt(b0 / b1)


def adamw_timescale_epochs(lr: float, weight_decay: float, batch_size: int, n_train: int) -> float:
    """AdamW's EMA timescale in epochs: tau_iter = 1 / (lr lambda) steps, over N / B steps per
    epoch (Wang & Aitchison 2024, "How to set AdamW's weight decay as you scale model and dataset
    size").

    >>> round(adamw_timescale_epochs(1e-3, 0.1, 100, 50_000), 6)
    20.0
    """
    lr = _check_lr("lr", lr)
    wd = check_number("weight_decay", weight_decay, low=0.0, low_open=True)
    b = _check_batch("batch_size", batch_size)
    n = check_number("n_train", n_train, low=1, integer=True)
    return b / (lr * wd * n)


def adamw_weight_decay(lr: float, batch_size: int, n_train: int, timescale_epochs: float) -> float:
    """AdamW weight decay lambda = B / (lr N tau_epoch) that gives an EMA timescale of
    ``timescale_epochs`` (Wang & Aitchison 2024): the rule holds tau_epoch fixed as lr, B or N change.

    >>> round(adamw_weight_decay(1e-3, 100, 50_000, 20.0), 9)
    0.1
    """
    lr = _check_lr("lr", lr)
    b = _check_batch("batch_size", batch_size)
    n = check_number("n_train", n_train, low=1, integer=True)
    tau = check_number("timescale_epochs", timescale_epochs, low=0.0, low_open=True)
    return b / (lr * n * tau)


def scale_weight_decay(
    base_weight_decay: float,
    *,
    base_lr: float,
    lr: float,
    base_batch: int,
    batch_size: int,
    base_n_train: int,
    n_train: int,
) -> float:
    """AdamW weight decay for a new (lr, B, N) with the EMA timescale in epochs held fixed:
    lambda' = lambda (lr B' N) / (lr' B N') (Wang & Aitchison 2024).

    >>> round(scale_weight_decay(0.1, base_lr=1e-3, lr=1e-3, base_batch=100, batch_size=100,
    ...                          base_n_train=50_000, n_train=200_000), 9)
    0.025
    """
    tau = adamw_timescale_epochs(base_lr, base_weight_decay, base_batch, base_n_train)
    return adamw_weight_decay(lr, batch_size, n_train, tau)


@dataclass(frozen=True)
class ComputeOptimal:
    """Batch (in tokens) and lr fitted as power laws of the compute budget, with their source."""

    compute: float
    batch_tokens: float
    lr: float
    source: str
    note: str

    def batch_sequences(self, sequence_length: int) -> float:
        """The batch in sequences of ``sequence_length`` tokens."""
        return self.batch_tokens / _check_batch("sequence_length", sequence_length)


def deepseek_compute_optimal(compute: float) -> ComputeOptimal:
    """DeepSeek LLM's compute-optimal batch and lr for LM pretraining, B_opt = 0.2920 C^0.3271
    tokens and lr_opt = 0.3118 C^-0.1250 (arXiv:2401.02954, Eq. 1; C = non-embedding FLOPs per
    token x tokens). Fitted to their setting (their data, AdamW, multi-step schedule): a prior.

    >>> r = deepseek_compute_optimal(1e20)
    >>> round(r.batch_tokens / 1e6, 3), round(r.lr, 7)
    (1.017, 0.000986)
    """
    c = check_number("compute", compute, low=0.0, low_open=True)
    return ComputeOptimal(
        compute=c,
        batch_tokens=DEEPSEEK_BATCH[0] * c ** DEEPSEEK_BATCH[1],
        lr=DEEPSEEK_LR[0] * c ** DEEPSEEK_LR[1],
        source=SOURCES["deepseek"],
        note="fitted to DeepSeek's setting (their data, AdamW with a multi-step schedule, "
        "small-scale runs extrapolated to 7B and 67B); a starting point elsewhere, not a law",
    )
