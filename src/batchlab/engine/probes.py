"""Gradient noise scale monitor that drops into any PyTorch training loop.

``GradientNoiseScale`` measures ``B_simple = tr(Sigma) / |G|^2`` (McCandlish et al. 2018) from gradient
norms at two batch sizes and feeds them to the estimators of :mod:`batchlab.core.noise`. Four modes:

- ``accumulation``: the micro-batch gradients of gradient accumulation, read by gradient hooks on the
  parameters as each backward delivers them (no extra compute, no copy). Only the micro-batches'
  ``backward()`` may run between :meth:`after_backward` calls: a ``torch.autograd.grad`` with respect
  to the parameters reaches the hooks too.
- ``distributed``: each rank's local gradient before the all-reduce (no extra compute; one all-reduce
  of 32 numbers every 16 steps, so estimates lag by up to 16 steps until :meth:`sync`). A
  ``DistributedDataParallel`` model gets a comm hook that reads the local buckets and then averages
  exactly as DDP does; a hand-written loop calls :meth:`after_backward` before its own all-reduce of
  the (averaged) gradients.
- ``split``: for loops that have neither, :meth:`forward_backward` runs ``n_micro`` forward and
  backward passes on slices of the batch (sizes may differ by one: the estimator weights them
  exactly), read by the same hooks; it costs what smaller batches cost on the hardware.
- ``per_example``: per-example gradient norms from one ordinary backward for models built of
  ``nn.Linear``, ``nn.Conv1d`` and ``nn.Conv2d`` (Goodfellow 2015: ``|g_i|^2`` from each layer's input
  and output gradient, with the Gram form of Li et al. 2022 for sequences). Models with other
  parameterised layers, shared weights or inputs whose first dimension is not the batch fall back to
  ``split``; the monitor logs why and keeps it in ``fallback``.

``precondition=adam_optimizer`` measures the noise scale of the Adam-preconditioned gradient
``g / (sqrt(v_hat) + eps)`` with ``v_hat`` read from the optimizer's state (measurements wait for its
first step). The monitor never changes the update: after :meth:`forward_backward`, ``p.grad`` holds the
plain mean-batch gradient, and the other modes only read gradients.

Measurements stay on the device and are folded into the estimate only when :meth:`estimate` is called
(or every 64 steps), so monitoring adds no host synchronisation per step. The estimate is the ratio of
the sums over the last ``window`` measured steps (:class:`batchlab.core.noise.NoiseWindow`), or over
all of them with ``window=None`` for weights that do not move. Layers that mix
examples (batch norm) are refused by ``split`` and ``per_example``: their gradient is not a sum of
per-example ones. Examples are assumed drawn independently (:mod:`batchlab.core.noise`). A measurement with a
non-finite gradient, a batch of one or a single micro-batch is skipped and counted in ``skipped``.

Example, ``per_example`` (``split`` is the same call)::

    >>> import torch
    >>> from torch import nn
    >>> from batchlab.engine.probes import GradientNoiseScale
    >>> _ = torch.manual_seed(0)
    >>> x, y = torch.randn(2048, 10), torch.randint(0, 3, (2048,))
    >>> model = nn.Sequential(nn.Linear(10, 32), nn.ReLU(), nn.Linear(32, 3))
    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> gns = GradientNoiseScale(model, "per_example", loss_fn=nn.functional.cross_entropy)
    >>> for step in range(30):
    ...     idx = torch.randint(0, 2048, (64,))
    ...     opt.zero_grad()
    ...     loss = gns.forward_backward(x[idx], y[idx])  # was: loss_fn(model(x), y).backward()
    ...     opt.step()
    >>> est = gns.estimate()  # over the last 16 measured steps
    >>> gns.count, est.count, est.low <= est.value <= est.high
    (30, 16, True)

``accumulation`` (scale each micro-batch loss by its share of the batch, as usual)::

    >>> gns = GradientNoiseScale(model, "accumulation")
    >>> for step in range(10):
    ...     idx = torch.randint(0, 2048, (256,))
    ...     opt.zero_grad()
    ...     for xm, ym in zip(x[idx].split(64), y[idx].split(64)):
    ...         (nn.functional.cross_entropy(model(xm), ym) * len(xm) / 256).backward()
    ...         gns.after_backward(len(xm))
    ...     gns.before_step()
    ...     opt.step()
    >>> gns.estimate().count
    10

``distributed`` is called like ``accumulation`` on every rank, with the rank's local batch size:
``model = DDP(net); gns = GradientNoiseScale(model, "distributed")``, then per step ``loss.backward();
gns.after_backward(len(x_local)); gns.before_step(); opt.step()``, and ``gns.sync()`` on every rank
before a final ``gns.estimate()``. Every rank gets the same estimate.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from batchlab.core.noise import (
    DEFAULT_WINDOW,
    NoiseEstimate,
    NoiseWindow,
    effective_batches,
    two_batch_estimate,
    without_replacement,
)
from batchlab.engine.spec import SpecError

log = logging.getLogger(__name__)

MODES = ("accumulation", "distributed", "split", "per_example")
_FLUSH_EVERY = 64  # pending device-side measurements folded in at most this far apart
_REDUCE_EVERY = 16  # distributed: steps of local norms shared in one all-reduce
_MATERIALIZE_ELEMENTS = 2**24  # per-example weight gradients materialised at most this many at once

Grads = Sequence[Tensor | None]
Scales = dict[Tensor, Tensor] | None  # parameter -> 1 / (sqrt(v_hat) + eps)


def _sq(grad: Tensor, scale: Tensor | None) -> Tensor:
    """Squared norm of ``grad`` (times ``scale`` entrywise) as a device scalar: a dot product,
    faster than ``vector_norm`` on CPU and at least as accurate."""
    flat = _wide(grad).reshape(-1)
    if scale is not None:
        flat = flat * scale.reshape(-1)
    return torch.dot(flat, flat)


def _sq_norms(grads: Grads, params: Sequence[Tensor], scales: Scales) -> list[Tensor]:
    """Squared norm of each gradient (times its Adam scales), ``None`` ones left out."""
    return [
        _sq(g, None if scales is None else scales[p])
        for g, p in zip(grads, params, strict=True)
        if g is not None
    ]


def _sq_norm(grads: Grads, params: Sequence[Tensor], scales: Scales) -> Tensor:
    """Sum of squared entries of ``grads`` (times the Adam scales), as a device scalar."""
    return torch.stack(_sq_norms(grads, params, scales)).sum()


def _wide(t: Tensor) -> Tensor:
    """``t`` in float32 or wider (half-precision gradients are summed in float32)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


