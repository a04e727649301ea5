"""Step-time overhead of each GradientNoiseScale mode against the same loop without it, in one run.

``fashion-mlp`` (784-256-256-10, SGD with momentum) at batch 512, one torch thread: the step is
``zero_grad``, forward, backward and ``optimizer.step()``. ``per_example-transformer``: the same against
plain training of a small byte-level causal transformer (2 ``nn.TransformerEncoderLayer`` blocks of
width 128, 4 heads, 64 tokens, tied embedding and head; ``--lm-batch`` sequences of random bytes);
``per_example-fortunes-gpt``: the same on the built-in ``fortunes-gpt`` task (its model and text,
``--lm-batch`` sequences; left out when Debian's fortunes are not installed). Baselines: plain training for ``split`` (4
ways) and ``per_example``; the same 4 x 128 accumulation loop for ``accumulation``; plain 2-rank DDP
(gloo, 256 per rank, one process per rank) for ``distributed``. Each number is the median over
``--repeats`` blocks of ``--steps`` steps, variants alternating so they share the machine's noise;
wall-clock step time and, for a machine shared with other work, the process's CPU time per step.
Falls back to random data of Fashion-MNIST's shape when the dataset is not installed (timing does not
depend on the values).

    python benchmarks/bench_noise.py [--batch-size 512] [--lm-batch 32] [--steps 8] [--repeats 25] [--json]
"""

from __future__ import annotations

import argparse
import copy
import json
import socket
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from _common import parse_args, print_json, print_table
from batchlab.engine.data import configure_threads, default_device
from batchlab.engine.monitor import GradientNoiseScale
from batchlab.engine.spec import SpecError
from batchlab.engine.tasks import get_task

TARGETS = {
    "accumulation": 0.05,
    "distributed": 0.05,
    "per_example": 0.50,
    "split": 0.25,
    "per_example-transformer": 0.30,
    "per_example-fortunes-gpt": 0.30,
}
BASELINES = {
    "accumulation": "plain-accumulation",
    "distributed": "plain-ddp",
    "split": "plain",
    "per_example": "plain",
    "per_example-transformer": "plain",
    "per_example-fortunes-gpt": "plain",
}
LM_VOCAB, LM_WIDTH, LM_SEQ, LM_HEADS = 256, 128, 64, 4
LOCAL_MODES = ("accumulation", "split", "per_example")
POOL = 8  # distinct batches cycled through


def fashion_mlp(batch_size: int) -> tuple[nn.Module, Tensor, Tensor, str]:
    """The task's model and ``POOL`` batches of its training data (random data if it is missing)."""
    try:
        task = get_task("fashion-mlp")
        idx = torch.randperm(task.n_train, generator=torch.Generator().manual_seed(0))
        idx = idx[: POOL * batch_size]
        return task.make_model(0), task.x_train[idx], task.y_train[idx], "fashion-mnist"
    except SpecError:
        gen = torch.Generator().manual_seed(0)
        x = torch.rand(POOL * batch_size, 784, generator=gen)
        y = torch.randint(0, 10, (POOL * batch_size,), generator=gen)
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10)
        )
        return model, x, y, "random (Fashion-MNIST not installed)"


class CausalLM(nn.Module):
    """Byte-level causal transformer: token + position embeddings, pre-norm encoder blocks under a
    causal mask, final LayerNorm, a head tied to the token embedding."""

    def __init__(self, layers: int = 2) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(LM_VOCAB, LM_WIDTH), nn.Embedding(LM_SEQ, LM_WIDTH)
        block = nn.TransformerEncoderLayer(
            LM_WIDTH, LM_HEADS, 4 * LM_WIDTH, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(LM_WIDTH)
        self.head = nn.Linear(LM_WIDTH, LM_VOCAB, bias=False)
        self.head.weight = self.tok.weight
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(LM_SEQ))

    def forward(self, idx: Tensor) -> Tensor:
        x = self.tok(idx) + self.pos(torch.arange(idx.shape[1], device=idx.device))
        return self.head(self.norm(self.blocks(x, mask=self.mask, is_causal=True)))


def lm_loss(logits: Tensor, y: Tensor) -> Tensor:
    """Mean next-token cross-entropy."""
    return nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())


def lm_batches(batch_size: int) -> tuple[nn.Module, list[Tensor], list[Tensor]]:
    """The model and ``POOL`` batches of random byte sequences with next-byte targets."""
    gen = torch.Generator().manual_seed(0)
    seq = torch.randint(0, LM_VOCAB, (POOL, batch_size, LM_SEQ + 1), generator=gen)
    torch.manual_seed(0)
    return CausalLM(), list(seq[..., :-1]), list(seq[..., 1:])


