"""The optimizers a run can name, each declared once: its ``torch.optim`` builder and its update for
a vectorized ensemble.

``OPTIMIZERS`` (the names, in ``batchlab.core.rules`` because core needs them without torch) and
``REGISTRY`` hold the same names in the same order (a test checks it). A solo run uses the torch
optimizer (``from_spec``), the LR range test builds one from a name and keyword options (``build``),
and an ensemble steps all members' parameters at once with ``VectorizedOptimizer``, whose updates
match ``torch.optim.SGD`` (momentum, Nesterov, L2 decay), ``Adam`` (L2) and ``AdamW`` (decoupled
decay) update for update, with per-member hyper-parameters.

Learning rates are set per parameter group with ``set_lr``: each group keeps its ratio to the
largest group's lr when the optimizer was built (``lr_ratios``), as timm keeps each group's own base
lr, so a schedule moves the largest lr and the other groups follow in proportion.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from batchlab.core.rules import OPTIMIZERS
from batchlab.engine.spec import RunSpec, SpecError

HYPER_FIELDS = ("momentum", "weight_decay", "beta1", "beta2", "eps")
"""RunSpec fields the vectorized updates read, one value per member."""


class VectorizedOptimizer:
    """One optimizer over a (members, P) parameter buffer, with one row of hyper-parameters per
    member; ``step`` updates every row in a handful of tensor ops, ``keep`` drops rows."""

    def __init__(self, specs: Sequence[RunSpec], flat: Tensor) -> None:
        spec = specs[0]
        self.entry = REGISTRY[spec.optimizer]
        self.nesterov = spec.nesterov
        self.decay = any(s.weight_decay for s in specs)
        self.hyper = {
            name: torch.tensor([float(getattr(s, name)) for s in specs], device=flat.device)[
                :, None
            ]
            for name in HYPER_FIELDS
        }
        self.s1, self.s2 = torch.zeros_like(flat), torch.zeros_like(flat)
        self.t = 0

    @torch.no_grad()
    def step(self, p: Tensor, g: Tensor, lr: Tensor) -> None:
        """Update ``p`` (members, P) in place from gradients ``g`` and learning rates ``lr``
        (members, 1)."""
        self.t += 1
        self.entry.update(self, p, g, lr)

    def keep(self, rows: list[int]) -> None:
        """Keep only the state and hyper-parameters of ``rows`` (the members still training)."""
        self.s1, self.s2 = self.s1[rows], self.s2[rows]
        self.hyper = {k: v[rows] for k, v in self.hyper.items()}


def _sgd_update(o: VectorizedOptimizer, p: Tensor, g: Tensor, lr: Tensor) -> None:
    h = o.hyper
    if o.decay:
        g = g + h["weight_decay"] * p
    o.s1.mul_(h["momentum"]).add_(g)  # momentum buffer (zero-initialised: same as torch)
    p.sub_(lr * (g + h["momentum"] * o.s1 if o.nesterov else o.s1))


def _adam_update(decoupled: bool) -> Callable[[VectorizedOptimizer, Tensor, Tensor, Tensor], None]:
    def update(o: VectorizedOptimizer, p: Tensor, g: Tensor, lr: Tensor) -> None:
        h = o.hyper
        if decoupled:
            p.mul_(1 - lr * h["weight_decay"])
        elif o.decay:
            g = g + h["weight_decay"] * p
        b1, b2 = h["beta1"], h["beta2"]
        o.s1.lerp_(g, 1 - b1)
        o.s2.mul_(b2).addcmul_(g, g * (1 - b2))
        denom = (o.s2.sqrt() / torch.sqrt(1 - b2**o.t)).add_(h["eps"])
        p.sub_(lr / (1 - b1**o.t) * o.s1 / denom)

    return update


def _sgd_options(spec: RunSpec) -> dict[str, Any]:
    return {"momentum": spec.momentum, "nesterov": spec.nesterov}


def _adam_options(spec: RunSpec) -> dict[str, Any]:
    return {"betas": (spec.beta1, spec.beta2), "eps": spec.eps}


@dataclass(frozen=True)
class OptimizerEntry:
    """What one optimizer name means: the torch class, its constructor options from a spec, the
    vectorized update, and whether it preconditions the gradient (Adam-type: ``adaptive``)."""

    cls: type[torch.optim.Optimizer]
    spec_options: Callable[[RunSpec], dict[str, Any]]
    update: Callable[[VectorizedOptimizer, Tensor, Tensor, Tensor], None]
    adaptive: bool


REGISTRY: dict[str, OptimizerEntry] = {
    "sgd": OptimizerEntry(torch.optim.SGD, _sgd_options, _sgd_update, adaptive=False),
    "adam": OptimizerEntry(torch.optim.Adam, _adam_options, _adam_update(False), adaptive=True),
    "adamw": OptimizerEntry(torch.optim.AdamW, _adam_options, _adam_update(True), adaptive=True),
}


def build(name: str, params: Any, lr: float, **options: Any) -> torch.optim.Optimizer:
    """``torch.optim`` optimizer ``name`` over ``params`` with keyword ``options``; an unknown name
    or a bad option is a ``SpecError`` naming ``optimizer``."""
    if name not in REGISTRY:
        raise SpecError("optimizer", f"must be one of {', '.join(OPTIMIZERS)}, got {name!r}")
    try:
        return REGISTRY[name].cls(params, lr=lr, **options)
    except (TypeError, ValueError) as exc:
        raise SpecError("optimizer", f"bad option for {name}: {exc}") from exc


def from_spec(spec: RunSpec, params: Any) -> torch.optim.Optimizer:
    """The spec's ``torch.optim`` optimizer, fused where torch has a fused kernel for the device.

    The fused kernels compute the same update (measured: 1e-7 relative after 100 steps) about 10%
    faster per step for small models on a CPU, where the optimizer's per-tensor overhead counts.
    """
    entry = REGISTRY[spec.optimizer]
    kw = {**entry.spec_options(spec), "lr": spec.lr, "weight_decay": spec.weight_decay}
    try:
        return entry.cls(params, fused=True, **kw)
    except (RuntimeError, ValueError):  # no fused kernel for this device or dtype
        return entry.cls(params, **kw)


def ratios_to_largest(lrs: Sequence[float]) -> list[float]:
    """Each lr over the largest one (all 1.0 when they are equal, or all 0).

    >>> ratios_to_largest([0.4, 0.1]), ratios_to_largest([0.0, 0.0])
    ([1.0, 0.25], [1.0, 1.0])
    """
    top = max((float(lr) for lr in lrs), default=0.0)
    return [float(lr) / top if top > 0 else 1.0 for lr in lrs]


def lr_ratios(optimizer: torch.optim.Optimizer) -> list[float]:
    """Each parameter group's lr over the largest group's lr, as the optimizer holds them now."""
    return ratios_to_largest([group["lr"] for group in optimizer.param_groups])


def set_lr(optimizer: torch.optim.Optimizer, lr: float, ratios: Sequence[float]) -> None:
    """Set each parameter group's lr to ``lr`` times its ratio (from ``lr_ratios``)."""
    for group, ratio in zip(optimizer.param_groups, ratios, strict=True):
        group["lr"] = lr * ratio