Resolve = Callable[..., tuple[float, float, float, float]]


@dataclass
class _Pending:
    """One step's measurement, still on the device: ``resolve`` turns the host copies of ``tensors``
    (``tolist()``) into ``(small_sq_norm, big_sq_norm, small_batch, big_batch)``."""

    tensors: tuple[Tensor, ...]
    resolve: Resolve


def _micro_batch_resolver(
    counts: list[int], sizes: list[int], batches: tuple[float, float]
) -> Resolve:
    """Host side of a micro-batch measurement: per-parameter squared norms of each micro-batch
    (``counts`` of them each), then of the accumulated gradient."""
    bounds, sizes = list(itertools.accumulate(counts, initial=0)), tuple(sizes)
    batch = sum(sizes)

    def resolve(sq: list[float]) -> tuple[float, float, float, float]:
        micro = [
            math.fsum(sq[a:b]) * (batch / size) ** 2
            for (a, b), size in zip(itertools.pairwise(bounds), sizes, strict=True)
        ]
        return math.fsum(micro) / len(micro), math.fsum(sq[bounds[-1] :]), *batches

    return resolve


@dataclass
class _Call:
    """One forward call of a hooked layer: its input and, after backward, its output gradient."""

    inp: Tensor | None
    grad_out: Tensor | None = None


