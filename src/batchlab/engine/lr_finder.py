"""LR range test (Smith 2017, "Cyclical Learning Rates for Training Neural Networks").

``lr_range_test`` ramps the learning rate exponentially from ``start_lr`` to ``end_lr`` over
``steps`` optimizer updates, records the training loss after each update, stops when the loss
diverges and then puts the model, the optimizer, the gradients, the train/eval modes and torch's
global RNG back exactly as they were, so a test never leaks into the training that follows. The
numbers (curve, suggestions from ``batchlab.core.range_test``) come back in a result object;
drawing is an optional method. ``lr_find`` runs the test for a task over seeds and batch sizes and
fits how the suggested LR scales with the batch size.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from batchlab.core.fit import PowerLawFit
from batchlab.core.range_test import (
    SUGGESTIONS,
    Consensus,
    consensus,
    divergence_index,
    fit_lr_exponent,
    smooth_before_divergence,
    suggest_lrs,
)
from batchlab.core.rules import check_number
from batchlab.engine import optim
from batchlab.engine.data import BatchStream, resolve_device
from batchlab.engine.spec import MAX_LR, OPTIMIZERS, SpecError
from batchlab.engine.tasks import Task, get_task

log = logging.getLogger(__name__)

LossFn = Callable[[Tensor, Tensor], Tensor]
Batches = tuple[Tensor, Tensor] | Iterable[tuple[Tensor, Tensor]]


@dataclass
class LRRangeResult:
    """One range-test curve and what it suggests.

    ``losses[i]`` is the training loss measured on a fresh batch right after the update made with
    ``lrs[i]``. When the loss diverged, the test stopped a few points after ``divergence_lr``, where
    the final climb began (``core.range_test.divergence_point``); ``smoothed`` is NaN from there on.
    ``suggestions`` maps each name of
    ``batchlab.core.range_test.SUGGESTIONS`` to an LR or ``None`` (unreadable); ``method`` picks
    ``suggested_lr``.
    """

    lrs: np.ndarray
    losses: np.ndarray
    smoothed: np.ndarray
    suggestions: dict[str, float | None]
    divergence_lr: float | None
    initial_loss: float
    batch_size: int
    seed: int
    method: str = "valley"

    @property
    def suggested_lr(self) -> float | None:
        """The suggestion named by ``method`` (``None`` when the curve does not give it)."""
        return self.suggestions[self.method]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict: the curve as lists, the suggestions and the chosen one."""
        return {
            "batch_size": self.batch_size,
            "seed": self.seed,
            "method": self.method,
            "suggested_lr": self.suggested_lr,
            "divergence_lr": self.divergence_lr,
            "suggestions": dict(self.suggestions),
            "initial_loss": self.initial_loss,
            "lrs": self.lrs.tolist(),
            "losses": self.losses.tolist(),
            "smoothed": self.smoothed.tolist(),
        }

    def plot(self, ax: Any = None, *, label: str | None = None, color: str | None = None) -> Any:
        """Draw the raw and smoothed curve and the chosen suggestion on ``ax`` (a new one if
        ``None``); returns the axes. Computes nothing new."""
        if ax is None:
            import matplotlib.pyplot as plt

            _, ax = plt.subplots(figsize=(6, 4))
        (line,) = ax.plot(
            self.lrs, self.smoothed, label=label or f"B={self.batch_size}", color=color
        )
        ax.plot(self.lrs, self.losses, color=line.get_color(), alpha=0.25, linewidth=0.8)
        if self.suggested_lr is not None:
            ax.axvline(self.suggested_lr, color=line.get_color(), linestyle="--", linewidth=0.8)
        ax.set_xscale("log")
        ax.set_xlabel("learning rate")
        ax.set_ylabel("training loss")
        top = float(np.nanmax(self.smoothed, initial=self.initial_loss))
        if top > 0:  # keep the blow-up from squashing the curve
            ax.set_ylim(top=1.1 * top)
        return ax


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise SpecError("model", "has no trainable parameters (nothing for the test to update)")
    return params


