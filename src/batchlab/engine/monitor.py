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
- ``per_example``: per-example gradient norms from one ordinary backward (Goodfellow 2015: ``|g_i|^2``
  from each layer's input and output gradient). During the forward a ``TorchFunctionMode`` sees every
  parameter enter through ``F.linear`` (``nn.Linear``, ``nn.MultiheadAttention``'s packed
  in-projection and ``out_proj``), ``torch.addmm`` (Hugging Face's ``Conv1D``), ``F.embedding``
  (index collisions inside an example add up; a lookup without the batch, nanoGPT's ``wpe(pos)``,
  gets its per-example gradient from the sum it is broadcast into), ``F.conv1d/2d``, ``F.layer_norm``
  and ``F.rms_norm`` (weight and bias; Gray et al. 2024). On sequences a weight's per-example squared
  norm comes from the Gram matrices ``sum_{t,t'} (a_t.a_t')(g_t.g_t')`` or from the materialised
  per-example gradient, whichever is cheaper (the ghost norm of Li et al. 2022); a weight used twice
  (an embedding tied to the output head) adds its uses' cross terms. The first measured step checks
  that the shares add up to each parameter's gradient; a model that goes beyond this (another
  parameterised function, a parameter also used elsewhere, a batch not in dimension 0) falls back to
  ``split``: the monitor logs why and keeps it in ``fallback``. :func:`per_example_grad_norms` gives
  the norms themselves.

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
    >>> from batchlab.engine.monitor import GradientNoiseScale
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

``per_example`` on a causal transformer (``nn.TransformerEncoderLayer`` under a causal mask, tied
embedding and head, a position embedding looked up without the batch)::

    >>> class LM(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.tok, self.pos = nn.Embedding(50, 32), nn.Embedding(16, 32)
    ...         layer = nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
    ...         self.blocks = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
    ...         self.head = nn.Linear(32, 50, bias=False)
    ...         self.head.weight = self.tok.weight
    ...     def forward(self, idx):
    ...         x = self.tok(idx) + self.pos(torch.arange(idx.shape[1]))
    ...         mask = nn.Transformer.generate_square_subsequent_mask(idx.shape[1])
    ...         return self.head(self.blocks(x, mask=mask, is_causal=True))
    >>> def lm_loss(logits, y):
    ...     return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())
    >>> lm = LM()
    >>> opt = torch.optim.AdamW(lm.parameters(), lr=1e-3)
    >>> gns = GradientNoiseScale(lm, "per_example", loss_fn=lm_loss)
    >>> seqs = torch.randint(0, 50, (64, 17))
    >>> for step in range(4):
    ...     batch = seqs[16 * (step % 4) : 16 * (step % 4 + 1)]
    ...     opt.zero_grad()
    ...     loss = gns.forward_backward(batch[:, :-1], batch[:, 1:])
    ...     opt.step()
    >>> gns.mode, gns.fallback, gns.count
    ('per_example', None, 4)

Mixed precision: pass the ``GradScaler``; norms are read in unscaled units whether ``before_step``
comes before or after ``scaler.unscale_``, and a step whose scaled gradient is not finite (the step
the scaler skips) is a skipped measurement, counted in ``skipped``. Autocast (fp16, bf16) needs
nothing: wrap the forward as usual::

    >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
    >>> scaler = torch.amp.GradScaler("cpu")
    >>> gns = GradientNoiseScale(model, "accumulation", scaler=scaler)
    >>> for step in range(3):
    ...     idx = torch.randint(0, 2048, (256,))
    ...     opt.zero_grad()
    ...     for xm, ym in zip(x[idx].split(128), y[idx].split(128)):
    ...         with torch.autocast("cpu", torch.bfloat16):
    ...             loss = nn.functional.cross_entropy(model(xm), ym) / 2
    ...         scaler.scale(loss).backward()
    ...         gns.after_backward(len(xm))
    ...     scaler.unscale_(opt)
    ...     _ = nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    ...     gns.before_step()
    ...     scaler.step(opt)
    ...     scaler.update()
    >>> gns.count
    3

Resuming: ``state_dict()`` is plain numbers; a monitor loaded from it continues the same estimate::

    >>> state = gns.state_dict()  # e.g. torch.save({"model": ..., "gns": state}, path)
    >>> gns.remove()
    >>> resumed = GradientNoiseScale(model, "accumulation", scaler=scaler)
    >>> resumed.load_state_dict(state)
    >>> resumed.count
    3

``distributed`` is called like ``accumulation`` on every rank, with the rank's local batch size:
``model = DDP(net); gns = GradientNoiseScale(model, "distributed")``, then per step ``loss.backward();
gns.after_backward(len(x_local)); gns.before_step(); opt.step()``, and ``gns.sync()`` on every rank
before a final ``gns.estimate()``. Every rank gets the same estimate.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import math
import threading
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.amp.grad_scaler import OptState
from torch.nn.parallel import DistributedDataParallel
from torch.overrides import TorchFunctionMode

from batchlab.core import noise as noise_module
from batchlab.core.noise import (
    DEFAULT_WINDOW,
    NoiseEstimate,
    NoiseWindow,
    effective_batches,
    two_batch_estimate,
    without_replacement,
)
from batchlab.engine.spec import SpecError
from batchlab.errors import FieldError

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


class _Slot:
    """Holds the gradient that backward delivers to one forward output."""

    def __init__(self, out: Tensor) -> None:
        self.grad: Tensor | None = None
        out.register_hook(self._keep)

    def _keep(self, grad: Tensor) -> None:
        self.grad = grad.detach()


@dataclass
class _Use:
    """One way a monitored parameter entered the forward, made into per-example shares later.

    ``kind``: ``"matrix"`` (``grad_i = sum_t u_t v_t^T`` over rows ``[row, row + rows)``; ``u`` an
    index tensor for an embedding), ``"linear_t"`` (the same with ``u`` and ``v`` swapped: a Hugging
    Face ``Conv1D``), ``"bias"`` (``sum_t d_t``), ``"norm"`` (``sum_t d_t * xhat_t``).
    """

    kind: str
    param: Tensor
    row: int
    slot: _Slot
    layout: Callable[[Tensor], Tensor]  # (B, ...) tensor of the call -> (B, T, features)
    data: Tensor | None = None  # input (matrix, norm) or indices (embedding)
    extra: dict = field(default_factory=dict)


# Functions whose parameter arguments per_example understands (everything else a parameter goes
# through is caught by the first step's check that the shares add up to the gradient).
_LINEAR, _EMBEDDING = F.linear, F.embedding
_CONVS = {F.conv1d: 1, F.conv2d: 2}
_ADDS = {torch.Tensor.__add__, torch.Tensor.__radd__, torch.Tensor.add, torch.add}


def _arg(args: tuple, kwargs: dict, i: int, name: str, default=None):
    return args[i] if len(args) > i else kwargs.get(name, default)


def _pair(v: int | Sequence[int], n: int) -> tuple[int, ...]:
    return tuple(v) if isinstance(v, Sequence) else (v,) * n


class _Recorder(TorchFunctionMode):
    """Watches one forward (a ``TorchFunctionMode``) for the functions through which monitored
    parameters enter (``F.linear``, ``torch.addmm``, ``F.embedding``, ``F.conv1d/2d``,
    ``F.layer_norm``, ``F.rms_norm``) and keeps what their per-example gradients need: the input and,
    after backward, the output gradient. ``nn.MultiheadAttention`` (its packed in-projection and
    ``out_proj`` go through ``F.linear`` with the sequence first) and Hugging Face's ``Conv1D`` (an
    ``addmm`` of the flattened input) set the layout their calls use."""

    def __init__(self, model: nn.Module, params: Sequence[Tensor]) -> None:
        super().__init__()
        self.names = {  # "blocks.0.ln_1.weight (LayerNorm)": the parameter and its layer
            id(p): f"{prefix}{'.' if prefix else ''}{name} ({type(owner).__name__})"
            for prefix, owner in model.named_modules()
            for name, p in owner.named_parameters(recurse=False)
        }
        self.params = {id(p): p for p in params}
        self.batch = 0
        self.uses: list[_Use] = []
        self.reasons: list[str] = []
        self.lookups: dict[int, _Use] = {}  # id(output) -> embedding lookup without a batch dim
        self.broadcast: dict[
            int, tuple[_Slot, torch.Size]
        ] = {}  # id(_Use) -> add that broadcast it
        self.layouts: list[str] = []
        self.checked = False
        self.handles = []
        for m in model.modules():
            kind = _layout_kind(m)
            if kind is not None:
                self.handles.append(m.register_forward_pre_hook(self._enter(kind)))
                self.handles.append(m.register_forward_hook(self._leave, always_call=True))

    def _enter(self, kind: str) -> Callable[..., None]:
        def hook(module: nn.Module, args: tuple) -> None:
            self.layouts.append(kind)

        return hook

    def _leave(self, module: nn.Module, args: tuple, output: object) -> None:
        if self.layouts:
            self.layouts.pop()

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def clear(self) -> None:
        self.uses, self.reasons, self.layouts = [], [], []
        self.lookups.clear()
        self.broadcast.clear()

    def _param(self, t: Tensor | None, what: str) -> tuple[Tensor, int] | None:
        """The monitored parameter ``t`` is (row offset 0) or a block of rows of; ``None`` if not."""
        if t is None:
            return None
        if id(t) in self.params:
            return self.params[id(t)], 0
        base = t._base
        if base is None or id(base) not in self.params:
            return None
        rows = base.stride(0) if base.dim() else 1
        offset = t.storage_offset() - base.storage_offset()
        if t.stride() != base.stride() or offset % rows or t.shape[1:] != base.shape[1:]:
            self.reasons.append(f"{self.names[id(base)]} enters {what} as a view other than rows")
            return None
        return base, offset // rows

    def _layout(self, t: Tensor, what: str) -> Callable[[Tensor], Tensor] | None:
        """How to bring this call's tensors to ``(B, T, features)``; ``None`` (and a reason) if the
        batch is not where the layout says."""
        batch, kind = self.batch, self.layouts[-1] if self.layouts else "batch_first"
        if kind == "seq_first":  # inside MultiheadAttention: (T, B, E) or (T * B, E)
            ok = (t.dim() == 3 and t.shape[1] == batch) or (
                t.dim() == 2 and t.shape[0] % batch == 0
            )
            if ok:
                return lambda z: z.reshape(-1, batch, z.shape[-1]).transpose(0, 1)
        elif kind == "flat":  # inside Conv1D: (B * T, in)
            if t.dim() == 2 and t.shape[0] % batch == 0:
                return lambda z: z.reshape(batch, -1, z.shape[-1])
        elif t.dim() >= 2 and t.shape[0] == batch:
            return lambda z: z.reshape(batch, -1, z.shape[-1])
        self.reasons.append(
            f"the input of {what} (shape {tuple(t.shape)}) does not have the batch as dimension 0"
        )
        return None

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.multi_head_attention_forward:
            return self._attention(func, args, kwargs)
        out = func(*args, **kwargs)
        if not isinstance(out, Tensor) or not out.requires_grad:
            return out
        if func is _LINEAR:
            self._linear(out, args, kwargs)
        elif func is torch.addmm:
            self._addmm(out, args, kwargs)
        elif func is _EMBEDDING:
            self._embedding(out, args, kwargs)
        elif func in _CONVS:
            self._conv(out, args, kwargs, _CONVS[func])
        elif func in (F.layer_norm, F.rms_norm):
            self._norm(out, args, kwargs, func is F.layer_norm)
        elif func in _ADDS and self.lookups:
            self._add(out, args)
        return out

    def _attention(self, func: Callable, args: tuple, kwargs: dict) -> object:
        """``nn.MultiheadAttention``'s functional body, run with its ``linear`` calls (packed
        in-projection, ``out_proj``; sequence first) recorded: the mode does not see inside a
        function that dispatched to it, so the module global is swapped for the call."""
        namespace, plain = func.__globals__, func.__globals__["linear"]
        thread = threading.get_ident()

        def linear(*a: object, **kw: object) -> Tensor:
            out = plain(*a, **kw)
            if threading.get_ident() == thread and isinstance(out, Tensor) and out.requires_grad:
                self._linear(out, a, kw)
            return out

        self.layouts.append("seq_first")
        namespace["linear"] = linear
        try:
            return func(*args, **kwargs)
        finally:
            namespace["linear"] = plain
            self.layouts.pop()

    def _linear(self, out: Tensor, args: tuple, kwargs: dict) -> None:
        x, w, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        self._product(out, x, w, b, "matrix", "F.linear")

    def _addmm(self, out: Tensor, args: tuple, kwargs: dict) -> None:
        if kwargs.get("beta", 1) != 1 or kwargs.get("alpha", 1) != 1:
            if any(id(t) in self.params for t in (args[0], _arg(args, kwargs, 2, "mat2"))):
                self.reasons.append("torch.addmm with beta or alpha other than 1")
            return
        self._product(
            out, args[1], _arg(args, kwargs, 2, "mat2"), args[0], "linear_t", "torch.addmm"
        )

    def _product(
        self, out: Tensor, x: Tensor, w: Tensor | None, b: Tensor | None, kind: str, what: str
    ) -> None:
        """A weight times the input plus a bias (``kind``: the weight as ``(out, in)`` or ``(in,
        out)``), either of them possibly a monitored parameter."""
        found_w, found_b = self._param(w, what), self._param(b, what)
        if found_w is None and found_b is None:
            return
        layout = self._layout(x, what)
        if layout is None:
            return
        slot = _Slot(out)
        if found_w is not None:
            self.uses.append(_Use(kind, found_w[0], found_w[1], slot, layout, x.detach()))
        if found_b is not None:
            self.uses.append(_Use("bias", found_b[0], found_b[1], slot, layout))

    def _embedding(self, out: Tensor, args: tuple, kwargs: dict) -> None:
        idx, w = args[0], _arg(args, kwargs, 1, "weight")
        found = self._param(w, "F.embedding")
        if found is None:
            return
        if _arg(args, kwargs, 5, "scale_grad_by_freq", False) or _arg(
            args, kwargs, 6, "sparse", False
        ):
            self.reasons.append(
                f"{self.names[id(w)]}: an embedding with scale_grad_by_freq or sparse gradients"
            )
            return
        padding = _arg(args, kwargs, 2, "padding_idx")
        extra = {"padding": None if padding is None else padding % w.shape[0]}
        use = _Use("matrix", found[0], 0, _Slot(out), lambda z: z, idx.detach(), extra)
        self.uses.append(use)
        if idx.dim() == 0 or idx.dim() == 1 or idx.shape[0] != self.batch or self.batch == 1:
            self.lookups[id(out)] = use  # maybe looked up without the batch: see _add

    def _add(self, out: Tensor, args: tuple) -> None:
        """``tok + pos``: an embedding output without the batch, broadcast over it; its per-example
        gradient is the sum of the sum's output gradient over the positions it was added to."""
        batch = self.batch
        for arg in args[:2]:
            use = self.lookups.get(id(arg)) if isinstance(arg, Tensor) else None
            broadcasts = (
                use is not None
                and out.dim() >= 2
                and out.shape[0] == batch
                and (arg.dim() < out.dim() or arg.shape[0] == 1)
            )
            if broadcasts:
                self.broadcast[id(use)] = (_Slot(out), out.shape)

    def _conv(self, out: Tensor, args: tuple, kwargs: dict, dims: int) -> None:
        x, w, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        found_w, found_b = self._param(w, "a convolution"), self._param(b, "a convolution")
        if found_w is None and found_b is None:
            return
        stride, padding = _arg(args, kwargs, 3, "stride", 1), _arg(args, kwargs, 4, "padding", 0)
        dilation, groups = _arg(args, kwargs, 5, "dilation", 1), _arg(args, kwargs, 6, "groups", 1)
        if groups != 1 or padding == "same":
            self.reasons.append("a convolution with groups > 1 or padding='same'")
            return
        if x.shape[0] != self.batch or x.dim() != dims + 2:
            self.reasons.append("a convolution input does not have the batch as dimension 0")
            return
        padding = 0 if padding == "valid" else padding
        geometry = [
            (extra, *_pair(v, 1)) if dims == 1 else _pair(v, 2)
            for v, extra in ((stride, 1), (padding, 0), (dilation, 1))
        ]
        kernel = w.shape[2:] if dims == 2 else (1, *w.shape[2:])
        spatial = x.unsqueeze(2) if dims == 1 else x

        def cols(z: Tensor) -> Tensor:  # (B, positions, in * kernel)
            s, p, d = geometry
            return F.unfold(z, kernel, dilation=d, padding=p, stride=s).transpose(1, 2)

        slot = _Slot(out)
        grad_layout = lambda z: z.flatten(2).transpose(1, 2)  # noqa: E731  (B, out, ...) -> (B, positions, out)
        if found_w is not None:
            use = _Use("matrix", found_w[0], found_w[1], slot, grad_layout, spatial.detach())
            use.extra["cols"] = cols
            self.uses.append(use)
        if found_b is not None:
            self.uses.append(_Use("bias", found_b[0], found_b[1], slot, grad_layout))

    def _norm(self, out: Tensor, args: tuple, kwargs: dict, layer: bool) -> None:
        x, shape = args[0], tuple(_arg(args, kwargs, 1, "normalized_shape"))
        w = _arg(args, kwargs, 2, "weight")
        b = _arg(args, kwargs, 3, "bias") if layer else None
        eps = _arg(args, kwargs, 4 if layer else 3, "eps", 1e-5 if layer else None)
        found_w, found_b = self._param(w, "a normalization"), self._param(b, "a normalization")
        if found_w is None and found_b is None:
            return
        if x.dim() < 2 or x.shape[0] != self.batch:
            self.reasons.append("a normalization input does not have the batch as dimension 0")
            return
        batch, width = self.batch, math.prod(shape)
        layout = lambda z: z.reshape(batch, -1, width)  # noqa: E731
        slot = _Slot(out)
        if found_w is not None:
            use = _Use("norm", found_w[0], found_w[1], slot, layout, x.detach())
            use.extra.update(shape=shape, eps=eps, layer=layer)
            self.uses.append(use)
        if found_b is not None:
            self.uses.append(_Use("bias", found_b[0], found_b[1], slot, layout))

    # ----- after backward -----

    def sq_norms(self, grads: dict[Tensor, Tensor], scales: Scales) -> Tensor | str:
        """``|h_i|^2`` per example, ``h_i`` its share of the batch gradient; a reason on failure."""
        if self.reasons:
            return self.reasons[0]
        per_param: dict[int, list[tuple[str, Tensor, Tensor | None, int]]] = {}
        for use in self.uses:
            if use.param not in grads:
                continue
            term = self._term(use)
            if isinstance(term, str):
                return term
            per_param.setdefault(id(use.param), []).append(term)
        parts = []
        for p, grad in grads.items():
            name = self.names.get(id(p), "a parameter")
            terms = per_param.get(id(p))
            if not terms:
                return f"{name} gets its gradient through an operation per_example does not know"
            if not self.checked:
                summed = _batch_sum(terms, p.shape)
                wide = _wide(grad).reshape(summed.shape)
                if torch.linalg.vector_norm(summed - wide) > 1e-2 * torch.linalg.vector_norm(wide):
                    return f"{name} also gets gradient outside the operations per_example sees"
            parts.append(_example_sq(terms, p.shape, None if scales is None else scales[p]))
        self.checked = True
        return torch.stack(parts).sum(0)

    def _term(self, use: _Use) -> tuple[str, Tensor, Tensor | None, int] | str:
        """``("dense" | "index", u, v, row)`` of a matrix use, ``("vector", vec, None, offset)``."""
        name = self.names.get(id(use.param), "a parameter")
        slot = use.slot
        if use.kind == "matrix" and use.data is not None and not use.data.is_floating_point():
            return self._index_term(use, name)
        if slot.grad is None:
            return f"{name}: no gradient reached its output"
        d = use.layout(_wide(slot.grad))
        if use.kind == "bias":
            return "vector", d.sum(1), None, use.row
        if use.kind == "norm":
            x, shape, eps = _wide(use.data), use.extra["shape"], use.extra["eps"]
            xhat = (
                F.layer_norm(x, shape, eps=eps)
                if use.extra["layer"]
                else F.rms_norm(x, shape, eps=eps)
            )
            return "vector", (d * use.layout(xhat)).sum(1), None, use.row
        a = (
            use.extra["cols"](_wide(use.data))
            if "cols" in use.extra
            else use.layout(_wide(use.data))
        )
        if use.kind == "linear_t":
            return "dense", a, d, use.row
        return "dense", d, a, use.row

    def _index_term(self, use: _Use, name: str) -> tuple[str, Tensor, Tensor, int] | str:
        batch, idx = self.batch, use.data
        slot, shape = use.slot, None
        if id(use) in self.broadcast:
            slot, shape = self.broadcast[id(use)]
        elif idx.dim() == 0 or idx.shape[0] != batch:
            return f"{name}: an embedding looked up without the batch is used other than added to a batched tensor"
        if slot.grad is None:
            return f"{name}: no gradient reached its output"
        d = _wide(slot.grad)
        d = d.reshape(batch, -1, d.shape[-1])
        if shape is not None:
            idx = torch.broadcast_to(idx, shape[:-1])
        idx = idx.reshape(batch, -1)
        if use.extra["padding"] is not None:
            d = d * (idx != use.extra["padding"]).unsqueeze(-1)
        return "index", idx, d, 0


def _layout_kind(module: nn.Module) -> str | None:
    """The layout of the calls a module makes: a Hugging Face ``Conv1D`` (duck-typed, so
    transformers is no dependency) flattens the batch."""
    if type(module).__name__ == "Conv1D" and hasattr(module, "nf"):
        return "flat"
    return None


def _rows(term: tuple[str, Tensor, Tensor | None, int]) -> tuple[int, int]:
    kind, u, _, row = term
    return (row, row + u.shape[2]) if kind == "dense" else (0, -1)


def _batch_sum(terms: list, shape: torch.Size) -> Tensor:
    """The batch gradient the terms add up to, as ``(rows, cols)`` (or a vector)."""
    if terms[0][0] == "vector":
        out = torch.zeros(math.prod(shape), dtype=terms[0][1].dtype, device=terms[0][1].device)
        for _, vec, _, offset in terms:
            out[offset : offset + vec.shape[1]] += vec.sum(0)
        return out
    return _materialise(terms, shape, None, batch_sum=True)[0]


def _materialise(
    terms: list, shape: torch.Size, scale: Tensor | None, batch_sum: bool = False
) -> Tensor:
    """Per-example gradients ``(B, rows, cols)`` built from the terms, squared norms (times the
    Adam scales) in chunks of examples; or, with ``batch_sum``, their sum ``(1, rows, cols)``."""
    rows = shape[0]
    cols = math.prod(shape[1:])
    batch = terms[0][1].shape[0]
    chunk = batch if batch_sum else max(1, _MATERIALIZE_ELEMENTS // (rows * cols))
    out = []
    for start in range(0, batch, chunk):
        n = min(chunk, batch - start)
        dtype, device = terms[0][2].dtype, terms[0][2].device
        g = torch.zeros(1 if batch_sum else n, rows, cols, dtype=dtype, device=device)
        for kind, u, v, row in terms:
            u, v = u[start : start + n], v[start : start + n]
            if kind == "dense" and batch_sum:
                g[0, row : row + u.shape[2]] += torch.einsum("btr,btc->rc", u, v)
            elif kind == "dense":
                g[:, row : row + u.shape[2]] += u.transpose(1, 2) @ v
            else:
                target = u if batch_sum else u + rows * torch.arange(n, device=u.device)[:, None]
                g.view(-1, cols).index_add_(0, target.reshape(-1), v.reshape(-1, cols))
        if batch_sum:
            return g
        if scale is not None:
            g = g * scale.reshape(rows, cols)
        out.append(g.pow(2).sum((1, 2)))
    return torch.cat(out)


def _example_sq(terms: list, shape: torch.Size, scale: Tensor | None) -> Tensor:
    """``|grad_i|^2`` (times the Adam scales) of one parameter for each example: shape ``(B,)``.

    Vectors are summed; matrices come from the Gram matrices of the terms' ``u`` and ``v``
    (``sum_{t,t'} (u_t.u_t')(v_t.v_t')``, index collisions counted), or from the materialised
    per-example gradient when that is cheaper for the shapes or Adam scales are applied."""
    if terms[0][0] == "vector":
        vec = torch.zeros(
            terms[0][1].shape[0],
            math.prod(shape),
            dtype=terms[0][1].dtype,
            device=terms[0][1].device,
        )
        for _, v, _, offset in terms:
            vec[:, offset : offset + v.shape[1]] += v
        if scale is not None:
            vec = vec * scale.reshape(-1)
        return vec.pow(2).sum(1)
    if len(terms) == 1 and terms[0][0] == "dense" and terms[0][1].shape[1] == 1 and scale is None:
        _, u, v, _ = terms[0]
        return (
            torch.linalg.vector_norm(u[:, 0], dim=1) * torch.linalg.vector_norm(v[:, 0], dim=1)
        ).square()
    rows, cols = shape[0], math.prod(shape[1:])
    steps = [(kind, u.shape[1], u.shape[2] if kind == "dense" else 1) for kind, u, _, _ in terms]
    gram = sum(t_j * t_k * (cols + min(r_j, r_k)) for (_, t_j, r_j), (_, t_k, r_k) in _pairs(steps))
    made = sum(t * (r * cols if kind == "dense" else cols) for kind, t, r in steps) + rows * cols
    if scale is not None or 0.5 * gram > made:  # the symmetric pieces below halve the Gram cost
        return _materialise(terms, shape, scale)
    # Pieces of at most 32 positions: the Gram matrix is symmetric, so only the blocks on and
    # below the diagonal are computed.
    pieces = [
        (kind, u_p, v_p, row)
        for kind, u, v, row in terms
        for u_p, v_p in zip(u.split(32, 1), v.split(32, 1), strict=True)
    ]
    total = 0
    for (j, a), (k, b) in _pairs(list(enumerate(pieces))):
        gu = _gram_u(a, b)
        if gu is not None:
            gv = a[2] @ b[2].transpose(1, 2)
            dot = torch.linalg.vecdot(gu.flatten(1), gv.flatten(1))
            total = total + (2 - (j == k)) * dot
    return total


def _pairs(items: list) -> Iterator[tuple]:
    """Unordered pairs of ``items``, each with itself included."""
    return itertools.combinations_with_replacement(items, 2)


def _gram_u(a: tuple, b: tuple) -> Tensor | None:
    """``u_t . u'_t'`` of two terms, ``(B, T, T')``; ``None`` when their rows do not overlap."""
    if a[0] == "index" and b[0] == "index":
        return (a[1][:, :, None] == b[1][:, None, :]).to(a[2].dtype)
    if a[0] == "index" or b[0] == "index":
        (_, idx, _, _), (_, u, _, row) = (a, b) if a[0] == "index" else (b, a)
        rel = idx - row
        inside = (rel >= 0) & (rel < u.shape[2])
        picked = u.gather(2, rel.clamp(0, u.shape[2] - 1)[:, None, :].expand(-1, u.shape[1], -1))
        picked = picked * inside[:, None, :]  # (B, T_dense, T_index)
        return picked.transpose(1, 2) if a[0] == "index" else picked
    (lo_a, hi_a), (lo_b, hi_b) = _rows(a), _rows(b)
    lo, hi = max(lo_a, lo_b), min(hi_a, hi_b)
    if lo >= hi:
        return None
    return a[1][:, :, lo - lo_a : hi - lo_a] @ b[1][:, :, lo - lo_b : hi - lo_b].transpose(1, 2)


def per_example_grad_norms(
    model: nn.Module, loss_fn: Callable[[Tensor, Tensor], Tensor], x: Tensor, y: Tensor
) -> Tensor:
    """Norm of each example's own gradient, ``|grad loss_fn(model(x_i), y_i)|``, from one ordinary
    backward (``p.grad`` is left alone); ``loss_fn`` must average over the batch. Raises
    ``SpecError("model", reason)`` for a model ``per_example`` cannot measure."""
    params = [p for p in model.parameters() if p.requires_grad]
    recorder = _Recorder(model, params)
    recorder.batch = x.shape[0]
    try:
        with recorder:
            out = model(x)
        found = torch.autograd.grad(loss_fn(out, y), params, allow_unused=True)
        grads = {p: g for p, g in zip(params, found, strict=True) if g is not None}
        shares = recorder.sq_norms(grads, None)
    finally:
        recorder.remove()
    if isinstance(shares, str):
        raise SpecError("model", shares)
    return shares.sqrt() * x.shape[0]


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
    recorded: int | None = None  # per_example under recording(): the batch of the recorded forward


def _is_estimator(value: object) -> bool:
    """Estimator state objects of :mod:`batchlab.core.noise` (what :meth:`state_dict` saves)."""
    return type(value).__module__ == noise_module.__name__ and (
        dataclasses.is_dataclass(value) or hasattr(value, "state_dict")
    )


def _encode(value: object) -> object:
    """An estimator as plain data: its own ``state_dict()``, or its dataclass fields, recursively."""
    if _is_estimator(value):
        if hasattr(value, "state_dict"):
            return {"class": type(value).__name__, "state": value.state_dict()}
        fields = {f.name: _encode(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return {"class": type(value).__name__, "fields": fields}
    if isinstance(value, list | tuple):
        return type(value)(_encode(v) for v in value)
    if isinstance(value, dict):
        return {k: _encode(v) for k, v in value.items()}
    return value


def _decode(encoded: object, like: object) -> object:
    """Inverse of :func:`_encode`; classes come only from :mod:`batchlab.core.noise`, by name."""
    if (
        isinstance(encoded, dict)
        and "class" in encoded
        and ("fields" in encoded or "state" in encoded)
    ):
        cls = getattr(noise_module, encoded["class"], None)
        if not isinstance(cls, type) or (like is not None and type(like) is not cls):
            raise SpecError("state_dict", f"holds an unknown estimator {encoded['class']!r}")
        if "state" in encoded:
            obj = like if like is not None else cls()
            obj.load_state_dict(encoded["state"])
            return obj
        fields = {k: _decode(v, None) for k, v in encoded["fields"].items()}
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})
    if isinstance(encoded, list | tuple):
        return type(encoded)(_decode(v, None) for v in encoded)
    if isinstance(encoded, dict):
        return {k: _decode(v, None) for k, v in encoded.items()}
    return encoded


class GradientNoiseScale:
    """Measure the gradient noise scale of ``model`` inside an ordinary training loop.

    Args:
        model: the model (for ``distributed`` with DDP, the DDP-wrapped model).
        mode: ``"accumulation"``, ``"distributed"``, ``"split"`` or ``"per_example"``.
        loss_fn: ``loss_fn(model(x), y)`` -> mean loss; needed by ``split`` and
            :meth:`forward_backward` (not by ``per_example`` under :meth:`recording`).
        n_micro: micro-batches per batch in ``split`` (and the ``per_example`` fallback).
        window: measured steps an estimate averages (``None``: all, for weights that do not move).
        population: the number of examples batches are drawn from without replacement (an epoch's
            permutation of the training set); ``None``: drawn i.i.d.
        every: measure every ``every``-th step (other steps run plain).
        precondition: a ``torch.optim.Adam`` / ``AdamW`` whose second moments precondition gradients.
        confidence: coverage of the interval returned by :meth:`estimate`.
        process_group: the group of ``distributed`` (default: the world).
        scaler: the ``torch.amp.GradScaler`` that scales the loss: norms are read in unscaled units
            (before or after ``scaler.unscale_``), and ``forward_backward`` scales its backward.
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
        scaler: torch.amp.GradScaler | None = None,
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
        except FieldError as exc:
            raise SpecError("window", exc.message) from None
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
        self.scaler = scaler
        if precondition is not None:
            self._check_adam(precondition)
        self.fallback: str | None = None
        self.skipped: Counter[str] = Counter()
        self._step = 0
        self._pending: list[_Pending] = []
        self._state = _StepState()
        self._hooks: _Recorder | None = None
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
        if self.loss_fn is None and self.mode == "split":
            raise SpecError("loss_fn", "mode 'split' needs loss_fn(model(x), y)")
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
        rnns = [
            f"{name} ({type(m).__name__})"
            for name, m in net.named_modules()
            if isinstance(m, nn.RNNBase)
        ]
        if rnns:
            self._fall_back("cannot compute per-example gradients of " + ", ".join(rnns))
        else:
            self._hooks = _Recorder(net, self.params)

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

    def _skip(self, reason: str, expected: bool = False) -> None:
        """Count a skipped measurement; warn once per reason unless it is ``expected`` (routine)."""
        if not self.skipped[reason]:
            level = logging.DEBUG if expected else logging.WARNING
            log.log(level, "noise scale: skipped a measurement: %s", reason)
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
                    "precondition: the optimizer has no second moments before its first step",
                    expected=True,
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

    def _backward(self, loss: Tensor) -> None:
        (loss if self.scaler is None else self.scaler.scale(loss)).backward()

    def _unscale(self) -> tuple[Tensor | float, Tensor | float]:
        """Factors that bring squared norms to unscaled units under a ``GradScaler``: for those read
        during backward (always scaled), and for those read from ``p.grad`` now (scaled unless
        ``scaler.unscale_`` has run this step). On the device: no host synchronisation."""
        scaler = self.scaler
        scale = None if scaler is None or not scaler.is_enabled() else scaler._get_scale_async()
        if scale is None:  # no scaler, or it has not scaled a loss yet
            return 1.0, 1.0
        inverse = scale.float().reciprocal().square()
        states = scaler._per_optimizer_states.values()  # torch 2.x: stage per optimizer
        unscaled = any(state["stage"] is OptState.UNSCALED for state in states)
        return inverse, 1.0 if unscaled else inverse

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
        if self.loss_fn is None:
            raise SpecError("loss_fn", "forward_backward needs loss_fn(model(x), y)")
        batch = x.shape[0]
        if y.shape[0] != batch:
            raise SpecError("y", f"must have the batch size of x ({batch}), got {y.shape[0]}")
        if self._due() and batch < 2:
            self._skip("a batch of 1 has no gradient noise to measure")
        if not (self._due() and batch >= 2 and self._scales()[0]):
            loss = self.loss_fn(self.model(x), y)
            self._backward(loss)
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
                self._backward(part)
                self._end_micro_batch(xm.shape[0])
                loss = loss + part.detach()
            self._record_micro_batches()
        return loss

    def _per_example_pass(self, x: Tensor, y: Tensor) -> Tensor:
        batch = x.shape[0]
        with self._own_grads():
            with self._recorded(batch):
                out = self.model(x)
            loss = self.loss_fn(out, y)
            self._backward(loss)
            self._read_per_example(batch)
        return loss

    @contextmanager
    def _recorded(self, batch: int) -> Iterator[None]:
        """The forward inside is recorded for ``per_example``."""
        hooks = self._hooks
        hooks.clear()
        hooks.batch = batch
        with hooks:
            yield

    def _read_per_example(self, batch: int) -> None:
        """One measurement from the recorded forward's shares and ``p.grad`` (this batch's alone)."""
        hooks, scales = self._hooks, self._state.scales
        grads = {p: p.grad for p in self.params if p.grad is not None}
        shares = hooks.sq_norms(grads, scales)
        hooks.clear()
        if isinstance(shares, str):
            self._skip("per_example fell back to split")
            self._fall_back(shares)
        else:  # example i's own gradient is batch * its share of the mean-batch gradient
            big = _sq_norm(self._grads(), self.params, scales)
            values = torch.stack([shares.mean() * batch**2, big]) * self._unscale()[0]
            self._record(_Pending((values,), lambda v: (v[0], v[1], 1.0, float(batch))))

    @contextmanager
    def recording(self, batch_size: int) -> Iterator[None]:
        """``per_example`` where the loop runs forward and backward itself (a trainer): run the
        forward and the mean loss inside, then ``backward()``, :meth:`after_backward` and
        :meth:`before_step`. After backward ``p.grad`` must hold this batch's gradient alone."""
        if self.mode != "per_example":
            raise SpecError("mode", f"recording is for per_example, not {self.mode}")
        if self._due() and batch_size < 2:
            self._skip("a batch of 1 has no gradient noise to measure")
        if self._due() and batch_size >= 2 and self._scales()[0]:
            with self._recorded(batch_size):
                yield
            self._state.recorded = batch_size
        else:
            yield

    def after_backward(self, batch_size: int) -> None:
        """Call after each (micro-)batch's ``backward()`` with its number of examples.

        ``accumulation``: closes this micro-batch's gradient. ``distributed``: the rank's local
        batch; in a loop without DDP, call it before all-reducing the gradients. ``per_example``
        (after :meth:`recording`): reads the per-example norms, before any ``scaler.unscale_``.
        """
        if self.mode == "split":
            raise SpecError("mode", "after_backward is not for split: use forward_backward")
        if batch_size < 1:
            raise SpecError("batch_size", f"must be >= 1, got {batch_size}")
        state = self._state
        if self.mode == "per_example":
            if state.recorded is not None:
                if state.recorded != batch_size:
                    raise SpecError(
                        "batch_size",
                        f"must be the recorded batch ({state.recorded}), got {batch_size}",
                    )
                state.recorded = None
                self._read_per_example(batch_size)
            return
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
        from_hooks, from_grads = self._unscale()
        norms = torch.cat(
            [
                torch.stack(state.norms) * from_hooks,
                torch.stack(_sq_norms(self._grads(), self.params, state.scales)) * from_grads,
            ]
        )
        key = (tuple(state.micro_sizes), tuple(state.micro_counts))
        if key not in self._resolvers:  # the same cut every step: build its resolver once
            batches = effective_batches(state.micro_sizes)
            self._resolvers[key] = _micro_batch_resolver(
                state.micro_counts, state.micro_sizes, batches
            )
        self._record(_Pending((norms,), self._resolvers[key]))

    def before_step(self) -> None:
        """Call once per optimizer step, before ``optimizer.step()`` (``accumulation``,
        ``distributed``, ``per_example`` after :meth:`recording`): reads the gradient the optimizer
        will apply. Collective in ``distributed``."""
        if self.mode == "split":
            raise SpecError("mode", "before_step is not for split: use forward_backward")
        if self.mode == "per_example":
            self._state.recorded = None
        elif self._due() and self._scales()[0]:
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
        from_hooks, from_grads = self._unscale()
        local = (torch.stack(state.local_sq).sum() * from_hooks).double()
        big = _sq_norm(self._grads(), self.params, state.scales) * from_grads
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

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue the same estimate, as plain numbers (loadable with
        ``torch.load(weights_only=True)``): the estimators' own state, steps, skips and any fallback.

        Folds pending measurements in first. ``distributed``: call :meth:`sync` on every rank first.
        """
        if self._unreduced:
            raise SpecError(
                "state_dict",
                f"{len(self._unreduced)} distributed measurements are not shared yet: "
                "call sync() on every rank first",
            )
        self._flush()
        return {
            "mode": self.mode,
            "fallback": self.fallback,
            "step": self._step,
            "skipped": dict(self.skipped),
            "estimators": {k: _encode(v) for k, v in vars(self).items() if _is_estimator(v)},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`state_dict`: the next measurement folds into the saved estimate."""
        saved = state.get("mode")
        if saved != self.mode and not (self.mode == "per_example" and state.get("fallback")):
            raise SpecError(
                "state_dict", f"was saved in mode {saved!r}, this monitor is {self.mode!r}"
            )
        own = {k: v for k, v in vars(self).items() if _is_estimator(v)}
        if set(state["estimators"]) != set(own):
            raise SpecError(
                "state_dict",
                f"holds estimators {sorted(state['estimators'])}, this monitor {sorted(own)}",
            )
        if self.mode != saved:
            self._skip("per_example fell back to split")
            self._fall_back(state["fallback"])
        self._pending.clear()
        for name, encoded in state["estimators"].items():
            setattr(self, name, _decode(encoded, own[name]))
        self._step = int(state["step"])
        self.skipped = Counter(state["skipped"])

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
