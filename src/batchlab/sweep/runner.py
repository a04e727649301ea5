"""Run a sweep: plan, skip what is stored, train the rest in units, store each result as it arrives.

A *unit* is one ``train_ensemble`` call: runs that differ only in lr and seed (one batch size),
at most as many as the engine vectorizes at once. Units go to one of three executors:

- ``inline``: in this process, one after another (torch's default threads).
- ``local``: a pool of worker processes on this machine (``workers``, each with
  ``cores // workers`` torch threads: small models train fastest one thread per core). Workers die
  with the driver, even on ``kill -9`` (``PR_SET_PDEATHSIG`` on Linux, a parent watcher elsewhere),
  and ignore SIGINT from birth: Ctrl-C reaches the whole process group, and only the driver decides
  what it stops.
- ``ray``: one Ray task per unit, never a single tiny run (Ray costs seconds per start and about
  0.6 GB idle). Without ``address`` a local Ray starts with its files in a fresh temporary folder
  (logged, removed afterwards) and a per-process auth token in the environment, so nothing is
  written to the home directory; it is shut down at the end.

Only the driver writes the store, one transaction per unit, so a driver killed at any moment
leaves every run stored completely or not at all; rerunning the sweep plans the same ids and
skips those finished (``ok`` or ``diverged``), and failed ones unless ``retry_failed``. On
``KeyboardInterrupt`` (Ctrl-C) in the driver the units in training are dropped, never stored: the
pool's workers are killed, Ray's tasks cancelled, and the interrupt goes on to the caller.

``run_sweep`` runs a ``SweepSpec``; ``run_specs`` runs any RunSpecs grouped by study (what
``batchlab reproduce`` uses), training a run shared by several studies once.
"""

from __future__ import annotations

import ctypes
import dataclasses
import importlib.util
import logging
import math
import multiprocessing
import os
import secrets
import shutil
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Collection, Generator, Iterator, Mapping, Sequence
from concurrent.futures import Future, ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from batchlab.engine.data import configure_threads, resolve_device
from batchlab.engine.spec import RunResult, RunSpec, RunStatus, SpecError
from batchlab.engine.tasks import Task, get_task
from batchlab.engine.train import ensemble_chunks, failed_result, train_ensemble
from batchlab.engine.train import plan as plan_run
from batchlab.sweep.spec import SweepSpec, Target, check, plan
from batchlab.sweep.store import Store

log = logging.getLogger(__name__)

EXECUTORS = ("inline", "local", "ray")
PARENT_POLL_S = 1.0
"""How often a worker on a system without ``PR_SET_PDEATHSIG`` checks that its driver lives."""

RAY_WAIT_S = 0.5
"""Longest the driver waits inside Ray at a time (Ray's blocking wait delays a Ctrl-C)."""

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


def cpu_count() -> int:
    """Cores this process may use (its CPU affinity where the OS tells it)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def threads_per_worker(workers: int) -> int:
    """Torch threads for each of ``workers`` processes: the cores shared out, at least one."""
    return max(1, cpu_count() // workers)


def run_unit(
    specs: Sequence[RunSpec],
    threads: int | None = None,
    device: str | None = None,
    keep_weights: bool = False,
) -> list[RunResult]:
    """Train one unit (what a worker or Ray task runs) and return its results."""
    configure_threads(threads)
    return train_ensemble(list(specs), device=device, keep_weights=keep_weights)


# --------------------------------------------------------------------------------------------------
# Progress and summary


@dataclass(frozen=True)
class Best:
    """The best run so far by the sweep's target metric (final value over the full set)."""

    id: str
    batch_size: int
    lr: float
    seed: int
    metric: str
    value: float


