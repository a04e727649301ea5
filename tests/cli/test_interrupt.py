"""Ctrl-C with a real SIGINT: sweeps (process pool, inline) and reproduce stop within 5 s (the
``interrupted`` line; the exit follows within 10 s even on busy shared cores), keep only complete
runs, print the command that resumes and exit 130; resuming stores every run exactly once.
``train`` and ``lr-find`` are interrupted in-process from their progress callback; a second Ctrl-C
exits at once. The sweeps start with SIGINT inherited ignored, as ``cmd &`` in a shell script does:
that is why Ctrl-C once did nothing."""

from __future__ import annotations

import math
import os
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batchlab.cli import app
from batchlab.reproduce.claims import Setup
from batchlab.reproduce.run import reproduce
from batchlab.sweep.spec import load_sweep, plan
from batchlab.sweep.store import Store

pytestmark = pytest.mark.skipif(not hasattr(os, "killpg"), reason="needs POSIX signals")

SWEEP = """
study = "ctrl-c"
task = "digits-mlp"
batch_sizes = [8, 16, 32, 64, 128]
lr = [0.05, 0.2]
seeds = [0]
optimizer = {name = "sgd", momentum = 0.9}
budget = {steps = 200}
eval_every = 50
"""
EVALS = 5  # history rows of a complete run: steps 0, 50, ..., 200


def start(args: list[str], cwd: Path, ignore_sigint: bool) -> subprocess.Popen:
    """``batchlab ARGS`` in its own process group (SIGINT to the group is what a terminal sends)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    ignore = (lambda: signal.signal(signal.SIGINT, signal.SIG_IGN)) if ignore_sigint else None
    return subprocess.Popen(
        [sys.executable, "-m", "batchlab", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        preexec_fn=ignore,
    )


def finished(db: Path) -> int:
    """Finished runs in ``db`` right now (0 while the file or its tables do not exist)."""
    if not db.is_file():
        return 0
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        return conn.execute("SELECT count(*) FROM runs WHERE status = 'ok'").fetchone()[0]
    except sqlite3.OperationalError:
        return 0
    finally:
        conn.close()


def interrupt_when_stored(proc: subprocess.Popen, db: Path, signals: int = 1) -> tuple[float, str]:
    """Wait for the first stored run, send SIGINT to the group ``signals`` times; returns (seconds
    from the first SIGINT to the ``interrupted`` line, stderr). The process must exit in 10 s."""
    deadline = time.monotonic() + 120
    while finished(db) == 0:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no run stored in 120 s"
        time.sleep(0.02)
    sent = time.monotonic()
    for _ in range(signals):
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(0.01)
    lines, seconds = [], math.inf
    for line in proc.stderr:  # the progress and log lines are far less than a pipe holds
        lines.append(line)
        if line.startswith("interrupted") and seconds == math.inf:
            seconds = time.monotonic() - sent
    proc.wait(timeout=10)
    proc.stdout.close()
    return seconds, "".join(lines)


def assert_complete_runs_only(db: Path, planned: set[str]) -> set[str]:
    """Every stored run is planned, finished and has its full history once; returns their ids."""
    with Store(db, readonly=True) as store:
        assert store.integrity_check() == "ok"
    with sqlite3.connect(db) as conn:
        runs = conn.execute("SELECT id, status FROM runs").fetchall()
        rows = dict(conn.execute("SELECT run_id, count(*) FROM history GROUP BY run_id").fetchall())
    conn.close()
    ids = {run_id for run_id, _ in runs}
    assert len(ids) == len(runs) and ids <= planned
    assert {status for _, status in runs} <= {"ok"}, runs
    assert {rows.get(run_id, 0) for run_id in ids} <= {EVALS}, rows
    return ids


def resume(err: str, cwd: Path) -> subprocess.CompletedProcess:
    """Run the command the interrupted one printed after ``resume:``."""
    (line,) = [ln for ln in err.splitlines() if ln.startswith("resume: ")]
    args = shlex.split(line.removeprefix("resume: "))
    assert args[0] == "batchlab"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "batchlab", *args[1:]]
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("executor", ["local", "inline"])
def test_ctrl_c_stops_a_sweep_and_the_printed_command_resumes_it(tmp_path, executor):
    (tmp_path / "sweep.toml").write_text(SWEEP)
    planned = {s.run_id for s in plan(load_sweep(tmp_path / "sweep.toml"))}
    db = tmp_path / "runs.sqlite"
    args = ["sweep", "sweep.toml", "--db", "runs.sqlite", "--executor", executor]
    args += ["--workers", "2"] if executor == "local" else []
    proc = start(args, tmp_path, ignore_sigint=executor == "local")
    seconds, err = interrupt_when_stored(proc, db)
    assert proc.returncode == 130, err
    assert seconds < 5, err
    stored = assert_complete_runs_only(db, planned)
    assert 0 < len(stored) < len(planned), "the sweep was not stopped mid-way"
    assert f"interrupted: {len(stored)} of {len(planned)} runs of study 'ctrl-c'" in err, err
    assert "Traceback" not in err, err
    done = resume(err, tmp_path)
    assert done.returncode == 0, done.stderr
    assert assert_complete_runs_only(db, planned) == planned


def test_ctrl_c_stops_reproduce_and_a_rerun_finishes_it(tmp_path):
    db = tmp_path / "runs.sqlite"
    args = ["reproduce", "--smoke", "--claims", "1", "--seeds", "2", "--db", "runs.sqlite"]
    args += ["--out", "report", "--workers", "2"]
    proc = start(args, tmp_path, ignore_sigint=False)
    seconds, err = interrupt_when_stored(proc, db)
    assert proc.returncode == 130 and seconds < 5, err
    assert "runs stored in runs.sqlite by this command" in err, err
    assert f"resume: batchlab {shlex.join(args)}" in err
    with Store(db, readonly=True) as store:
        assert store.integrity_check() == "ok"
        stored = store.finished_ids()
        assert all(len(h) > 1 for h in store.histories(stored).values())
    assert not (tmp_path / "report" / "index.html").exists()
    # the rerun, in-process and without the report (seconds less): what the command runs
    result = reproduce([1], setup=Setup(mode="smoke", seeds=(0, 1)), db=db, out=None, workers=2)
    assert result.runs_reused == len(stored) and result.runs_trained > 0
    with sqlite3.connect(db) as conn:
        ids = [r[0] for r in conn.execute("SELECT id FROM runs")]
    conn.close()
    assert len(ids) == len(set(ids)) == len(stored) + result.runs_trained


def test_a_second_ctrl_c_stops_at_once_even_while_the_first_cleans_up(tmp_path):
    slow_cleanup = (
        "import sys, time\n"
        "from batchlab.cli._interrupt import arm, stop_on_ctrl_c\n"
        "arm()\n"
        "with stop_on_ctrl_c(lambda: 'kept'):\n"
        "    try:\n"
        "        print('working', flush=True); time.sleep(60)\n"
        "    finally:\n"
        "        print('cleaning', flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", slow_cleanup],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout.readline() == "working\n"
    proc.send_signal(signal.SIGINT)
    assert proc.stdout.readline() == "cleaning\n"
    sent = time.monotonic()
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=10)
    assert proc.returncode == 130 and time.monotonic() - sent < 2
    assert "interrupted again: stopped at once" in err and "interrupted: " not in err


@pytest.fixture
def sigint_restored():
    """In-process Ctrl-C tests leave pytest's own SIGINT handler as they found it."""
    previous = signal.getsignal(signal.SIGINT)
    yield
    signal.signal(signal.SIGINT, previous)


