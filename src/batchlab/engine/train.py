"""The training engine: ``train(spec) -> RunResult`` and ``train_ensemble(specs)``.

One loop serves both. A *stepper* owns K models (K = 1 for a solo run, K > 1 for an ensemble of runs
that share everything but their scalar hyper-parameters) and knows how to take one optimizer step and
how to evaluate; the loop owns the step count, the batch order, the schedules, evaluation, divergence
and the history. Only the engine counts steps; schedules are pure functions it calls with the step.

- Solo runs use an ordinary ``nn.Module`` and ``torch.optim`` (SGD, Adam, AdamW), so they are exactly what
  a user's own loop would compute; they also handle gradient accumulation and batch norm.
- Ensembles stack the K models' parameters (``torch.func.stack_module_state``) and train them with
  ``vmap(grad_and_value(functional_call))`` and a vectorized optimizer with per-member learning rate,
  momentum, betas, eps and weight decay, written to match ``torch.optim`` update for update
  (tested against solo runs). Each member draws its batches from its own seed's permutation, so a
  member's numbers equal the solo run's up to float rounding; members sharing a seed share the batch.

Budget: ``epochs`` and ``samples`` stop at the first step at which ``samples >= budget`` (every batch is
full, see ``BatchStream``); ``steps`` stops after that many optimizer updates. A solo run with
``adaptive_batch`` grows its batch from the noise monitor (``engine.adaptive``): the loop draws the
batch the controller asks for, multiplies the scheduled lr by its ``lr_scale`` and stores each change
in ``extra["adaptive_batch"]``; its planned steps are then an upper bound. The LR schedule is
evaluated at ``samples_seen / spec.batch_size``, the step counted at the first batch size, so a decay
placed at a fraction of the budget happens at the same epoch when ``batch_schedule`` grows the batch.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from batchlab.core.schedules import batch_size_at, build_lr_schedule
from batchlab.engine import optim
from batchlab.engine.data import BatchStream, resolve_device
from batchlab.engine.spec import HistoryKey as H
from batchlab.engine.spec import RunResult, RunSpec, RunStatus, SpecError
from batchlab.engine.tasks import Task, get_task
from batchlab.errors import FieldError

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Called as ``progress(steps_done, total_steps)`` a few hundred times per run at most."""

AUTO_EVALS = 50
"""With ``eval_every = 0`` the loop evaluates about this many times per run (plus step 0 and the end)."""

EVAL_ROWS = 1 << 16
"""Rows of (members x examples x tokens per example) evaluated at once: bounds the memory of
evaluation."""

ENSEMBLE_ROWS = 1 << 14
"""Members x batch rows per vectorized step. Beyond this the stacked activations leave the CPU cache
and K solo runs are as fast (measured in ``benchmarks/bench_sweep.py``), so larger groups are split."""

MEMBER_FIELDS = (
    "lr",
    "seed",
    "momentum",
    "weight_decay",
    "beta1",
    "beta2",
    "eps",
    "diverge_factor",
)
"""RunSpec fields that may differ between the members of one ensemble."""


# --------------------------------------------------------------------------------------------------
# Planning: what a spec means on a task


@dataclass(frozen=True)
class Plan:
    """Derived quantities of a spec on a task, fixed before the first step (logged like nanoGPT)."""

    n_train: int
    total_steps: int
    total_samples: int
    max_samples: float
    eval_every: int
    schedule_steps: float
    warmup_steps: float

    def describe(self, spec: RunSpec) -> str:
        """One line for the log: the numbers a user would otherwise compute by hand."""
        steps = f"at most {self.total_steps}" if spec.adaptive_batch else f"{self.total_steps}"
        batch = f"adaptive from {spec.batch_size}" if spec.adaptive_batch else spec.batch_size
        return (
            f"{spec.task}: batch {batch}, {self.n_train} training examples, "
            f"{steps} steps, {self.total_samples} samples "
            f"({self.total_samples / self.n_train:.3g} epochs), evaluation every {self.eval_every} steps"
        )


def batch_size_in_force(spec: RunSpec, epoch: float) -> int:
    """The batch size of ``spec`` at ``epoch`` (its ``batch_schedule``, same tolerance as the LR)."""
    return batch_size_at(spec.batch_size, spec.batch_schedule, epoch)


