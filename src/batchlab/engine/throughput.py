"""Throughput: seconds per optimizer step against batch size for a task on a device.

Each batch size trains ``warmup`` steps untimed (allocator, kernel selection, lazy optimizer
state), then times ``repeats`` steps one by one (CUDA: synchronised) and keeps the median. A step
is what the engine does per update: an index slice of a permutation of the training set,
forward, backward and the spec's optimizer (``optim.from_spec``, fused where torch has it).

Largest batch that fits: on CUDA the peak allocated memory of each measured batch size is fitted
as ``m0 + m1 B`` and solved for ``MEMORY_SHARE`` of the device's memory; a batch that runs out of
memory stops the search there. On the CPU memory is not measured: the limit is the training-set
size (the engine's own limit on a batch) or the ``max_batch`` given. A batch size beyond the limit
is timed as a gradient-accumulation step of equal micro-batches.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import torch

from batchlab.core.plan import ThroughputTable
from batchlab.engine import optim
from batchlab.engine.data import resolve_device
from batchlab.engine.spec import RunSpec, SpecError
from batchlab.engine.tasks import Task

log = logging.getLogger(__name__)

MEMORY_SHARE = 0.9
"""Share of a CUDA device's memory the largest batch may use (the rest: allocator, fragmentation)."""


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _cuda_limit(
    sizes: Sequence[int], peaks: Sequence[float], device: torch.device, n_train: int
) -> int:
    """Largest batch whose fitted peak memory stays within ``MEMORY_SHARE`` of the device."""
    total = torch.cuda.get_device_properties(device).total_memory * MEMORY_SHARE
    if len(set(sizes)) < 2:
        return min(n_train, int(max(sizes) * total / max(peaks)))
    slope, intercept = np.polyfit(np.asarray(sizes, float), np.asarray(peaks, float), 1)
    if slope <= 0:
        return n_train
    return max(1, min(n_train, int((total - intercept) / slope)))


def measure_throughput(
    task: Task,
    batch_sizes: Sequence[int],
    *,
    device: str | torch.device | None = None,
    optimizer: str = "sgd",
    lr: float = 0.01,
    repeats: int = 7,
    warmup: int = 3,
    max_batch: int | None = None,
    seed: int = 0,
) -> ThroughputTable:
    """Median seconds per optimizer step of ``task`` at each batch size, and the memory limit."""
    dev = resolve_device(device)
    if repeats < 1:
        raise SpecError("repeats", f"must be >= 1, got {repeats}")
    if warmup < 0:
        raise SpecError("warmup", f"must be >= 0, got {warmup}")
    sizes = sorted({int(b) for b in batch_sizes})
    if not sizes or sizes[0] < 1:
        raise SpecError("batch_sizes", f"must be integers >= 1, got {list(batch_sizes)}")
    limit = task.n_train if max_batch is None else int(max_batch)
    if limit < 1:
        raise SpecError("max_batch", f"must be an integer >= 1, got {max_batch}")
    source = "given" if max_batch is not None else "cpu: the training-set size (memory unmeasured)"
    task = task.to(dev)
    model = task.make_model(seed).to(dev)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    spec = RunSpec(task=task.name, batch_size=sizes[0], lr=lr, optimizer=optimizer)
    opt = optim.from_spec(spec, params)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(task.n_train, generator=gen).to(dev)

    def step(b: int, at: int) -> None:
        micro = math.ceil(b / limit)
        opt.zero_grad(set_to_none=True)
        idx = perm[(torch.arange(b, device=dev) + at) % task.n_train]
        for chunk in idx.chunk(micro):
            loss = task.loss_fn(model(task.x_train[chunk]), task.y_train[chunk])
            (loss * (chunk.numel() / b)).backward()
        opt.step()

    seconds, spread, peaks, measured = [], [], [], []
    for b in sizes:
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        try:
            times = []
            for i in range(warmup + repeats):
                _sync(dev)
                start = time.perf_counter()
                step(b, i * b)
                _sync(dev)
                times.append(time.perf_counter() - start)
        except torch.OutOfMemoryError:
            log.info("batch %d runs out of memory on %s: the limit is below it", b, dev)
            torch.cuda.empty_cache()
            limit, source = max(1, measured[-1] if measured else b // 2), "cuda: out of memory"
            break
        timed = np.asarray(times[warmup:])
        seconds.append(float(np.median(timed)))
        q1, q3 = np.percentile(timed, [25, 75])
        spread.append(float(q3 - q1))
        peaks.append(float(torch.cuda.max_memory_allocated(dev)) if dev.type == "cuda" else None)
        measured.append(b)
        log.info("batch %d: %.3g ms per step", b, 1e3 * seconds[-1])
    if not measured:
        raise SpecError("batch_sizes", f"none of {sizes} fits in the memory of {dev}")
    if dev.type == "cuda" and max_batch is None and source != "cuda: out of memory":
        limit = _cuda_limit(measured, [p or 0.0 for p in peaks], dev, task.n_train)
        source = f"cuda: peak memory fitted, {MEMORY_SHARE:.0%} of the device"
    return ThroughputTable(
        device=str(dev),
        task=task.name,
        optimizer=optimizer,
        batch_sizes=tuple(measured),
        seconds=tuple(seconds),
        spread=tuple(spread),
        repeats=repeats,
        warmup_steps=warmup,
        max_batch=limit,
        max_batch_source=source,
        peak_memory=tuple(peaks),
    )
