"""Sharpness of a trained model: top Hessian eigenvalue against the stability edge, Keskar sharpness.

- ``top_hessian_eigenvalue``: the largest *algebraic* eigenvalue of the Hessian of the mean loss,
  by Lanczos iteration with full reorthogonalisation on Hessian-vector products (reverse-over-reverse:
  the gradient of ``<grad loss, v>``, which every loss with a differentiable backward supports;
  forward-over-reverse fails on ``mse_loss`` and ``huber_loss`` and was not faster on CPU). At a
  minimum the Hessian is positive semi-definite and this is also the largest-magnitude eigenvalue.
  Gradient descent on a quadratic is stable only for ``lr < 2 / lambda_max``; Cohen et al. 2021
  ("Gradient Descent on Neural Networks Typically Occurs at the Edge of Stability") find training
  settles where ``lambda_max ~ 2 / lr``.
- ``keskar_sharpness``: Keskar et al. 2017 ("On Large-Batch Training for Deep Learning:
  Generalization Gap and Sharp Minima"), eq. (4) in full parameter space: the largest rise of the
  loss in the box ``C_eps = {z : |z_i| <= eps (|x_i| + 1)}``, found with scipy's L-BFGS-B (10
  iterations), as ``phi = 100 (max_z f(x + z) - f(x)) / (1 + f(x))``.

Both evaluate the loss over the data in chunks (the mean loss is the size-weighted mean of chunk
means), so memory stays bounded by one chunk. The model is evaluated in eval mode (dropout off, batch
norm on its running statistics) and its parameters are never modified.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from scipy.optimize import Bounds, minimize
from torch import Tensor, nn
from torch.func import functional_call

from batchlab.core.rules import check_number
from batchlab.engine.data import resolve_device
from batchlab.engine.spec import RunSpec, SpecError, check_integer
from batchlab.engine.tasks import Task, stored_task
from batchlab.engine.train import build_model

log = logging.getLogger(__name__)

LossFn = Callable[[Tensor, Tensor], Tensor]
DEFAULT_CHUNK = 4096


class _FlatLoss:
    """The mean loss of ``model`` on ``(x, y)`` as a function of one flat parameter vector."""

    def __init__(
        self, model: nn.Module, loss_fn: LossFn, x: Tensor, y: Tensor, chunk_size: int
    ) -> None:
        named = [(k, p) for k, p in model.named_parameters() if p.requires_grad]
        if not named:
            raise SpecError("model", "has no trainable parameters (no Hessian to measure)")
        if x.shape[0] != y.shape[0] or x.shape[0] == 0:
            raise SpecError(
                "x", f"x and y need the same number (> 0) of rows, got {len(x)}, {len(y)}"
            )
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise SpecError("chunk_size", f"must be an integer >= 1, got {chunk_size!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.names = [k for k, _ in named]
        self.shapes = [p.shape for _, p in named]
        self.numels = [p.numel() for _, p in named]
        self.x0 = torch.cat([p.detach().reshape(-1) for _, p in named])
        frozen = {k: p.detach() for k, p in model.named_parameters() if not p.requires_grad}
        self.fixed = {**frozen, **{k: b.detach() for k, b in model.named_buffers()}}
        device = self.x0.device
        n = int(x.shape[0])
        self.chunks = [
            (x[i : i + chunk_size].to(device), y[i : i + chunk_size].to(device))
            for i in range(0, n, chunk_size)
        ]
        self.weights = [xb.shape[0] / n for xb, _ in self.chunks]

    @property
    def size(self) -> int:
        """Number of trainable parameters."""
        return int(self.x0.numel())

    def params(self, flat: Tensor) -> dict[str, Tensor]:
        """Split a flat vector into the model's named parameter tensors."""
        parts = torch.split(flat, self.numels)
        return {k: v.view(s) for k, v, s in zip(self.names, parts, self.shapes, strict=True)}

    def _chunk_loss(self, params: dict[str, Tensor], xb: Tensor, yb: Tensor) -> Tensor:
        return self.loss_fn(functional_call(self.model, {**params, **self.fixed}, (xb,)), yb)

    def value(self, flat: Tensor) -> float:
        """Mean loss at ``flat`` (call under ``torch.no_grad``)."""
        p = self.params(flat)
        return sum(
            w * float(self._chunk_loss(p, xb, yb))
            for (xb, yb), w in zip(self.chunks, self.weights, strict=True)
        )

    def value_and_grad(self, flat: Tensor) -> tuple[float, Tensor]:
        """Mean loss and its gradient at ``flat``."""
        total, g = 0.0, torch.zeros_like(flat)
        point = flat.detach().requires_grad_(True)
        with torch.enable_grad():
            for (xb, yb), w in zip(self.chunks, self.weights, strict=True):
                loss = self._chunk_loss(self.params(point), xb, yb)
                total += w * float(loss.detach())
                g += w * _grad(loss, point)
        return total, g

    def hvp(self, v: Tensor) -> Tensor:
        """Hessian of the mean loss at the model's parameters times ``v`` (double backward)."""
        out = torch.zeros_like(v)
        point = self.x0.detach().requires_grad_(True)
        with torch.enable_grad():
            for (xb, yb), w in zip(self.chunks, self.weights, strict=True):
                g = _grad(self._chunk_loss(self.params(point), xb, yb), point, create_graph=True)
                out += w * _grad(g, point, grad_outputs=v)
        return out