def fortunes_batches(batch_size: int) -> tuple[nn.Module, list[Tensor], list[Tensor], Callable]:
    """The built-in ``fortunes-gpt`` task's model, ``POOL`` batches of its training text and its
    loss (raises ``SpecError`` when Debian's fortunes are not installed)."""
    task = get_task("fortunes-gpt", n_train=POOL * batch_size)
    xs, ys = task.x_train.split(batch_size), task.y_train.split(batch_size)
    return task.make_model(0), list(xs), list(ys), task.loss_fn


def timed(step: Callable[[], None], steps: int, device: torch.device) -> tuple[float, float]:
    """Wall-clock and process CPU seconds per step over ``steps`` steps."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - wall) / steps, (time.process_time() - cpu) / steps


def measure_pairs(
    pairs: dict[str, tuple[Callable[[], None], Callable[[], None]]],
    args: argparse.Namespace,
    device: torch.device,
    before_block: Callable[[], None] = lambda: None,
) -> dict[str, dict[str, float]]:
    """For each mode, its baseline block then its monitored block, ``args.repeats`` times: median
    step times and the median over repeats of the monitored/baseline ratio (wall and CPU)."""
    blocks: dict[str, list[tuple[float, float, float, float]]] = {m: [] for m in pairs}
    for baseline, monitored in pairs.values():
        timed(baseline, 3, device)  # warm-up
        timed(monitored, 3, device)
    for _ in range(args.repeats):
        for mode, (baseline, monitored) in pairs.items():
            before_block()
            base = timed(baseline, args.steps, device)
            before_block()
            blocks[mode].append((*base, *timed(monitored, args.steps, device)))
    med = statistics.median
    return {
        mode: {
            "baseline_ms": 1e3 * med(b[0] for b in rows),
            "ms": 1e3 * med(b[2] for b in rows),
            "overhead": med(b[2] / b[0] for b in rows) - 1,
            "cpu_overhead": med(b[3] / b[1] for b in rows) - 1,
        }
        for mode, rows in blocks.items()
    }


def make_step(
    kind: str,
    model: nn.Module,
    xs: list[Tensor],
    ys: list[Tensor],
    n_micro: int,
    loss_fn: Callable[[Tensor, Tensor], Tensor] = nn.functional.cross_entropy,
) -> Callable[[], None]:
    """One training step of ``kind``: plain, plain-accumulation, or a monitor mode."""
    opt = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    monitored = kind in TARGETS
    gns = GradientNoiseScale(model, kind, loss_fn=loss_fn, n_micro=n_micro) if monitored else None
    state = {"i": 0}

    def step() -> None:
        x, y = xs[state["i"] % POOL], ys[state["i"] % POOL]
        state["i"] += 1
        opt.zero_grad(set_to_none=True)
        if kind in ("split", "per_example"):
            gns.forward_backward(x, y)
        elif kind == "plain":
            loss_fn(model(x), y).backward()
        else:  # accumulation, with or without the monitor
            for xm, ym in zip(x.chunk(n_micro), y.chunk(n_micro), strict=True):
                (loss_fn(model(xm), ym) * (len(xm) / len(x))).backward()
                if gns is not None:
                    gns.after_backward(len(xm))
            if gns is not None:
                gns.before_step()
        opt.step()

    return step


def local_runs(
    args: argparse.Namespace, device: torch.device
) -> tuple[dict[str, dict[str, float]], str]:
    """The single-process modes against their baselines."""
    model, x, y, data = fashion_mlp(args.batch_size)
    xs = list(x.to(device).split(args.batch_size))
    ys = list(y.to(device).split(args.batch_size))

    def step(kind: str) -> Callable[[], None]:
        return make_step(kind, copy.deepcopy(model).to(device), xs, ys, args.n_micro)

    pairs = {mode: (step(BASELINES[mode]), step(mode)) for mode in LOCAL_MODES}
    lm, lm_xs, lm_ys = lm_batches(args.lm_batch)

    def lm_step(kind: str) -> Callable[[], None]:
        xs, ys = [x.to(device) for x in lm_xs], [y.to(device) for y in lm_ys]
        return make_step(kind, copy.deepcopy(lm).to(device), xs, ys, args.n_micro, lm_loss)

    pairs["per_example-transformer"] = (lm_step("plain"), lm_step("per_example"))
    try:
        gpt, gpt_xs, gpt_ys, gpt_loss = fortunes_batches(args.lm_batch)
    except SpecError as exc:  # fortunes not installed: that row is left out, with the reason
        print(f"per_example-fortunes-gpt skipped: {exc}")
    else:

        def gpt_step(kind: str) -> Callable[[], None]:
            xs, ys = [x.to(device) for x in gpt_xs], [y.to(device) for y in gpt_ys]
            model = copy.deepcopy(gpt).to(device)
            return make_step(kind, model, xs, ys, args.n_micro, gpt_loss)

        pairs["per_example-fortunes-gpt"] = (gpt_step("plain"), gpt_step("per_example"))
    return measure_pairs(pairs, args, device), data


def _ddp_worker(
    rank: int, port: int, model: nn.Module, x: Tensor, y: Tensor, args: argparse.Namespace, out: str
) -> None:
    """One rank: plain DDP and DDP with the ``distributed`` monitor, blocks alternating."""
    configure_threads(1)
    dist.init_process_group("gloo", f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        loss_fn = nn.functional.cross_entropy
        local = args.batch_size // 2
        xs = [b[rank * local : (rank + 1) * local] for b in x.split(args.batch_size)]
        ys = [b[rank * local : (rank + 1) * local] for b in y.split(args.batch_size)]

        def make(monitored: bool) -> Callable[[], None]:
            ddp = DistributedDataParallel(copy.deepcopy(model))
            opt = torch.optim.SGD(ddp.parameters(), lr=1e-3, momentum=0.9)
            gns = GradientNoiseScale(ddp, "distributed") if monitored else None
            state = {"i": 0}

            def step() -> None:
                i = state["i"] = state["i"] + 1
                opt.zero_grad(set_to_none=True)
                loss_fn(ddp(xs[i % POOL]), ys[i % POOL]).backward()
                if gns is not None:
                    gns.after_backward(local)
                    gns.before_step()
                opt.step()

            return step

        pairs = {"distributed": (make(False), make(True))}
        result = measure_pairs(pairs, args, torch.device("cpu"), before_block=dist.barrier)
        if rank == 0:
            Path(out).write_text(json.dumps(result))
    finally:
        dist.destroy_process_group()


def distributed_runs(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Plain DDP against DDP with the monitor, 2 CPU ranks on gloo (rank 0's timings)."""
    model, x, y, _ = fashion_mlp(args.batch_size)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with tempfile.TemporaryDirectory() as tmp:
        out = f"{tmp}/ddp.json"
        mp.start_processes(
            _ddp_worker, args=(port, model, x, y, args, out), nprocs=2, start_method="spawn"
        )
        return json.loads(Path(out).read_text())