def _build_optimizer(
    optimizer: str | torch.optim.Optimizer,
    params: list[nn.Parameter],
    lr: float,
    options: Mapping[str, Any],
) -> tuple[torch.optim.Optimizer, bool]:
    """(optimizer, owned): a new one from a name, or the caller's (whose state must be restored)."""
    if isinstance(optimizer, torch.optim.Optimizer):
        if options:
            raise SpecError("optimizer", "options only go with an optimizer name, not an instance")
        return optimizer, False
    if optimizer not in optim.REGISTRY:
        raise SpecError(
            "optimizer",
            f"must be one of {', '.join(OPTIMIZERS)} or a torch optimizer, got {optimizer!r}",
        )
    return optim.build(optimizer, params, lr, **options), True


def _batch_iterator(
    data: Batches, batch_size: int, seed: int, device: torch.device
) -> Iterator[tuple[Tensor, Tensor]]:
    """Endless seeded batches from an (x, y) pair; an iterable restarts when it runs out (a
    one-shot iterator just ends)."""
    if (
        isinstance(data, tuple | list)
        and len(data) == 2
        and all(isinstance(t, Tensor) for t in data)
    ):
        x, y = data
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise SpecError(
                "data", f"x and y need the same number (> 0) of rows, got {len(x)}, {len(y)}"
            )
        if not isinstance(batch_size, int) or batch_size < 1:
            raise SpecError("batch_size", f"must be an integer >= 1, got {batch_size!r}")
        stream = BatchStream(int(x.shape[0]), seed, x.device)
        while True:
            idx = stream.next(batch_size)
            yield x[idx].to(device, non_blocking=True), y[idx].to(device, non_blocking=True)
    one_shot = iter(data) is data
    while True:
        empty = True
        for batch in data:
            empty = False
            try:
                xb, yb = batch
            except (TypeError, ValueError) as exc:
                raise SpecError("data", "batches must be (x, y) pairs of tensors") from exc
            yield xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
        if empty and not one_shot:
            raise SpecError("data", "the iterable of batches is empty")
        if one_shot:
            return


def check_ramp(start_lr: float, end_lr: float, steps: int) -> np.ndarray:
    """The ramp's learning rates, or ``SpecError``: both ends finite, ``0 < start < end <= MAX_LR``."""
    check_number("start_lr", start_lr, low=0.0, low_open=True, high=MAX_LR, error=SpecError)
    check_number("end_lr", end_lr, low=start_lr, low_open=True, high=MAX_LR, error=SpecError)
    if not isinstance(steps, int) or steps < 2:
        raise SpecError("steps", f"must be an integer >= 2, got {steps!r}")
    return start_lr * (end_lr / start_lr) ** (np.arange(steps) / (steps - 1))