def _grad(out: Tensor, point: Tensor, **kwargs: Any) -> Tensor:
    """Reverse-mode ``d out / d point`` (a vector-Jacobian product with ``grad_outputs``); zeros
    when ``out`` does not depend on ``point`` (e.g. the gradient of a loss linear in the weights)."""
    if not out.requires_grad:
        return torch.zeros_like(point)
    (g,) = torch.autograd.grad(out, point, materialize_grads=True, **kwargs)
    return g


class _EvalMode:
    """Context: the model in eval mode, every module's mode restored afterwards."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.modes = [(m, m.training) for m in model.modules()]

    def __enter__(self) -> None:
        self.model.eval()

    def __exit__(self, *exc: object) -> None:
        for module, mode in self.modes:
            module.training = mode


def _lanczos_top(matvec: Callable[[Tensor], Tensor], q: Tensor, iters: int, tol: float) -> float:
    """Largest algebraic eigenvalue of a symmetric operator by Lanczos with full
    reorthogonalisation; stops when the Ritz residual ``beta_k |s_k|`` <= ``tol`` |theta|."""
    basis = [q / q.norm()]
    alphas: list[float] = []
    betas: list[float] = []
    theta = math.nan
    for k in range(iters):
        w = matvec(basis[k])
        alphas.append(float(w @ basis[k]))
        if not math.isfinite(alphas[-1]):
            return math.nan
        for _ in range(2):  # twice is enough (Kahan-Parlett)
            stack = torch.stack(basis)
            w = w - stack.T @ (stack @ w)
        beta = float(w.norm())
        ritz, vecs = _tridiagonal_eigh(alphas, betas)
        theta = float(ritz[-1])
        residual = beta * abs(float(vecs[-1, -1]))
        if residual <= tol * abs(theta) or beta <= 1e-12 * max(abs(theta), 1e-30):
            log.debug("Lanczos converged after %d products (residual %.3g)", k + 1, residual)
            return theta
        if k + 1 < iters:
            betas.append(beta)
            basis.append(w / beta)
    log.warning("Lanczos stopped after %d products without reaching tol %.1e", iters, tol)
    return theta


def _tridiagonal_eigh(alphas: list[float], betas: list[float]) -> tuple[np.ndarray, np.ndarray]:
    t = np.diag(alphas) + np.diag(betas, 1) + np.diag(betas, -1)
    return np.linalg.eigh(t)


def _check_lanczos(iters: int, tol: float) -> None:
    check_integer("iters", iters, 1)
    check_number("tol", tol, low=0.0, low_open=True, error=SpecError)


def _check_keskar(epsilon: float, maxiter: int) -> None:
    check_number("epsilon", epsilon, low=0.0, low_open=True, error=SpecError)
    check_integer("maxiter", maxiter, 1)


def _top_eigenvalue(flat: _FlatLoss, iters: int, tol: float, seed: int) -> float:
    gen = torch.Generator().manual_seed(seed)
    start = torch.randn(flat.size, generator=gen, dtype=flat.x0.dtype).to(flat.x0.device)
    return _lanczos_top(flat.hvp, start, min(iters, flat.size), tol)


def _keskar(flat: _FlatLoss, f0: float, epsilon: float, maxiter: int, seed: int) -> float:
    if not math.isfinite(f0):
        return math.nan
    x0 = flat.x0.double().cpu().numpy()
    radius = epsilon * (np.abs(x0) + 1.0)

    def negated(z: np.ndarray) -> tuple[float, np.ndarray]:
        point = torch.as_tensor(x0 + z, dtype=flat.x0.dtype, device=flat.x0.device)
        value, g = flat.value_and_grad(point)
        return -value, -g.double().cpu().numpy()

    z0 = np.random.default_rng(seed).uniform(-radius, radius)
    res = minimize(
        negated,
        z0,
        jac=True,
        method="L-BFGS-B",
        bounds=Bounds(-radius, radius),
        options={"maxiter": maxiter},
    )
    return 100.0 * (max(-float(res.fun), f0) - f0) / (1.0 + f0)


def top_hessian_eigenvalue(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    iters: int = 100,
    tol: float = 1e-5,
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
) -> float:
    """Largest algebraic eigenvalue of the Hessian of the mean ``loss_fn(model(x), y)``.

    Lanczos from a seeded random start, at most ``iters`` Hessian-vector products (it keeps that many
    parameter-sized vectors), stopping at relative Ritz residual ``tol``. NaN when the loss or its
    curvature is not finite (a diverged model).
    """
    _check_lanczos(iters, tol)
    flat = _FlatLoss(model, loss_fn, x, y, chunk_size)
    with _EvalMode(model):
        return _top_eigenvalue(flat, iters, tol, seed)


def keskar_sharpness(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    epsilon: float = 1e-3,
    maxiter: int = 10,
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
) -> float:
    """Keskar et al. 2017 sharpness ``phi`` (a percentage) of the box ``C_eps`` in full space.

    L-BFGS-B maximises ``f(x + z)`` over the box from a seeded uniform random start inside it (a start
    at ``z = 0`` would stop at once at an exact minimum, where the gradient vanishes). 0 for a loss
    that is flat in the box; NaN when the loss at ``x`` is not finite.
    """
    _check_keskar(epsilon, maxiter)
    flat = _FlatLoss(model, loss_fn, x, y, chunk_size)
    with _EvalMode(model), torch.no_grad():
        return _keskar(flat, flat.value(flat.x0), epsilon, maxiter, seed)


def sharpness_report(
    model: nn.Module,
    loss_fn: LossFn,
    x: Tensor,
    y: Tensor,
    *,
    lr: float | None = None,
    iters: int = 100,
    tol: float = 1e-5,
    epsilon: float = 1e-3,
    maxiter: int = 10,
    keskar: bool = True,
    seed: int = 0,
    chunk_size: int = DEFAULT_CHUNK,
) -> dict[str, Any]:
    """Loss, top eigenvalue, the stability edge ``2 / lr`` and ``edge_ratio = lambda_max / (2 / lr)``
    (> 1: past the edge of stability), and Keskar sharpness (``None`` when ``keskar=False``)."""
    if lr is not None and not (math.isfinite(lr) and lr > 0):
        raise SpecError("lr", f"must be a finite number > 0, got {lr!r}")
    _check_lanczos(iters, tol)
    _check_keskar(epsilon, maxiter)
    flat = _FlatLoss(model, loss_fn, x, y, chunk_size)
    with _EvalMode(model):
        with torch.no_grad():
            loss = flat.value(flat.x0)
        top = _top_eigenvalue(flat, iters, tol, seed) if math.isfinite(loss) else math.nan
        with torch.no_grad():
            phi = _keskar(flat, loss, epsilon, maxiter, seed) if keskar else None
    edge = None if lr is None else 2.0 / lr
    return {
        "loss": loss,
        "top_eigenvalue": top,
        "stability_edge": edge,
        "edge_ratio": None if edge is None else top / edge,
        "keskar": phi,
        "epsilon": epsilon,
        "n_examples": int(x.shape[0]),
        "n_params": flat.size,
    }


def run_sharpness(
    spec: RunSpec,
    weights: Mapping[str, Tensor],
    *,
    task: Task | None = None,
    device: str | torch.device | None = None,
    **options: Any,
) -> dict[str, Any]:
    """``sharpness_report`` of a finished run on its training set, with ``lr = spec.lr``.

    The model is ``engine.train.build_model`` (``task.make_model(spec.seed)`` with the state_dict
    checked and loaded, e.g. from ``Store.weights``); ``task`` defaults to ``stored_task(spec)``,
    which builds built-in tasks only (pass ``task`` for a user's ``module:function``: a spec is
    data, code is named by the caller); ``options`` go to ``sharpness_report`` (``iters``, ...).
    """
    task = task if task is not None else stored_task(spec, spec.run_id)
    dev = resolve_device(device)
    model = build_model(task, spec, dict(weights)).to(dev)
    return sharpness_report(
        model,
        task.loss_fn,
        task.x_train.to(dev),
        task.y_train.to(dev),
        lr=spec.lr if spec.lr > 0 else None,
        **options,
    )