@dataclass
class SweepReport:
    """What a sweep did; also the live state passed to the progress callback while it runs.

    ``done`` counts the runs trained so far in this call (fractional while an inline unit trains).
    """

    study: str
    executor: str
    workers: int
    planned: int
    skipped: int
    to_run: int
    done: float = 0.0
    ok: int = 0
    diverged: int = 0
    failed: int = 0
    wall_s: float = 0.0
    best: Best | None = None
    metric: str = "val_metric"
    higher_is_better: bool = True

    def count(self, status: str) -> None:
        """Add one finished run to the count of its status."""
        match RunStatus(status):
            case RunStatus.OK:
                self.ok += 1
            case RunStatus.DIVERGED:
                self.diverged += 1
            case RunStatus.FAILED:
                self.failed += 1

    def consider(self, run_id: str, spec: RunSpec, status: str, final: dict[str, Any]) -> None:
        """Update ``best`` with one finished run."""
        value = final.get(self.metric, math.nan)
        if status != RunStatus.OK or value is None or not math.isfinite(value):
            return
        better = self.best is None or (
            value > self.best.value if self.higher_is_better else value < self.best.value
        )
        if better:
            self.best = Best(run_id, spec.batch_size, spec.lr, spec.seed, self.metric, value)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary (``batchlab sweep --json``)."""
        return {
            "study": self.study,
            "executor": self.executor,
            "workers": self.workers,
            "planned": self.planned,
            "skipped": self.skipped,
            "ran": self.ok + self.diverged + self.failed,
            "ok": self.ok,
            "diverged": self.diverged,
            "failed": self.failed,
            "wall_s": self.wall_s,
            "best": None if self.best is None else dataclasses.asdict(self.best),
        }


SweepProgress = Callable[[SweepReport], None]


# --------------------------------------------------------------------------------------------------
# Executors: each yields (unit, results or the error that stopped the unit) as units finish;
# closing one early (Ctrl-C) drops the units in training and stops its workers


Outcome = tuple[list[RunSpec], list[RunResult] | BaseException]


def _keeps(unit: list[RunSpec], weighted: set[str]) -> bool:
    return any(s.run_id in weighted for s in unit)


def _inline(
    todo: list[list[RunSpec]],
    tasks: dict[tuple[str, tuple[Any, ...]], Task],
    device: str | None,
    weighted: set[str],
    on_steps: Callable[[float], None],
) -> Generator[Outcome, None, None]:
    for unit in todo:

        def progress(done: int, total: int, n: int = len(unit)) -> None:
            on_steps(n * done / max(total, 1))

        task = tasks[(unit[0].task, unit[0].task_options)]
        keep = _keeps(unit, weighted)
        yield (
            unit,
            train_ensemble(unit, task=task, device=device, progress=progress, keep_weights=keep),
        )


def _die_with_parent(parent: int) -> None:
    """Make this worker process end when ``parent`` (the driver) does, however it ends."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    else:

        def watch() -> None:
            while os.getppid() == parent:
                time.sleep(PARENT_POLL_S)
            os._exit(1)

        threading.Thread(target=watch, name="batchlab-parent-watch", daemon=True).start()
    if os.getppid() != parent:  # the driver died before the signal was armed
        os._exit(1)


def _init_worker(parent: int, path: list[str]) -> None:
    """Pool initializer: die with the driver, leave Ctrl-C to it, see its ``sys.path`` (a user's
    task module)."""
    _die_with_parent(parent)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # mostly inherited already: see _sigint_ignored
    sys.path[:] = path


@contextmanager
def _sigint_ignored() -> Iterator[None]:
    """Ignore SIGINT while the pool starts its workers, so each inherits the ignore from birth.

    A worker hit by Ctrl-C while still importing torch would die with a traceback (or, later, hand
    back a ``KeyboardInterrupt`` as a failed unit); an ignored disposition survives ``exec``. A
    Ctrl-C in these milliseconds is lost; signal handlers can only change in the main thread.
    """
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous if previous is not None else signal.SIG_DFL)


def _local(
    todo: list[list[RunSpec]], workers: int, device: str | None, weighted: set[str]
) -> Generator[Outcome, None, None]:
    threads = threads_per_worker(workers)
    log.info("local pool: %d worker processes x %d torch threads", workers, threads)
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=multiprocessing.get_context("spawn"),  # fork under torch's threads can deadlock
        initializer=_init_worker,
        initargs=(os.getpid(), list(sys.path)),
    )
    futures: dict[Future[list[RunResult]], list[RunSpec]] = {}
    try:
        with _sigint_ignored():  # the workers start in the first submits
            for unit in todo:
                futures[pool.submit(run_unit, unit, threads, device, _keeps(unit, weighted))] = unit
        for future in as_completed(futures):
            error = future.exception()
            yield futures[future], future.result() if error is None else error
    except BaseException:  # Ctrl-C, or the caller stopped: drop the units in training now
        dropped = sum(not f.done() for f in futures)
        workers_now = list(pool._processes.values())  # no public way to stop them before 3.14
        log.info("stopping %d worker processes; %d units dropped", len(workers_now), dropped)
        for process in workers_now:
            process.kill()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _import_ray() -> Any:
    try:
        import ray
    except ImportError as exc:
        raise SpecError("executor", "ray is not installed: pip install 'batchlab[ray]'") from exc
    return ray