def lr_range_test(
    model: nn.Module,
    loss_fn: LossFn,
    data: Batches,
    *,
    optimizer: str | torch.optim.Optimizer = "sgd",
    batch_size: int = 128,
    start_lr: float = 1e-6,
    end_lr: float = 10.0,
    steps: int = 100,
    seed: int = 0,
    method: str = "valley",
    diverge_factor: float = 4.0,
    bandwidth: float | None = None,
    **optimizer_options: Any,
) -> LRRangeResult:
    """Run an exponential LR ramp on ``model`` and return the curve and its suggestions.

    ``data`` is an ``(x, y)`` pair of tensors, sampled in batches of ``batch_size`` with seeded
    per-epoch permutations (``seed``), or an iterable of ``(x, y)`` batches (then ``batch_size`` is
    whatever it yields). ``optimizer`` is a name (``sgd``, ``adam``, ``adamw``; extra keyword
    arguments such as ``momentum=0.9`` go to its constructor) or an existing optimizer over the
    model's parameters. The test stops when ``core.range_test.divergence_index`` fires
    (``diverge_factor``); afterwards model, optimizer, gradients, modes and RNG are as before.
    """
    params = _trainable(model)
    lrs = check_ramp(start_lr, end_lr, steps)
    if method not in SUGGESTIONS:
        raise SpecError("method", f"must be one of {', '.join(SUGGESTIONS)}, got {method!r}")
    if not diverge_factor > 1:
        raise SpecError("diverge_factor", f"must be > 1, got {diverge_factor!r}")
    device = params[0].device
    opt, owned = _build_optimizer(optimizer, params, float(lrs[0]), optimizer_options)
    ratios = optim.lr_ratios(opt)  # groups of a caller's optimizer keep their lr ratios
    batches = _batch_iterator(data, batch_size, seed, device)

    saved_model = {k: v.detach().clone() for k, v in model.state_dict().items()}
    saved_opt = None if owned else copy.deepcopy(opt.state_dict())
    saved_grads = [None if p.grad is None else p.grad.detach().clone() for p in params]
    saved_modes = [(m, m.training) for m in model.modules()]
    on_cpu = device.type == "cpu"
    losses: list[float] = []
    try:
        with torch.random.fork_rng(
            devices=[] if on_cpu else [device.index or 0],
            device_type="cuda" if on_cpu else device.type,
        ):
            model.train()
            first = next(batches, None)
            if first is None:
                raise SpecError("data", "gave no batches")
            xb, yb = first
            loss = loss_fn(model(xb), yb)
            initial = float(loss.detach())
            if not math.isfinite(initial):
                raise SpecError("model", f"the loss is not finite before the test ({initial})")
            size = int(xb.shape[0])
            for lr in lrs:
                optim.set_lr(opt, float(lr), ratios)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                batch = next(batches, None)
                if batch is None:
                    log.info("data ran out after %d of %d steps", len(losses), steps)
                    break
                loss = loss_fn(model(batch[0]), batch[1])
                losses.append(float(loss.detach()))
                if divergence_index(losses, factor=diverge_factor) is not None:
                    log.info("loss diverged at lr %.3g (step %d)", lr, len(losses))
                    break
    finally:
        model.load_state_dict(saved_model)
        if saved_opt is not None:
            opt.load_state_dict(saved_opt)
        for p, g in zip(params, saved_grads, strict=True):
            p.grad = g
        for module, mode in saved_modes:
            module.training = mode
    lrs_run = lrs[: len(losses)]
    loss_arr = np.asarray(losses, dtype=float)
    if loss_arr.size == 0:
        raise SpecError("data", "gave no batch after the first one (need at least two batches)")
    smoothed, cut = smooth_before_divergence(
        lrs_run, loss_arr, bandwidth=bandwidth, factor=diverge_factor
    )
    return LRRangeResult(
        lrs=lrs_run,
        losses=loss_arr,
        smoothed=smoothed,
        suggestions=suggest_lrs(lrs_run, loss_arr, bandwidth=bandwidth, factor=diverge_factor),
        divergence_lr=None if cut is None else float(lrs_run[cut]),
        initial_loss=initial,
        batch_size=size,
        seed=seed,
        method=method,
    )


@dataclass
class BatchSizeLR:
    """Range tests at one batch size over several seeds, combined per suggestion.

    ``consensus`` combines each seed's ``suggested_lr``; ``suggestions`` each named suggestion.
    """

    batch_size: int
    consensus: Consensus
    suggestions: dict[str, Consensus]
    results: list[LRRangeResult]

    def to_dict(self, *, curves: bool = False) -> dict[str, Any]:
        """JSON-ready summary (per-seed curves only when ``curves``)."""
        return {
            "batch_size": self.batch_size,
            "suggested_lr": self.consensus.lr,
            "spread": self.consensus.spread,
            "low": self.consensus.low,
            "high": self.consensus.high,
            "n": self.consensus.n,
            "suggestions": {k: c.lr for k, c in self.suggestions.items()},
            "seeds": [
                r.to_dict()
                if curves
                else {
                    "seed": r.seed,
                    "suggested_lr": r.suggested_lr,
                    "divergence_lr": r.divergence_lr,
                    "steps": int(r.lrs.size),
                }
                for r in self.results
            ],
        }


