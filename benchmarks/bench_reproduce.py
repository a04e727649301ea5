"""Time, peak memory and verdict stability of ``batchlab reproduce`` over several seed sets.

Each seed set runs in a fresh store as its own ``batchlab reproduce`` process (all claims), so the
wall time is the whole job: data generation, training, sharpness, report. Peak memory is the
largest sum of the resident sets of the process and its workers, sampled every 0.2 s.

    python benchmarks/bench_reproduce.py [--mode quick|full|smoke] [--seed-sets 3] [--seeds 3]
        [--workers 2] [--out DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CLAIMS = range(1, 9)


def tree_rss_mb(root: int) -> float:
    """Resident memory of ``root`` and all its descendants, in MB (Linux /proc)."""
    parents: dict[int, int] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            parents[int(entry.name)] = int(fields[1])
            rss[int(entry.name)] = int(fields[21]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError, IndexError):
            continue
    keep, frontier = {root}, [root]
    while frontier:
        pid = frontier.pop()
        children = [c for c, p in parents.items() if p == pid and c not in keep]
        keep.update(children)
        frontier.extend(children)
    return sum(rss.get(p, 0) for p in keep) / 2**20


def run_once(mode: str, first_seed: int, seeds: int, workers: int, folder: Path) -> dict:
    """One reproduce process; returns its verdicts, wall seconds and peak memory."""
    cmd = [
        sys.executable, "-m", "batchlab", "reproduce", *([] if mode == "full" else [f"--{mode}"]),
        "--seeds", str(seeds), "--first-seed", str(first_seed), "--workers", str(workers),
        "--db", str(folder / "runs.sqlite"), "--out", str(folder / "report"), "--json",
    ]  # fmt: skip
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, tree_rss_mb(proc.pid))
        time.sleep(0.2)
    out = proc.stdout.read() if proc.stdout else ""
    if proc.returncode:
        raise SystemExit(f"reproduce failed with exit code {proc.returncode}")
    result = json.loads(out)
    return {
        "first_seed": first_seed,
        "wall_s": time.perf_counter() - start,
        "peak_memory_mb": peak,
        "verdicts": {c["claim"]: c["verdict"] for c in result["claims"]},
        "runs": result["runs_trained"],
    }


def main() -> None:
    """Run every seed set, print a table of verdicts and whether each claim's verdict is stable."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--mode", default="quick", choices=("quick", "full", "smoke"))
    ap.add_argument("--seed-sets", type=int, default=3)
    ap.add_argument("--seeds", type=int, default=3, help="seeds per set")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--out", type=Path, default=None, help="keep stores and reports here")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    root = args.out or Path(tempfile.mkdtemp(prefix="bench-reproduce-"))
    sets = []
    for i in range(args.seed_sets):
        folder = root / f"seeds-{i * args.seeds}"
        folder.mkdir(parents=True, exist_ok=True)
        sets.append(run_once(args.mode, i * args.seeds, args.seeds, args.workers, folder))
        if not args.json:
            s = sets[-1]
            print(
                f"seeds {s['first_seed']}..{s['first_seed'] + args.seeds - 1}: {s['wall_s']:.0f} s, "
                f"peak {s['peak_memory_mb']:.0f} MB, {s['runs']} runs: "
                + " ".join(f"{c}:{s['verdicts'][c]}" for c in CLAIMS),
                flush=True,
            )
    stable = {c: len({s["verdicts"][c] for s in sets}) == 1 for c in CLAIMS}
    out = {"mode": args.mode, "workers": args.workers, "seed_sets": sets, "stable": stable}
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(
        f"\n{'claim':<6}" + "".join(f"{'set ' + str(i):<15}" for i in range(len(sets))) + "stable"
    )
    for c in CLAIMS:
        print(
            f"{c:<6}"
            + "".join(f"{s['verdicts'][c]:<15}" for s in sets)
            + ("yes" if stable[c] else "NO")
        )
    walls = [s["wall_s"] for s in sets]
    print(f"\nwall time {min(walls):.0f}-{max(walls):.0f} s per run (limit {600 if args.mode == 'quick' else 3600} s), "
          f"peak memory {max(s['peak_memory_mb'] for s in sets):.0f} MB (limit 2048 MB)")  # fmt: skip


if __name__ == "__main__":
    main()