def validate_for_task(spec: RunSpec, n_train: int) -> None:
    """Checks that need the task: batch sizes fit the training set, micro-batches divide them."""
    sizes = [spec.batch_size, *(b for _, b in spec.batch_schedule)]
    for size in sizes:
        if size > n_train:
            field = "batch_size" if size == spec.batch_size else "batch_schedule"
            raise SpecError(field, f"{size} exceeds the {n_train} training examples of {spec.task}")
        if spec.micro_batch_size is not None and size % spec.micro_batch_size:
            raise SpecError(
                "micro_batch_size", f"{spec.micro_batch_size} does not divide batch size {size}"
            )


def plan(spec: RunSpec, n_train: int) -> Plan:
    """Resolve the budget into steps and samples (walking the batch-size schedule)."""
    validate_for_task(spec, n_train)
    if spec.budget_unit == "steps":
        max_steps, max_samples = int(spec.budget), math.inf
    else:
        per = n_train if spec.budget_unit == "epochs" else 1
        max_steps, max_samples = math.inf, max(1, round(spec.budget * per))
    steps = samples = 0
    if not spec.batch_schedule:
        steps = max_steps if max_steps < math.inf else math.ceil(max_samples / spec.batch_size)
        samples = steps * spec.batch_size
    else:
        while steps < max_steps and samples < max_samples:
            samples += batch_size_in_force(spec, samples / n_train)
            steps += 1
    eval_every = spec.eval_every or max(1, round(steps / AUTO_EVALS))
    resolved = Plan(
        n_train=n_train,
        total_steps=int(steps),
        total_samples=int(samples),
        max_samples=max_samples,
        eval_every=eval_every,
        # the budget's samples, not the last batch's overshoot: milestones stay on their epochs
        schedule_steps=min(samples, max_samples) / spec.batch_size,
        warmup_steps=spec.warmup_epochs * n_train / spec.batch_size,
    )
    try:
        lr_schedule(spec, resolved)
    except FieldError as exc:
        raise SpecError(exc.field, exc.message) from exc
    except ValueError as exc:  # not a field's error, e.g. an option of the wrong type
        raise SpecError("schedule_options", str(exc)) from exc
    return resolved


def check_batches(spec: RunSpec, task: Task) -> None:
    """Forward one batch of every size the run uses through a fresh model, so that a model which
    refuses a batch (``SpecError``, e.g. a ghost batch size that does not divide it) does so before
    training starts. Other errors are left to training, which records them as a failed run."""
    model = task.make_model(spec.seed).train()
    for size in {spec.batch_size, *(b for _, b in spec.batch_schedule)}:
        rows = spec.micro_batch_size or size
        try:
            with torch.no_grad():
                model(task.x_train[:rows])
        except SpecError:
            raise
        except Exception:  # any other failure shows up, and is recorded, in training
            return


def lr_schedule(spec: RunSpec, p: Plan) -> Callable[[float], float]:
    """The spec's LR schedule as a function of the step counted at the first batch size."""
    return build_lr_schedule(
        spec.schedule,
        spec.lr,
        p.schedule_steps,
        warmup_steps=p.warmup_steps,
        warmup=spec.warmup,
        **dict(spec.schedule_options),
    )


# --------------------------------------------------------------------------------------------------
# Steppers: K models, one optimizer step, evaluation