@contextmanager
def ray_session(address: str | None, workers: int) -> Iterator[Any]:
    """Connect to the Ray cluster at ``address``, or start a local one with ``workers`` CPUs."""
    if address is not None:
        ray = _import_ray()
        log.info("connecting to the Ray cluster at %s", address)
        ray.init(address=address, log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()
        return
    _quiet_local_ray()
    temp = tempfile.mkdtemp(prefix="batchlab-ray-")
    log.info("starting a local Ray (%d CPUs, no dashboard); its files go to %s", workers, temp)
    try:
        ray = _import_ray()
        ray.init(num_cpus=workers, include_dashboard=False, _temp_dir=temp, log_to_driver=False)
        try:
            yield ray
        finally:
            ray.shutdown()
            log.info("local Ray shut down; removed %s", temp)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def _quiet_local_ray() -> None:
    """Keep a local Ray from writing to the home directory or reporting usage.

    Ray 2.5x saves a new auth token to ``~/.ray/auth_token`` unless one is in the environment; this
    puts a random one in this process's environment (in memory only, inherited by Ray's processes).
    Ray reads its auth mode once, when imported, so this must run before ``import ray``.
    """
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if "RAY_AUTH_MODE" in os.environ:
        return
    if "ray" in sys.modules:
        log.warning(
            "ray was imported before batchlab started it, so Ray may save an auth token to "
            "~/.ray/auth_token (set RAY_AUTH_MODE and RAY_AUTH_TOKEN to avoid that)"
        )
        return
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(32))


def _ray(
    todo: list[list[RunSpec]],
    workers: int,
    address: str | None,
    device: str | None,
    weighted: set[str],
) -> Generator[Outcome, None, None]:
    with ray_session(address, workers) as ray:
        # Ray hides GPUs from tasks that ask for none: with CUDA, each unit asks for a share
        gpus = ray.cluster_resources().get("GPU", 0.0) if device != "cpu" else 0.0
        share = min(1.0, gpus / workers) if gpus else 0.0
        remote = ray.remote(num_cpus=1, num_gpus=share)(run_unit)
        pending = {remote.remote(unit, 1, device, _keeps(unit, weighted)): unit for unit in todo}
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1, timeout=RAY_WAIT_S)
                if not done:
                    continue
                (ready,) = done
                unit = pending.pop(ready)
                try:
                    outcome: list[RunResult] | BaseException = ray.get(ready)
                except Exception as exc:  # a task's error arrives as RayTaskError: the unit failed
                    outcome = exc
                yield unit, outcome
        except BaseException:  # Ctrl-C, or the caller stopped: a cluster must not train on
            log.info("cancelling %d Ray tasks", len(pending))
            for ref in pending:
                ray.cancel(ref, force=True)
            raise


# --------------------------------------------------------------------------------------------------
# The driver


def check_executor(executor: str | None, workers: int | None, address: str | None) -> str:
    """The executor to use (default: ``local`` for ``workers > 1``, else ``inline``); SpecError if bad."""
    if executor is None:
        executor = "local" if workers is not None and workers > 1 else "inline"
    if executor not in EXECUTORS:
        raise SpecError("executor", f"must be one of {', '.join(EXECUTORS)}, got {executor!r}")
    if workers is not None and workers < 1:
        raise SpecError("workers", f"must be >= 1, got {workers}")
    if address is not None and executor != "ray":
        raise SpecError("address", "is for the ray executor")
    if executor == "ray" and importlib.util.find_spec("ray") is None:
        raise SpecError("executor", "ray is not installed: pip install 'batchlab[ray]'")
    return executor


def check_specs(
    specs: Sequence[RunSpec], task: Task | None = None
) -> dict[tuple[str, tuple[Any, ...]], Task]:
    """Validate every spec against its task (``task`` for all, else each one's built once).

    Returns the tasks by ``(name, options)``; raises ``SpecError`` before anything runs.
    """
    tasks: dict[tuple[str, tuple[Any, ...]], Task] = {}
    for spec in specs:
        key = (spec.task, spec.task_options)
        if key not in tasks:
            tasks[key] = (
                task if task is not None else get_task(spec.task, **dict(spec.task_options))
            )
        plan_run(spec, tasks[key].n_train)
    return tasks