def ctrl_c_after(progress, steps: int):
    """``progress`` that sends this process a real SIGINT once ``steps`` are done."""

    def tap(done: int, total: int) -> None:
        progress(done, total)
        if done >= steps:
            os.kill(os.getpid(), signal.SIGINT)

    return tap


def test_ctrl_c_stops_train_and_stores_nothing(tmp_path, monkeypatch, sigint_restored):
    from batchlab.engine import train as engine_train

    real = engine_train.train
    monkeypatch.setattr(
        engine_train,
        "train",
        lambda spec, progress, **kw: real(spec, progress=ctrl_c_after(progress, 50), **kw),
    )
    db = tmp_path / "runs.sqlite"
    args = ["train", "--task", "digits-mlp", "-b", "16", "--lr", "0.1", "--steps", "100000"]
    started = time.monotonic()
    result = CliRunner().invoke(app, [*args, "--eval-every", "10", "--db", str(db)])
    assert result.exit_code == 130, result.output
    assert time.monotonic() - started < 60  # 100,000 steps would take minutes
    assert "stopped at step" in result.stderr and f"nothing was stored in {db}" in result.stderr
    assert "rerun: batchlab " in result.stderr
    with Store(db, readonly=True) as store:
        assert store.runs() == []


def test_ctrl_c_stops_lr_find(monkeypatch, sigint_restored):
    from batchlab.engine import lr_finder

    real = lr_finder.lr_find
    monkeypatch.setattr(
        lr_finder,
        "lr_find",
        lambda *a, progress, **kw: real(*a, progress=ctrl_c_after(progress, 1), **kw),
    )
    args = ["lr-find", "--task", "digits-mlp", "-b", "16", "--steps", "30", "--seeds", "5"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 130, result.output
    assert "interrupted: 1 of 5 range tests were done; lr-find stores nothing" in result.stderr