def main() -> None:
    """Time every variant, then print a table (or one JSON object)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch-size", type=int, default=512)
    ap.add_argument(
        "--n-micro", type=int, default=4, help="micro-batches of split and accumulation"
    )
    ap.add_argument("--lm-batch", type=int, default=32, help="sequences per transformer batch")
    ap.add_argument("--steps", type=int, default=8, help="steps per timed block")
    ap.add_argument("--device", default=None, help="default: cuda when present, else cpu")
    args, threads = parse_args(ap, repeats=25)
    device = torch.device(args.device) if args.device else default_device()
    results, data = local_runs(args, device)
    if dist.is_gloo_available():
        results.update(distributed_runs(args))
    rows = {
        mode: {"baseline": BASELINES[mode], **r, "target": TARGETS[mode]}
        for mode, r in results.items()
    }
    out = {
        "task": "fashion-mlp",
        "data": data,
        "device": str(device),
        "distributed_ranks": "2 cpu processes, gloo" if "distributed" in rows else None,
        "threads": threads,
        "batch_size": args.batch_size,
        "lm_batch": args.lm_batch,
        "n_micro": args.n_micro,
        "steps": args.steps,
        "repeats": args.repeats,
        "modes": rows,
    }
    if args.json:
        print_json(out)
        return
    cells = []
    for mode, r in rows.items():
        color = "green" if r["overhead"] <= r["target"] else "red"
        cells.append(
            (
                mode,
                r["baseline"],
                f"{r['baseline_ms']:.1f}",
                f"{r['ms']:.1f}",
                f"[{color}]{100 * r['overhead']:+.1f}%[/]",
                f"{100 * r['cpu_overhead']:+.1f}%",
                f"<= {100 * r['target']:.0f}%",
            )
        )
    columns = ["mode", "baseline", "baseline ms", "monitored ms", "overhead", "cpu-time overhead"]
    print_table(
        f"noise-scale overhead: fashion-mlp ({data}), batch {args.batch_size}, "
        f"{threads} thread(s), {device}, median of {args.repeats} x {args.steps} steps",
        [*columns, "target"],
        cells,
        left=("mode", "baseline"),
        width=120,
    )


if __name__ == "__main__":
    main()