def run_specs(
    studies: Mapping[str, Sequence[RunSpec]],
    store: Store,
    *,
    executor: str | None = None,
    workers: int | None = None,
    address: str | None = None,
    retry_failed: bool = False,
    task: Task | None = None,
    device: str | None = None,
    keep_weights: Collection[str] = (),
    target: Target | None = None,
    progress: SweepProgress | None = None,
) -> SweepReport:
    """Train the runs of ``studies`` (name -> specs) not yet in ``store``; store and link each.

    A run planned by several studies trains once and is linked to all of them. Raises
    ``SpecError`` before anything is trained or stored for a bad spec or executor choice.

    Args:
        studies: the runs of each study (the same spec in two studies is one run).
        store: the open store; only this process writes it.
        executor: ``inline``, ``local`` (process pool) or ``ray`` (see ``check_executor``).
        workers: processes (``local``) or CPUs of a local Ray; default: the cores available.
        address: an existing Ray cluster (``ray`` only).
        retry_failed: train runs stored as ``failed`` again.
        task: the task of every spec, already built (inline runs use it; workers build their own).
        device: where runs train; CUDA when present by default.
        keep_weights: studies whose runs' final weights are stored too.
        target: what "best" means in the report (default: the highest final ``val_metric``).
        progress: called with the live ``SweepReport`` after each stored unit and during inline units.
    """
    executor = check_executor(executor, workers, address)
    if executor != "ray":  # a Ray cluster's devices are its nodes', not the driver's
        resolve_device(device)  # a bad name fails here, not as a failed result per run
    n_workers = 1 if executor == "inline" else workers or cpu_count()
    member_of: dict[str, list[str]] = {}
    specs: dict[str, RunSpec] = {}
    for study, study_specs in studies.items():
        for spec in study_specs:
            specs.setdefault(spec.run_id, spec)
            member_of.setdefault(spec.run_id, []).append(study)
    tasks = check_specs(list(specs.values()), task)
    keep = store.finished_ids() & specs.keys()
    if not retry_failed:
        keep |= {r.id for r in store.runs(status="failed")} & specs.keys()
    for study, study_specs in studies.items():
        store.link(study, [s.run_id for s in study_specs if s.run_id in keep])
    todo = [s for run_id, s in specs.items() if run_id not in keep]
    report = SweepReport(
        study=", ".join(studies),
        executor=executor,
        workers=n_workers,
        planned=len(specs),
        skipped=len(keep),
        to_run=len(todo),
        metric=target.metric if target else "val_metric",
        higher_is_better=target.higher_is_better if target else True,
    )
    for record in {r.id: r for study in studies for r in store.runs(study)}.values():
        if record.id in keep:
            report.consider(record.id, record.spec, record.status, record.final)
    batches = ensemble_chunks(todo)
    log.info(
        "study %s: %d runs planned, %d already stored, %d to train in %d units (%s executor)",
        report.study,
        len(specs),
        len(keep),
        len(todo),
        len(batches),
        executor,
    )
    weighted = {run_id for run_id, names in member_of.items() if set(names) & set(keep_weights)}
    started = time.perf_counter()
    finished = 0

    def tick(partial: float = 0.0) -> None:
        report.done = finished + partial
        report.wall_s = time.perf_counter() - started
        if progress is not None:
            progress(report)

    tick()
    outcomes: Generator[Outcome, None, None]
    if executor == "inline" or not batches:  # nothing to train: start no workers and no Ray
        outcomes = _inline(batches, tasks, device, weighted, tick)
    elif executor == "local":
        outcomes = _local(batches, n_workers, device, weighted)
    else:
        outcomes = _ray(batches, n_workers, address, device, weighted)
    try:
        for unit, outcome in outcomes:
            if isinstance(outcome, BaseException):
                log.warning("a unit of %d runs failed: %r", len(unit), outcome)
                outcome = [failed_result(s, f"{type(outcome).__name__}: {outcome}") for s in unit]
            _store(store, outcome, member_of, weighted)
            for result in outcome:
                report.count(result.status)
                report.consider(result.run_id, result.spec, result.status, result.final)
            finished += len(unit)
            tick()
    finally:  # interrupted between units (Ctrl-C while storing one): stop the executor now
        outcomes.close()
    return report


def _store(
    store: Store, results: list[RunResult], member_of: dict[str, list[str]], weighted: set[str]
) -> None:
    """Put a unit's results, each with its first study in one transaction; link the other studies."""
    by_study: dict[str, list[RunResult]] = {}
    for result in results:
        by_study.setdefault(member_of[result.run_id][0], []).append(result)
    for study, group in by_study.items():
        weights = [r.weights if r.run_id in weighted else None for r in group]
        store.put_many(group, study=study, weights=weights)
    for result in results:
        for study in member_of[result.run_id][1:]:
            store.link(study, [result.run_id])


def run_sweep(
    sweep: SweepSpec, store: Store, *, task: Task | None = None, **options: Any
) -> SweepReport:
    """Train every planned run of ``sweep`` not yet in ``store``; save its config with the study.

    ``task`` and ``options`` (``executor``, ``workers``, ``address``, ``retry_failed``, ``device``,
    ``progress``) are those of ``run_specs``, which declares their defaults; the sweep's target
    says which run is best. Raises ``SpecError`` (before anything is trained or stored) for a bad
    sweep or executor choice.
    """
    check_executor(options.get("executor"), options.get("workers"), options.get("address"))
    task = check(sweep, task)
    store.set_study(sweep.study, sweep.to_dict())
    return run_specs({sweep.study: plan(sweep)}, store, task=task, target=sweep.target, **options)