def _supported(module: nn.Module) -> bool:
    """Layers whose per-example gradient norms the hooks compute exactly (exact types only)."""
    if type(module) is nn.Linear:
        return True
    return (
        type(module) in (nn.Conv1d, nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    )


def _unsupported(model: nn.Module) -> list[str]:
    """Why per-example norms of ``model`` cannot be computed (empty when they can)."""
    reasons, owners = [], Counter[int]()
    for name, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and not _supported(module):
            reasons.append(f"{name or 'model'} ({type(module).__name__})")
        owners.update(id(p) for p in own)
    if any(n > 1 for n in owners.values()):
        reasons.append("weights shared between layers")
    return reasons


def _as_sequence(module: nn.Module, call: _Call) -> tuple[Tensor, Tensor]:
    """Input and output gradient of one call as ``(B, T, in)`` and ``(B, T, out)`` float tensors."""
    a, d = _wide(call.inp), _wide(call.grad_out)
    if isinstance(module, nn.Linear):
        return a.reshape(a.shape[0], -1, a.shape[-1]), d.reshape(d.shape[0], -1, d.shape[-1])
    if isinstance(module, nn.Conv1d):  # as a (1, k) Conv2d on a height-1 image
        a, d = a.unsqueeze(2), d.unsqueeze(2)
        kernel, dilation = (1, *module.kernel_size), (1, *module.dilation)
        padding, stride = (0, *module.padding), (1, *module.stride)
    else:
        kernel, dilation, padding, stride = (
            module.kernel_size,
            module.dilation,
            module.padding,
            module.stride,
        )
    cols = F.unfold(a, kernel, dilation=dilation, padding=padding, stride=stride)
    return cols.transpose(1, 2), d.flatten(2).transpose(1, 2)


def _row_norms(t: Tensor) -> Tensor:
    """Norm of each example's slice of ``t`` (no squared copy of ``t``)."""
    return torch.linalg.vector_norm(t.flatten(1), dim=1)


def _weight_sq(a: Tensor, d: Tensor, scale: Tensor | None) -> Tensor:
    """``|sum_t d_t a_t^T|^2`` (times ``scale^2`` entrywise) for each example: shape ``(B,)``."""
    t, width_in = a.shape[1:]
    width_out = d.shape[2]
    if t == 1 and scale is None:
        return (_row_norms(a) * _row_norms(d)).square()
    if t == 1:
        return (d[:, 0].pow(2) @ scale.pow(2) * a[:, 0].pow(2)).sum(1)
    if scale is None and t * (width_in + width_out) <= width_in * width_out:  # Gram form
        return ((a @ a.transpose(1, 2)) * (d @ d.transpose(1, 2))).sum((1, 2))
    chunk = max(1, _MATERIALIZE_ELEMENTS // (width_in * width_out))
    out = []
    for a_c, d_c in zip(a.split(chunk), d.split(chunk), strict=True):
        g = d_c.transpose(1, 2) @ a_c  # (chunk, out, in) per-example weight gradients
        out.append((g if scale is None else g * scale).pow(2).sum((1, 2)))
    return torch.cat(out)


class _PerExampleHooks:
    """Forward hooks on every parameterised layer that record inputs and output gradients."""

    def __init__(self, model: nn.Module) -> None:
        self.modules = [
            m for m in model.modules() if any(p.requires_grad for p in m.parameters(False))
        ]
        self.calls: dict[nn.Module, list[_Call]] = {}
        self.active = False
        self.checked = False
        self.handles = [m.register_forward_hook(self._forward) for m in self.modules]

    def _forward(self, module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
        if not self.active or not output.requires_grad:
            return
        call = _Call(inputs[0].detach() if inputs else None)  # None: called with keywords
        self.calls.setdefault(module, []).append(call)

        def keep(grad: Tensor) -> None:
            call.grad_out = grad.detach()

        output.register_hook(keep)

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def sq_norms(self, batch: int, grads: dict[Tensor, Tensor], scales: Scales) -> Tensor | str:
        """``|h_i|^2`` per example, ``h_i`` its share of the batch gradient; a reason on failure."""
        parts = []
        for module in self.modules:
            calls = self.calls.get(module, [])
            weight, bias = module.weight, module.bias
            if weight not in grads and (bias is None or bias not in grads):
                continue
            if not calls or any(
                c.inp is None
                or c.grad_out is None
                or c.inp.shape[0] != batch
                or c.grad_out.shape[0] != batch
                for c in calls
            ):
                return f"a {type(module).__name__} input does not have the batch as dimension 0"
            pairs = [_as_sequence(module, c) for c in calls]
            a, d = (
                pairs[0] if len(pairs) == 1 else (torch.cat(z, 1) for z in zip(*pairs, strict=True))
            )
            if not self.checked and weight in grads:  # once: do the shares add up to the gradient?
                grad = _wide(grads[weight])
                summed = torch.einsum("bto,bti->oi", d, a).reshape(weight.shape)
                if torch.linalg.vector_norm(summed - grad) > 1e-2 * torch.linalg.vector_norm(grad):
                    return "a layer's weight also enters the loss outside its forward"
            if weight in grads:
                w_scale = None if scales is None else scales[weight].reshape(d.shape[2], -1)
                parts.append(_weight_sq(a, d, w_scale))
            if bias is not None and bias in grads:
                b_grad = d.sum(1) if scales is None else d.sum(1) * scales[bias]
                parts.append(_row_norms(b_grad).square())
        if not parts:
            return "no gradient reached a Linear or conv layer"
        self.checked = True
        return torch.stack(parts).sum(0)


@dataclass
class _StepState:
    """What the current optimizer step has gathered so far."""

    norms: list[Tensor] = field(default_factory=list)  # per-parameter squared norms from the hooks
    micro_counts: list[int] = field(default_factory=list)  # how many of them each micro-batch gave
    micro_sizes: list[int] = field(default_factory=list)
    local_sq: list[Tensor] = field(default_factory=list)
    local_batch: int = 0
    scales: Scales = None
    scales_read: bool = False


class GradientNoiseScale:
    """Measure the gradient noise scale of ``model`` inside an ordinary training loop.

    Args:
        model: the model (for ``distributed`` with DDP, the DDP-wrapped model).
        mode: ``"accumulation"``, ``"distributed"``, ``"split"`` or ``"per_example"``.
        loss_fn: ``loss_fn(model(x), y)`` -> mean loss; needed by ``split`` and ``per_example``.
        n_micro: micro-batches per batch in ``split`` (and the ``per_example`` fallback).
        window: measured steps an estimate averages (``None``: all, for weights that do not move).
        population: the number of examples batches are drawn from without replacement (an epoch's
            permutation of the training set); ``None``: drawn i.i.d.
        every: measure every ``every``-th step (other steps run plain).
        precondition: a ``torch.optim.Adam`` / ``AdamW`` whose second moments precondition gradients.
        confidence: coverage of the interval returned by :meth:`estimate`.
        process_group: the group of ``distributed`` (default: the world).
    """

    def __init__(
        self,
        model: nn.Module,
        mode: str = "split",
        *,
        loss_fn: Callable[[Tensor, Tensor], Tensor] | None = None,
        n_micro: int = 4,
        window: int | None = DEFAULT_WINDOW,
        population: int | None = None,
        every: int = 1,
        precondition: torch.optim.Optimizer | None = None,
        confidence: float = 0.95,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        if mode not in MODES:
            raise SpecError("mode", f"must be one of {', '.join(MODES)}, got {mode!r}")
        if n_micro < 2:
            raise SpecError("n_micro", f"must be >= 2, got {n_micro}")
        if every < 1:
            raise SpecError("every", f"must be >= 1, got {every}")
        if not 0 < confidence < 1:
            raise SpecError("confidence", f"must be in (0, 1), got {confidence}")
        try:
            self._window = NoiseWindow(window)
        except ValueError as exc:
            raise SpecError("window", str(exc).split(": ", 1)[1]) from None
        if population is not None and population < 2:
            raise SpecError("population", f"must be >= 2 examples, got {population}")
        self.population = population
        ddp = isinstance(model, DistributedDataParallel)
        net = model.module if ddp else model
        self.model, self.mode, self.loss_fn = model, mode, loss_fn
        self.n_micro, self.every, self.confidence = n_micro, every, confidence
        self.params = [p for p in net.parameters() if p.requires_grad]
        if not self.params:
            raise SpecError("model", "has no trainable parameters")
        self.precondition = precondition
        if precondition is not None:
            self._check_adam(precondition)
        self.fallback: str | None = None
        self.skipped: Counter[str] = Counter()
        self._step = 0
        self._pending: list[_Pending] = []
        self._state = _StepState()
        self._hooks: _PerExampleHooks | None = None
        self._grad_hooks = []
        self._resolvers: dict[tuple[tuple[int, ...], tuple[int, ...]], Resolve] = {}
        # distributed: (this rank's [|g_r|^2, 1/b_r], |g|^2) of steps not yet all-reduced
        self._unreduced: list[tuple[Tensor, Tensor]] = []
        self._group = process_group
        self._ddp = ddp and mode == "distributed"
        if mode in ("split", "per_example"):
            self._check_forward_backward(net, ddp)
        if mode == "per_example":
            self._start_per_example(net)
        if mode == "accumulation" and ddp:
            raise SpecError("mode", "a DDP model averages every backward; use 'distributed'")
        if mode in ("accumulation", "split"):  # a per_example fall-back starts them itself
            self._watch_grads()
        if mode == "distributed":
            if not (dist.is_available() and dist.is_initialized()):
                raise SpecError("mode", "distributed needs torch.distributed initialised")
            if dist.get_world_size(process_group) < 2:
                raise SpecError("mode", "distributed needs at least 2 ranks")
            if self._ddp:
                model.register_comm_hook(process_group, self._comm_hook)

    # ----- set-up checks -----

    def _check_adam(self, opt: torch.optim.Optimizer) -> None:
        if not isinstance(opt, torch.optim.Adam | torch.optim.AdamW):
            raise SpecError("precondition", f"must be torch.optim.Adam or AdamW, got {type(opt)}")
        held = {p for group in opt.param_groups for p in group["params"]}
        if any(p not in held for p in self.params):
            raise SpecError("precondition", "the optimizer must hold every trainable parameter")

    def _check_forward_backward(self, net: nn.Module, ddp: bool) -> None:
        if self.loss_fn is None:
            raise SpecError("loss_fn", f"mode {self.mode!r} needs loss_fn(model(x), y)")
        if ddp:
            raise SpecError("mode", f"{self.mode} cannot run under DDP; use mode='distributed'")
        norms = [
            type(m).__name__
            for m in net.modules()
            if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        if norms:
            raise SpecError(
                "mode",
                f"{self.mode} needs examples that do not interact, but the model has {norms[0]}; "
                "use 'accumulation' or 'distributed'",
            )

    def _start_per_example(self, net: nn.Module) -> None:
        reasons = _unsupported(net)
        if reasons:
            self._fall_back("cannot compute per-example gradients of " + ", ".join(reasons))
        else:
            self._hooks = _PerExampleHooks(net)

    def _fall_back(self, reason: str) -> None:
        log.warning(
            "per_example: %s; measuring with split (%d micro-batches)", reason, self.n_micro
        )
        self.mode, self.fallback = "split", reason
        self.remove()
        self._watch_grads()

    def _watch_grads(self) -> None:
        self._grad_hooks = [p.register_hook(self._grad_hook(p)) for p in self.params]

    # ----- bookkeeping -----

    def _skip(self, reason: str) -> None:
        if not self.skipped[reason]:
            log.warning("noise scale: skipped a measurement: %s", reason)
        self.skipped[reason] += 1

    def _due(self) -> bool:
        return self._step % self.every == 0

    def _scales(self) -> tuple[bool, Scales]:
        """Adam scales for this step, read once: ``(False, None)`` (and a skip) before Adam's first step."""
        state = self._state
        if not state.scales_read:
            state.scales_read = True
            state.scales = None if self.precondition is None else self._adam_scales()
            if self.precondition is not None and state.scales is None:
                self._skip(
                    "precondition: the optimizer has no second moments before its first step"
                )
        return self.precondition is None or state.scales is not None, state.scales

    def _adam_scales(self) -> Scales:
        """``1 / (sqrt(v_hat) + eps)`` per monitored parameter, as Adam divides by, and 0 where Adam
        has never seen a gradient (``v = 0``); ``None`` while a parameter has no second moment yet.

        Adam never divides a gradient by ``eps`` alone (``v`` takes the gradient in first), but
        ``1/eps`` on an entry only rare examples reach would make one example's gradient, scaled
        1e8, the whole measurement: ``B_simple = N - 1`` whatever the data."""
        groups = {p: group for group in self.precondition.param_groups for p in group["params"]}
        out = {}
        for p in self.params:
            group, st = groups[p], self.precondition.state.get(p, {})
            v = st.get("max_exp_avg_sq" if group.get("amsgrad") else "exp_avg_sq")
            if v is None:
                return None
            v_hat = _wide(v) / (1 - group["betas"][1] ** float(st["step"]))
            out[p] = torch.where(v_hat > 0, 1.0 / (v_hat.sqrt() + group["eps"]), 0.0)
        return out

    def _record(self, item: _Pending) -> None:
        self._pending.append(item)
        if len(self._pending) >= _FLUSH_EVERY:
            self._flush()

    def _end_step(self) -> None:
        self._state = _StepState()
        self._step += 1

    def _grads(self) -> list[Tensor | None]:
        return [p.grad for p in self.params]

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        for item in pending:
            small, big, *batches = item.resolve(*(t.double().tolist() for t in item.tensors))
            if not (math.isfinite(small) and math.isfinite(big)):
                self._skip("non-finite gradient")
                continue
            if self.population is not None:
                batches = [without_replacement(b, self.population) for b in batches]
            self._window = self._window.update(*two_batch_estimate(small, big, *batches))

    # ----- the calls a training loop makes -----

    def forward_backward(self, x: Tensor, y: Tensor) -> Tensor:
        """Forward and backward of ``loss_fn(model(x), y)`` on the batch, measuring on the way.

        Adds the plain mean-batch gradient to ``p.grad`` (as ``loss.backward()`` would) and returns the
        batch's mean loss, detached. Modes ``split`` and ``per_example``.
        """
        if self.mode not in ("split", "per_example"):
            raise SpecError(
                "mode", f"forward_backward is for split and per_example, not {self.mode}"
            )
        batch = x.shape[0]
        if y.shape[0] != batch:
            raise SpecError("y", f"must have the batch size of x ({batch}), got {y.shape[0]}")
        if self._due() and batch < 2:
            self._skip("a batch of 1 has no gradient noise to measure")
        if not (self._due() and batch >= 2 and self._scales()[0]):
            loss = self.loss_fn(self.model(x), y)
            loss.backward()
        elif self.mode == "per_example":
            loss = self._per_example_pass(x, y)
        else:
            loss = self._split_pass(x, y)
        self._end_step()
        return loss.detach()

    @contextmanager
    def _own_grads(self) -> Iterator[None]:
        """Run backward passes on empty ``p.grad`` (so they hold this batch's gradient alone), then
        add back what was there before, as ``backward()`` would have."""
        saved = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        try:
            yield
        finally:
            for p, old in zip(self.params, saved, strict=True):
                if old is not None:
                    p.grad = old if p.grad is None else old.add_(p.grad)

    def _split_pass(self, x: Tensor, y: Tensor) -> Tensor:
        """``n_micro`` backward passes of ``share * micro-batch loss``, read by the gradient hooks."""
        batch = x.shape[0]
        k = min(self.n_micro, batch)
        sizes = [batch // k + (i < batch % k) for i in range(k)]
        loss = torch.zeros((), device=x.device)
        self._state.norms = []  # nothing from backward passes outside this call
        with self._own_grads():
            for xm, ym in zip(x.split(sizes), y.split(sizes), strict=True):
                part = self.loss_fn(self.model(xm), ym) * (xm.shape[0] / batch)
                part.backward()
                self._end_micro_batch(xm.shape[0])
                loss = loss + part.detach()
            self._record_micro_batches()
        return loss

    def _per_example_pass(self, x: Tensor, y: Tensor) -> Tensor:
        hooks, batch, scales = self._hooks, x.shape[0], self._state.scales
        hooks.calls.clear()
        with self._own_grads():
            hooks.active = True
            try:
                loss = self.loss_fn(self.model(x), y)
                loss.backward()
            finally:
                hooks.active = False
            grads = {p: p.grad for p in self.params if p.grad is not None}
            shares = hooks.sq_norms(batch, grads, scales)
            hooks.calls.clear()
            if isinstance(shares, str):
                self._skip("per_example fell back to split")
                self._fall_back(shares)
            else:  # example i's own gradient is batch * its share of the mean-batch gradient
                big = _sq_norm(self._grads(), self.params, scales)
                values = torch.stack([shares.mean() * batch**2, big])
                self._record(_Pending((values,), lambda v: (v[0], v[1], 1.0, float(batch))))
        return loss

    def after_backward(self, batch_size: int) -> None:
        """Call after each (micro-)batch's ``backward()`` with its number of examples.

        ``accumulation``: closes this micro-batch's gradient. ``distributed``: the rank's local
        batch; in a loop without DDP, call it before all-reducing the gradients.
        """
        if self.mode not in ("accumulation", "distributed"):
            raise SpecError(
                "mode", f"after_backward is for accumulation and distributed, not {self.mode}"
            )
        if batch_size < 1:
            raise SpecError("batch_size", f"must be >= 1, got {batch_size}")
        state = self._state
        if self.mode == "accumulation":
            self._end_micro_batch(batch_size)
            return
        state.local_batch += batch_size
        if not self._ddp and self._due():
            ok, scales = self._scales()
            if ok:
                state.local_sq = [_sq_norm(self._grads(), self.params, scales)]

    def _end_micro_batch(self, batch_size: int) -> None:
        """Close a micro-batch: the norms the gradient hooks read since the last one are its own."""
        state = self._state
        if not (self._due() and self._scales()[0]):
            return
        count = len(state.norms) - sum(state.micro_counts)
        if count == 0:
            raise SpecError("after_backward", "no gradient arrived: call it after each backward()")
        state.micro_counts.append(count)
        state.micro_sizes.append(batch_size)

    def _grad_hook(self, param: Tensor) -> Callable[[Tensor], None]:
        """Tensor hook (accumulation, split): the squared norm of the gradient a backward delivers."""

        def hook(grad: Tensor) -> None:
            if self._due():
                ok, scales = self._scales()
                if ok:
                    self._state.norms.append(_sq(grad, None if scales is None else scales[param]))

        return hook

    def _record_micro_batches(self) -> None:
        """One measurement from this step's micro-batch norms and the accumulated ``p.grad``."""
        state = self._state
        if len(state.micro_sizes) < 2:
            self._skip("accumulation needs at least 2 micro-batches per step")
            return
        norms = torch.stack(state.norms + _sq_norms(self._grads(), self.params, state.scales))
        key = (tuple(state.micro_sizes), tuple(state.micro_counts))
        if key not in self._resolvers:  # the same cut every step: build its resolver once
            batches = effective_batches(state.micro_sizes)
            self._resolvers[key] = _micro_batch_resolver(
                state.micro_counts, state.micro_sizes, batches
            )
        self._record(_Pending((norms,), self._resolvers[key]))

    def before_step(self) -> None:
        """Call once per optimizer step, before ``optimizer.step()`` (``accumulation``,
        ``distributed``): reads the gradient the optimizer will apply. Collective in ``distributed``."""
        if self.mode not in ("accumulation", "distributed"):
            raise SpecError(
                "mode", f"before_step is for accumulation and distributed, not {self.mode}"
            )
        if self._due() and self._scales()[0]:
            if self.mode == "distributed":
                self._record_distributed(self._state)
            else:
                self._record_micro_batches()
        self._end_step()

    def _record_distributed(self, state: _StepState) -> None:
        if state.local_batch < 1:
            raise SpecError("batch_size", "call after_backward(local_batch_size) after backward()")
        if not state.local_sq:
            raise SpecError(
                "mode", "no local gradient was read: call after_backward before all-reduce"
            )
        local = torch.stack(state.local_sq).sum().double()
        big = _sq_norm(self._grads(), self.params, state.scales)
        self._unreduced.append(
            (torch.stack([local, torch.ones_like(local) / state.local_batch]), big)
        )
        if len(self._unreduced) >= _REDUCE_EVERY:
            self.sync()

    def sync(self) -> None:
        """``distributed``: share the local norms not yet shared, in one all-reduce (a collective:
        every rank calls it). :meth:`before_step` does this every 16 measured steps; call it before a
        final :meth:`estimate`. Other modes: nothing to do."""
        if not self._unreduced:
            return
        rows = torch.stack([local for local, _ in self._unreduced])
        dist.all_reduce(rows, group=self._group)
        for row, (_, big) in zip(rows, self._unreduced, strict=True):
            self._record(_Pending((row, big), self._resolve_ranks))
        self._unreduced = []

    def _resolve_ranks(self, reduced: list[float], big: float) -> tuple[float, ...]:
        """Host side of a distributed measurement: ranks averaged with weights ``1/n``."""
        world = dist.get_world_size(self._group)
        sum_sq, sum_inv = reduced
        return sum_sq / world, big, world / sum_inv, world**2 / sum_inv

    def _comm_hook(self, group, bucket):  # unannotated: DDP rejects string annotations
        """DDP comm hook: the rank's local squared norm of this bucket (a ``dist.GradBucket``), then
        DDP's own averaging; returns the all-reduce's future."""
        from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

        if self._due():
            ok, scales = self._scales()
            if ok and scales is None:
                self._state.local_sq.append(_sq(bucket.buffer(), None))
            elif ok:
                self._state.local_sq.append(
                    _sq_norm(bucket.gradients(), bucket.parameters(), scales)
                )
        return allreduce_hook(group, bucket)

    # ----- results -----

    def estimate(self, confidence: float | None = None) -> NoiseEstimate | None:
        """The noise scale over the window with its interval and the mean ``grad_sq`` /
        ``trace_cov`` behind it; ``None`` before two measurements."""
        self._flush()
        return self._window.estimate(self.confidence if confidence is None else confidence)

    @property
    def count(self) -> int:
        """Measurements folded into the estimate."""
        self._flush()
        return self._window.count

    def reset(self) -> None:
        """Forget past measurements (e.g. after the learning rate changes a lot); every rank in
        ``distributed``."""
        self._pending.clear()
        self._unreduced.clear()
        self._window = NoiseWindow(self._window.window)

    def remove(self) -> None:
        """Remove the ``accumulation`` and ``per_example`` hooks (a DDP comm hook cannot be removed)."""
        for handle in self._grad_hooks:
            handle.remove()
        self._grad_hooks = []
        if self._hooks is not None:
            self._hooks.remove()
            self._hooks = None