def _chunked_eval(
    forward: Callable[[Tensor], Tensor], task: Task, x: Tensor, y: Tensor, rows: int
) -> tuple[Tensor, Tensor]:
    """Mean loss and metric over ``(x, y)`` per member, evaluated in chunks of ``rows`` rows
    (examples times ``task.tokens_per_example``).

    ``forward(xc)`` returns logits of shape (K, n, ...).
    """
    rows = max(1, rows // task.tokens_per_example)
    loss_sum = metric_sum = None
    for start in range(0, x.shape[0], rows):
        xc, yc = x[start : start + rows], y[start : start + rows]
        logits = forward(xc)
        n = xc.shape[0]
        losses = torch.stack([task.loss_fn(lg, yc) for lg in logits]) * n
        metrics = torch.stack([task.metric(lg, yc).float() for lg in logits]) * n
        loss_sum = losses if loss_sum is None else loss_sum + losses
        metric_sum = metrics if metric_sum is None else metric_sum + metrics
    assert loss_sum is not None and metric_sum is not None
    return loss_sum / x.shape[0], metric_sum / x.shape[0]


class _Solo:
    """One ``nn.Module`` trained by ``torch.optim``: the reference every ensemble is tested against."""

    def __init__(self, task: Task, spec: RunSpec, device: torch.device) -> None:
        self.task, self.spec, self.size = task, spec, 1
        self.model = task.make_model(spec.seed).to(device)
        self.model.train()
        params = [p for p in self.model.parameters() if p.requires_grad]
        if not params:
            raise SpecError("task", f"the model of {spec.task} has no trainable parameters")
        self.opt = optim.from_spec(spec, params)
        self.ratios = optim.lr_ratios(self.opt)
        self.noise = self.adaptive = None
        if spec.noise_scale:
            from batchlab.core.noise import DEFAULT_WINDOW  # fixed weights at lr 0: average all
            from batchlab.engine.monitor import GradientNoiseScale

            self.noise = GradientNoiseScale(
                self.model,
                spec.resolved_noise_mode,
                loss_fn=task.loss_fn,
                n_micro=spec.noise_splits,
                precondition=self.opt if optim.REGISTRY[spec.optimizer].adaptive else None,
                window=None if spec.lr == 0 and spec.optimizer == "sgd" else DEFAULT_WINDOW,
                population=task.n_train,  # batches are slices of an epoch's permutation
            )
        if spec.adaptive_batch:
            from batchlab.engine.adaptive import AdaptiveBatch

            settings, every = spec.adaptive_settings(task.n_train)
            self.adaptive = AdaptiveBatch(self.noise, settings, every=every)

    def step(self, idx: list[Tensor], lrs: list[float]) -> Tensor:
        """One update on batch ``idx[0]``; returns the batch loss before the update, shape (1,)."""
        optim.set_lr(self.opt, lrs[0], self.ratios)
        x, y = self.task.x_train[idx[0]], self.task.y_train[idx[0]]
        self.opt.zero_grad(set_to_none=True)
        micro = self.spec.micro_batch_size
        if micro is not None and micro < x.shape[0]:
            total = torch.zeros((), device=x.device)
            for xs, ys in zip(x.split(micro), y.split(micro), strict=True):
                part = self.task.loss_fn(self.model(xs), ys) * (xs.shape[0] / x.shape[0])
                part.backward()
                total += part.detach()
                if self.noise is not None:
                    self.noise.after_backward(xs.shape[0])
            if self.noise is not None:
                self.noise.before_step()
        elif self.noise is not None:  # per-example norms from the same backward
            total = self.noise.forward_backward(x, y)
        else:
            loss = self.task.loss_fn(self.model(x), y)
            loss.backward()
            total = loss.detach()
        self.opt.step()
        return total.reshape(1)

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mean loss and metric over ``(x, y)`` in eval mode, shape (1,) each."""
        self.model.eval()
        try:
            return _chunked_eval(lambda xc: self.model(xc).unsqueeze(0), self.task, x, y, EVAL_ROWS)
        finally:
            self.model.train()

    def noise_scale(self) -> dict[str, float] | None:
        """The monitor's current estimate (value, low, high), or None when not measured yet."""
        est = self.noise.estimate() if self.noise is not None else None
        if est is None:
            return None
        return {H.NOISE_SCALE: est.value, H.NOISE_SCALE_LOW: est.low, H.NOISE_SCALE_HIGH: est.high}

    def extra(self) -> dict[str, Any]:
        """How the noise scale was measured: the mode in force (``split`` after a fall-back), why
        it fell back, and the measurements skipped, by reason."""
        if self.noise is None:
            return {}
        out = {
            "noise_mode": self.noise.mode,
            "noise_fallback": self.noise.fallback,
            "noise_skipped": dict(self.noise.skipped),
        }
        if self.adaptive is not None:
            out["adaptive_batch"] = self.adaptive.summary()
        return out

    def stop(self, member: int) -> None:
        """Nothing to mask in a solo run: the loop ends it."""

    def weights(self, member: int) -> dict[str, Tensor]:
        """The final state dict, detached and on the CPU."""
        return {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}


class _Ensemble:
    """K models of one architecture as stacked parameters, trained with ``vmap``.

    All parameters live in one (members, P) buffer (``params`` holds views into it), so the
    vectorized optimizer is a handful of tensor ops per step whatever the number of layers. It
    matches ``torch.optim.SGD`` (momentum, Nesterov, L2 weight decay), ``Adam`` (L2) and ``AdamW``
    (decoupled decay) update for update, with per-member hyper-parameters. A diverged member leaves
    the stack, so a learning-rate grid stops paying for the runs that blew up.
    """

    def __init__(self, task: Task, specs: Sequence[RunSpec], device: torch.device) -> None:
        from torch.func import functional_call, grad_and_value, stack_module_state, vmap

        self.task, self.specs, self.size = task, list(specs), len(specs)
        models = [task.make_model(s.seed).to(device) for s in specs]
        stacked, _ = stack_module_state(models)
        self.layout = [(name, v.shape[1:]) for name, v in stacked.items()]
        self.flat = torch.cat([v.detach().reshape(self.size, -1) for v in stacked.values()], 1)
        base = copy.deepcopy(models[0]).to("meta")

        def member_logits(p: dict[str, Tensor], x: Tensor) -> Tensor:
            return functional_call(base, p, (x,))

        def member_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
            return task.loss_fn(member_logits(p, x), y)

        self.shared_batch = len({s.seed for s in specs}) == 1
        dims = None if self.shared_batch else 0
        self._grad = vmap(grad_and_value(member_loss), in_dims=(0, dims, dims))
        self._logits = vmap(member_logits, in_dims=(0, None))
        self.opt = optim.VectorizedOptimizer(specs, self.flat)
        self.members = list(range(self.size))  # which of the K runs each row of the stack is
        self.adaptive = None  # adaptive-batch runs measure the noise scale, so they train solo
        self._views()

    def _views(self) -> None:
        """``params``: one view of ``flat`` per parameter, and the rows' member indices."""
        self.params: dict[str, Tensor] = {}
        offset = 0
        for name, shape in self.layout:
            n = shape.numel()
            self.params[name] = self.flat[:, offset : offset + n].unflatten(1, shape)
            offset += n
        self.rows = torch.tensor(self.members, device=self.flat.device, dtype=torch.long)

    def _scatter(self, values: Tensor) -> Tensor:
        """Per-row values -> per-member values (NaN for members no longer in the stack)."""
        out = torch.full((self.size,), math.nan, device=values.device, dtype=values.dtype)
        out[self.rows] = values
        return out

    def step(self, idx: list[Tensor], lrs: list[float]) -> Tensor:
        """One vectorized update; ``idx`` and ``lrs`` hold one entry per member. Returns losses (K,)."""
        if self.shared_batch:
            x, y = self.task.x_train[idx[0]], self.task.y_train[idx[0]]
        else:
            stacked = torch.stack([idx[m] for m in self.members])
            x, y = self.task.x_train[stacked], self.task.y_train[stacked]
        grads, losses = self._grad(self.params, x, y)
        g = torch.cat([grads[name].reshape(len(self.members), -1) for name, _ in self.layout], 1)
        lr = torch.tensor([lrs[m] for m in self.members], device=losses.device)[:, None]
        self.opt.step(self.flat, g, lr)
        return self._scatter(losses.detach())

    @torch.no_grad()
    def evaluate(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        """Mean loss and metric per member over ``(x, y)``, shape (K,) each (NaN once stopped)."""
        if not self.members:
            nan = torch.full((self.size,), math.nan)
            return nan, nan.clone()
        rows = max(1, EVAL_ROWS // len(self.members))
        loss, metric = _chunked_eval(
            lambda xc: self._logits(self.params, xc), self.task, x, y, rows
        )
        return self._scatter(loss), self._scatter(metric)

    def noise_scale(self) -> None:
        """Ensembles do not measure the noise scale (such runs train solo)."""
        return None

    def extra(self) -> dict[str, Any]:
        """Nothing beyond the loop's own record."""
        return {}

    def stop(self, member: int) -> None:
        """Take a diverged member out of the stack (its weights and optimizer state with it)."""
        keep = [i for i, m in enumerate(self.members) if m != member]
        self.members = [self.members[i] for i in keep]
        self.flat = self.flat[keep]
        self.opt.keep(keep)
        self._views()

    def weights(self, member: int) -> dict[str, Tensor]:
        """Member ``member``'s parameters under the names of ``make_model``'s state dict."""
        row = self.members.index(member)
        return {k: v[row].detach().cpu().clone() for k, v in self.params.items()}


# --------------------------------------------------------------------------------------------------
# The loop


def noise_summary(history: list[dict[str, Any]]) -> dict[str, Any]:
    """``{"noise_scale": {"start", "middle", "end"}}`` from the history rows that measured it.

    Each entry has ``value``, ``low``, ``high`` (the interval) and the ``step``; empty when the run
    did not measure the noise scale.
    """
    rows = [r for r in history if r.get("noise_scale") is not None]
    if not rows:
        return {}
    picks = {"start": rows[0], "middle": rows[len(rows) // 2], "end": rows[-1]}
    return {
        "noise_scale": {
            name: {
                "value": r["noise_scale"],
                "low": r.get("noise_scale_low"),
                "high": r.get("noise_scale_high"),
                "step": r["step"],
            }
            for name, r in picks.items()
        }
    }


def _tokens(task: Task) -> dict[str, int]:
    """``{"tokens_per_example": T}`` for a sequence task (batch sizes times T are tokens), else {}."""
    return {"tokens_per_example": task.tokens_per_example} if task.tokens_per_example > 1 else {}


def _nan_final() -> dict[str, float]:
    return {k: math.nan for k in ("train_loss", "train_metric", "val_loss", "val_metric")}


@dataclass
class _Member:
    """One run's state in the loop: its spec and schedule, its history, and how it ended."""

    spec: RunSpec
    schedule: Callable[[float], float]
    history: list[dict[str, Any]] = field(default_factory=list)
    loss_sum: float = 0.0
    """Sum of the training losses since the last evaluation (python floats: the losses are on the
    host for the divergence check anyway)."""
    threshold: float = math.inf
    """A loss above this ends the run: ``diverge_factor`` times its first loss."""
    diverged_at: int | None = None
    stopped_samples: int = 0

    @property
    def alive(self) -> bool:
        """Whether the run is still training."""
        return self.diverged_at is None

    def take(self, loss: float, step: int, samples: int) -> bool:
        """Count the batch loss of ``step``; True when it ends the run as diverged (non-finite, or
        above ``threshold``)."""
        self.loss_sum += loss
        if step == 1 and math.isfinite(loss):
            self.threshold = self.spec.diverge_factor * max(loss, 1e-12)
        if math.isfinite(loss) and loss <= self.threshold:
            return False
        self.diverged_at, self.stopped_samples = step, samples
        return True


def _evaluate(
    stepper: _Solo | _Ensemble,
    members: list[_Member],
    task: Task,
    p: Plan,
    at: tuple[int, int, int, float],
    n_since: int,
    clock: Callable[[], float],
) -> None:
    """Evaluate on the validation set and append a history row to every member still training;
    ``at`` is (step, samples, batch size, lr factor of the adaptive batch), ``n_since`` the steps
    since the last evaluation and ``clock()`` the wall time per member so far (read after the
    evaluation)."""
    step, samples, batch, scale = at
    val_loss, val_metric = (t.tolist() for t in stepper.evaluate(task.x_val, task.y_val))
    wall_s = clock()
    noise = stepper.noise_scale() or {H.NOISE_SCALE: None}
    for k, m in enumerate(members):
        if m.alive:
            m.history.append(
                {
                    H.STEP: step,
                    H.SAMPLES: samples,
                    H.EPOCH: samples / p.n_train,
                    H.LR: m.schedule(samples / m.spec.batch_size) * scale,
                    H.BATCH_SIZE: batch,
                    H.TRAIN_LOSS: m.loss_sum / n_since if n_since else math.nan,
                    H.VAL_LOSS: val_loss[k],
                    H.VAL_METRIC: val_metric[k],
                    H.WALL_S: wall_s,
                    **noise,
                }
            )
        m.loss_sum = 0.0


def _results(
    stepper: _Solo | _Ensemble,
    members: list[_Member],
    task: Task,
    p: Plan,
    done: tuple[int, int],
    wall_s: float,
    keep_weights: bool,
    device: torch.device,
) -> list[RunResult]:
    """One result per member after the loop: full-set final numbers of the runs that finished,
    ``diverged`` with NaN finals for the others; ``done`` is the loop's (steps, samples)."""
    val_loss, val_metric = stepper.evaluate(task.x_val, task.y_val)
    train_loss, train_metric = stepper.evaluate(task.x_train, task.y_train)
    k_members = len(members)
    results = []
    for k, m in enumerate(members):
        final = (
            {
                "train_loss": train_loss[k].item(),
                "train_metric": train_metric[k].item(),
                "val_loss": val_loss[k].item(),
                "val_metric": val_metric[k].item(),
            }
            if m.alive
            else _nan_final()
        )
        results.append(
            RunResult(
                spec=m.spec,
                status=RunStatus.OK if m.alive else RunStatus.DIVERGED,
                steps=done[0] if m.diverged_at is None else m.diverged_at,
                samples=done[1] if m.alive else m.stopped_samples,
                wall_s=wall_s / k_members,
                history=m.history,
                final=final,
                diverged_at=m.diverged_at,
                extra={
                    "ensemble_size": k_members,
                    "ensemble_wall_s": wall_s,
                    "device": str(device),
                    "threads": torch.get_num_threads(),
                    "metric": task.metric_name,
                    "n_train": p.n_train,
                    **_tokens(task),
                    **noise_summary(m.history),
                    **stepper.extra(),
                },
                weights=stepper.weights(k) if keep_weights and m.alive else None,
            )
        )
    return results


def _run(
    stepper: _Solo | _Ensemble,
    specs: Sequence[RunSpec],
    task: Task,
    p: Plan,
    progress: Progress | None,
    keep_weights: bool,
    device: torch.device,
) -> list[RunResult]:
    """Train the stepper's K members to the budget; return one result per member."""
    # setup: one record per member, one batch stream per distinct seed
    members = [_Member(s, lr_schedule(s, p)) for s in specs]
    streams: dict[int, BatchStream] = {}
    for s in specs:
        streams.setdefault(s.seed, BatchStream(p.n_train, s.seed, device))
    base = specs[0]  # the members share batch size, its schedule and the budget
    adaptive = stepper.adaptive
    tick = max(1, p.total_steps // 200)
    step = samples = n_since = 0
    start = time.perf_counter()

    def wall_per_member() -> float:
        return (time.perf_counter() - start) / len(members)

    def in_force() -> tuple[int, float]:  # the batch size and the lr factor at this point
        if adaptive is not None:
            return adaptive.batch_size, adaptive.lr_scale
        return batch_size_in_force(base, samples / p.n_train), 1.0

    _evaluate(stepper, members, task, p, (0, 0, *in_force()), 0, wall_per_member)
    finished = False
    while not finished and any(m.alive for m in members):
        # where we are in the budget: the batch size and each member's learning rate
        batch, scale = in_force()
        lrs = [m.schedule(samples / base.batch_size) * scale for m in members]

        # one optimizer step for every member, each on its own seed's batch
        idx = {seed: stream.next(batch) for seed, stream in streams.items()}
        losses = stepper.step([idx[m.spec.seed] for m in members], lrs).tolist()
        step, samples, n_since = step + 1, samples + batch, n_since + 1
        finished = step >= p.total_steps or samples >= p.max_samples

        # divergence: a non-finite or exploding loss ends that member at this step
        for k, (m, loss) in enumerate(zip(members, losses, strict=True)):
            if m.alive and m.take(loss, step, samples):
                stepper.stop(k)
                log.info("run %s diverged at step %d (loss %s)", m.spec.run_id, step, loss)

        # evaluation every eval_every steps and at the end of the budget
        if step % p.eval_every == 0 or finished:
            at = (step, samples, batch, scale)
            _evaluate(stepper, members, task, p, at, n_since, wall_per_member)
            n_since = 0

        # adaptive batch: the noise scale may grow the batch (and set the lr) for the next step
        if adaptive is not None:
            adaptive.update(step, samples, members[0].schedule(samples / base.batch_size))

        if progress is not None and (step % tick == 0 or finished):
            progress(p.total_steps if finished else step, p.total_steps)

    wall = time.perf_counter() - start
    return _results(stepper, members, task, p, (step, samples), wall, keep_weights, device)


# --------------------------------------------------------------------------------------------------
# Public entry points


def _resolve_task(spec: RunSpec, task: Task | None, device: torch.device) -> Task:
    if task is None:
        task = get_task(spec.task, **dict(spec.task_options))
    return task.to(device)


def failed_result(
    spec: RunSpec, error: str, *, wall_s: float = 0.0, extra: dict[str, Any] | None = None
) -> RunResult:
    """The result of a run that could not train (a failing model, a crashed worker)."""
    return RunResult(
        spec=spec,
        status=RunStatus.FAILED,
        steps=0,
        samples=0,
        wall_s=wall_s,
        final=_nan_final(),
        error=error,
        extra=extra or {},
    )


def _failed(spec: RunSpec, exc: BaseException, started: float) -> RunResult:
    log.warning("run %s failed: %s", spec.run_id, exc)
    return failed_result(
        spec,
        f"{type(exc).__name__}: {exc}",
        wall_s=time.perf_counter() - started,
        extra={"traceback": traceback.format_exc(limit=8)},
    )


def train(
    spec: RunSpec,
    *,
    task: Task | None = None,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
    keep_weights: bool = False,
) -> RunResult:
    """Train one run to its budget and return what it produced.

    Bad specs raise ``SpecError`` before any training; an exception during training is returned as a
    ``failed`` result, and a non-finite or exploding loss as ``diverged`` at its step.

    Args:
        spec: the frozen run description; its ``task`` is loaded unless ``task`` is given.
        task: an already built task (saves rebuilding data in sweeps).
        device: where to train; CUDA when present by default.
        progress: ``progress(steps_done, total_steps)`` callback.
        keep_weights: put the final weights in ``RunResult.weights``.
    """
    return train_ensemble(
        [spec], task=task, device=device, progress=progress, keep_weights=keep_weights
    )[0]


def ensemble_key(spec: RunSpec) -> str:
    """Specs with equal keys differ only in ``MEMBER_FIELDS`` and can train as one ensemble."""
    d = spec.to_dict()
    for name in MEMBER_FIELDS:
        d.pop(name)
    return json.dumps(d, sort_keys=True)


def ensemble_capacity(spec: RunSpec) -> int:
    """How many runs like ``spec`` one vectorized ensemble holds (``ENSEMBLE_ROWS`` batch rows)."""
    return max(1, ENSEMBLE_ROWS // spec.batch_size)


def _chunk_indices(specs: Sequence[RunSpec], max_members: int | None = None) -> list[list[int]]:
    """Positions of ``specs`` grouped by ``ensemble_key``, cut into chunks of at most
    ``max_members`` (default ``ensemble_capacity``), in input order."""
    groups: dict[str, list[int]] = {}
    for i, spec in enumerate(specs):
        groups.setdefault(ensemble_key(spec), []).append(i)
    chunks = []
    for group in groups.values():
        size = max_members or ensemble_capacity(specs[group[0]])
        chunks.extend(group[lo : lo + size] for lo in range(0, len(group), size))
    return chunks


def ensemble_chunks(specs: Sequence[RunSpec]) -> list[list[RunSpec]]:
    """Specs grouped as ``train_ensemble`` trains them at once: same ``ensemble_key``, at most
    ``ensemble_capacity`` per chunk, in input order (what a sweep worker gets as one unit)."""
    return [[specs[i] for i in chunk] for chunk in _chunk_indices(specs)]


def can_vectorize(task: Task, spec: RunSpec | None = None) -> tuple[bool, str]:
    """Whether runs of ``task`` (and ``spec``) can train as a ``vmap`` ensemble, and why not."""
    if spec is not None and spec.micro_batch_size is not None:
        return False, "gradient accumulation runs solo"
    if spec is not None and spec.noise_scale:
        return False, "noise-scale measurement runs solo"
    if task.train_solo:
        return False, task.train_solo
    dev = task.x_train.device
    model = task.make_model(0).to(dev)
    if any(True for _ in model.buffers()):
        return False, "the model has buffers (e.g. batch norm), which vmap cannot update"
    if not all(p.requires_grad for p in model.parameters()):
        return False, "the model has frozen parameters, which the vectorized optimizer would update"
    try:
        from torch.func import functional_call, stack_module_state, vmap

        params, _ = stack_module_state([model, task.make_model(1).to(dev)])
        base = copy.deepcopy(model).to("meta")
        vmap(lambda p, x: functional_call(base, p, (x,)), in_dims=(0, None))(
            params, task.x_train[:2]
        )
    except Exception as exc:  # torch.func raises many kinds of errors for unsupported models
        return False, f"torch.func cannot vectorize the model ({type(exc).__name__}: {exc})"
    return True, ""


def train_ensemble(
    specs: Sequence[RunSpec],
    *,
    task: Task | None = None,
    device: str | torch.device | None = None,
    progress: Progress | None = None,
    keep_weights: bool = False,
    max_members: int | None = None,
) -> list[RunResult]:
    """Train many runs, vectorizing those that share a batch size and budget; results in input order.

    Specs that differ only in ``MEMBER_FIELDS`` (lr, seed, momentum, ...) train as one stacked model
    of at most ``max_members`` members (default: as many as fit ``ENSEMBLE_ROWS`` batch rows); the
    rest, and models ``torch.func`` cannot handle, train solo (logged once, with the reason).
    """
    if not specs:
        return []
    dev = resolve_device(device)
    tasks: dict[str, Task] = {}
    vectorizable: dict[str, tuple[bool, str]] = {}
    total = sum(plan(s, _task_for(s, task, tasks, dev).n_train).total_steps for s in specs)
    done_before = 0
    out: list[RunResult | None] = [None] * len(specs)
    for chunk in _chunk_indices(specs, max_members):
        first = specs[chunk[0]]
        t = _task_for(first, task, tasks, dev)
        p = plan(first, t.n_train)
        log.info(p.describe(first) + (f" ({len(chunk)} runs)" if len(chunk) > 1 else ""))
        key = ensemble_key(first)
        if len(chunk) > 1 and key not in vectorizable:  # once per group, not per chunk
            vectorizable[key] = can_vectorize(t, first)
        ok, why = vectorizable[key] if len(chunk) > 1 else (True, "")
        if not ok:
            log.info("%s: %d runs train one after another: %s", first.task, len(chunk), why)
        for group in [chunk] if ok else [[i] for i in chunk]:
            group_specs = [specs[i] for i in group]

            def report(
                done: int, _total: int, offset: int = done_before, n: int = len(group)
            ) -> None:
                if progress is not None:
                    progress(offset + done * n, total)

            started = time.perf_counter()
            try:
                if len(group) == 1:
                    stepper: _Solo | _Ensemble = _Solo(t, group_specs[0], dev)
                else:
                    stepper = _Ensemble(t, group_specs, dev)
                results = _run(stepper, group_specs, t, p, report, keep_weights, dev)
            except SpecError:
                raise
            except Exception as exc:  # a user model or task can fail in any way: record it, go on
                results = [_failed(s, exc, started) for s in group_specs]
            for i, r in zip(group, results, strict=True):
                out[i] = r
            done_before += p.total_steps * len(group)
    return [r for r in out if r is not None]


def _task_for(spec: RunSpec, given: Task | None, cache: dict[str, Task], dev: torch.device) -> Task:
    """The task of ``spec``, built once per distinct (task, options)."""
    key = json.dumps([spec.task, spec.task_options], default=str)
    if key not in cache:
        cache[key] = _resolve_task(spec, given, dev)
    return cache[key]


def build_model(task: Task, spec: RunSpec, weights: dict[str, Tensor] | None = None) -> nn.Module:
    """``task.make_model(spec.seed)``, with ``weights`` loaded when given (e.g. from the store)."""
    model = task.make_model(spec.seed)
    if weights is not None:
        check_weights(model, weights, spec.run_id)
        model.load_state_dict(weights)
    return model


def check_weights(model: nn.Module, weights: dict[str, Tensor], run_id: str) -> None:
    """Weights (e.g. read from a store) must match ``model``'s state dict: names, shapes, dtypes.

    Raises ``SpecError("weights", "run <id>: ...")`` naming the first mismatch, so a damaged or
    foreign blob is one clear error instead of a silent cast or a torch traceback.
    """
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(weights)), sorted(set(weights) - set(expected))
    if missing or unexpected:
        raise SpecError(
            "weights",
            f"run {run_id}: tensor names do not fit the model (missing: "
            f"{', '.join(missing[:3]) or 'none'}; unexpected: {', '.join(unexpected[:3]) or 'none'})",
        )
    for name, ref in expected.items():
        got = weights[name]
        if not isinstance(got, Tensor) or got.shape != ref.shape or got.dtype != ref.dtype:
            what = (
                f"{got.dtype} {tuple(got.shape)}" if isinstance(got, Tensor) else type(got).__name__
            )
            raise SpecError(
                "weights",
                f"run {run_id}: {name} is {what}, the model needs {ref.dtype} {tuple(ref.shape)}",
            )