@dataclass
class LRFindResult:
    """``lr_find`` output: one ``BatchSizeLR`` per batch size and the fitted LR-vs-B exponent."""

    task: str
    method: str
    per_batch_size: list[BatchSizeLR]
    exponent: PowerLawFit | None
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self, *, curves: bool = False) -> dict[str, Any]:
        """JSON-ready summary (``curves`` adds every seed's full curve)."""
        fit = self.exponent
        return {
            "task": self.task,
            "method": self.method,
            "settings": dict(self.settings),
            "batch_sizes": [b.to_dict(curves=curves) for b in self.per_batch_size],
            "exponent": None
            if fit is None
            else {
                "exponent": fit.exponent,
                "prefactor": fit.prefactor,
                "r_squared": fit.r_squared,
            },
        }

    def plot(self, ax: Any = None) -> Any:
        """All curves on one axes, one colour per batch size; returns the axes."""
        for k, entry in enumerate(self.per_batch_size):
            for i, result in enumerate(entry.results):
                label = f"B={entry.batch_size}" if i == 0 else "_nolegend_"
                ax = result.plot(ax, label=label, color=f"C{k % 10}")
        if ax is not None:
            ax.legend()
        return ax


def lr_find(
    task: str | Task,
    *,
    batch_sizes: Sequence[int],
    seeds: int | Sequence[int] = 3,
    task_options: Mapping[str, Any] | None = None,
    optimizer: str = "sgd",
    start_lr: float = 1e-6,
    end_lr: float = 10.0,
    steps: int = 100,
    method: str = "valley",
    device: str | torch.device | None = None,
    progress: Callable[[int, int], None] | None = None,
    **optimizer_options: Any,
) -> LRFindResult:
    """Range tests of a task at each batch size and seed (model and batch order seeded alike),
    their consensus per batch size and the power law ``suggested_lr ~ B**exponent``.

    ``seeds`` is a count (seeds 0..n-1) or explicit seeds; ``progress(done, total)`` is called
    after each test.
    """
    check_ramp(start_lr, end_lr, steps)  # before the task is built
    if isinstance(task, str):
        task = get_task(task, **dict(task_options or {}))
    elif task_options:
        raise SpecError("task_options", "only go with a task name, not a Task")
    seed_list = list(range(seeds)) if isinstance(seeds, int) else [int(s) for s in seeds]
    if not seed_list:
        raise SpecError("seeds", "need at least one seed")
    sizes = [int(b) for b in batch_sizes]
    if not sizes or any(b < 1 for b in sizes):
        raise SpecError("batch_sizes", f"need one or more integers >= 1, got {list(batch_sizes)}")
    dev = resolve_device(device)
    task = task.to(dev)
    total, done = len(sizes) * len(seed_list), 0
    entries = []
    for b in sizes:
        results = []
        for seed in seed_list:
            model = task.make_model(seed).to(dev)
            results.append(
                lr_range_test(
                    model,
                    task.loss_fn,
                    (task.x_train, task.y_train),
                    optimizer=optimizer,
                    batch_size=b,
                    start_lr=start_lr,
                    end_lr=end_lr,
                    steps=steps,
                    seed=seed,
                    method=method,
                    **optimizer_options,
                )
            )
            done += 1
            if progress is not None:
                progress(done, total)
        entries.append(
            BatchSizeLR(
                batch_size=b,
                consensus=consensus([r.suggested_lr for r in results]),
                suggestions={
                    k: consensus([r.suggestions[k] for r in results]) for k in SUGGESTIONS
                },
                results=results,
            )
        )
    fit = fit_lr_exponent(sizes, [e.consensus.lr for e in entries])
    settings = {
        "optimizer": optimizer,
        "start_lr": start_lr,
        "end_lr": end_lr,
        "steps": steps,
        "seeds": seed_list,
        **optimizer_options,
    }
    return LRFindResult(task.name, method, entries, fit, settings)
