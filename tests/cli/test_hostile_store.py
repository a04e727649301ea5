"""A store someone sends is data: no command imports or runs code that only the store names.

The hostile store holds a run whose task is ``os:system`` (``task_options.command`` would create a
marker file) and one whose task is a module on the current directory that writes a marker when
imported. Every command that reads a store runs against it; afterwards neither marker exists, the
module is not in ``sys.modules`` and the file's sha256 is unchanged. A damaged row (each kind) is
one line on stderr naming the run and field, with the rest read; a command that needs that exact
run is one error line and exit 2.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from batchlab.cli import app
from batchlab.engine.spec import RunResult, RunSpec, SpecError
from batchlab.engine.tasks import get_task
from batchlab.sweep.spec import load_sweep, plan
from batchlab.sweep.store import Store

runner = CliRunner()
TARGET = {"target": {"metric": "val_metric", "value": 0.5}}


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def result(spec: RunSpec, status: str = "ok") -> RunResult:
    """A finished run with a 3-row history and final numbers (nothing is trained)."""
    history = [
        {
            "step": 10 * k,
            "samples": 10 * k * spec.batch_size,
            "epoch": 0.1 * k,
            "lr": spec.lr,
            "batch_size": spec.batch_size,
            "train_loss": 2.0 / (k + 1),
            "val_loss": 2.1 / (k + 1),
            "val_metric": 0.3 * k,
            "wall_s": 0.1 * k,
            "noise_scale": None,
        }
        for k in range(3)
    ]
    final = {"train_loss": 0.4, "train_metric": 0.9, "val_loss": 0.5, "val_metric": 0.85}
    return RunResult(spec, status, 20, 20 * spec.batch_size, 0.3, history, final)


def digits_weights(seed: int = 0) -> dict[str, torch.Tensor]:
    """Real weights of the digits-mlp model, so a run whose task is allowed can be measured."""
    return get_task("digits-mlp").make_model(seed).state_dict()


@pytest.fixture
def hostile(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A store with an ``os:system`` run and a run naming a marker-writing module on the CWD."""
    module = f"evil_{os.getpid()}_{tmp_path.name.replace('-', '_')}"
    imported, called, ran = tmp_path / "imported", tmp_path / "called", tmp_path / "pwned"
    (tmp_path / f"{module}.py").write_text(
        textwrap.dedent(
            f"""
            from pathlib import Path
            Path({str(imported)!r}).write_text("imported")

            def make_task(**options):
                Path({str(called)!r}).write_text("called")
                from batchlab.engine.tasks import get_task
                return get_task("digits-mlp")
            """
        )
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    system = RunSpec(
        task="os:system", batch_size=32, lr=0.1, task_options={"command": f"touch {ran}"}
    )
    user = RunSpec(task=f"{module}:make_task", batch_size=64, lr=0.1)
    db = tmp_path / "hostile.sqlite"
    with Store(db) as store:
        store.set_study("evil", TARGET)
        store.put(result(system), study="evil", weights=digits_weights())
        store.put(result(user), study="evil", weights=digits_weights())
    yield db, module, system.run_id, user.run_id, (imported, called, ran)
    sys.modules.pop(module, None)


def assert_nothing_ran(module: str, markers: tuple[Path, ...]) -> None:
    assert [m.name for m in markers if m.exists()] == []
    assert module not in sys.modules


def invoke(*args: object):
    return runner.invoke(app, [str(a) for a in args])


@pytest.mark.parametrize(
    "args",
    [
        ["runs"],
        ["runs", "--json"],
        ["runs", "--study", "evil", "--status", "ok"],
        ["export", "--out", "{tmp}/export"],
        ["export", "--format", "parquet", "--out", "{tmp}/parquet"],
        ["summary"],
        ["summary", "--json"],
        ["report", "--out", "{tmp}/report"],
    ],
    ids=lambda a: " ".join(a),
)
def test_reading_commands_import_nothing_and_leave_the_file_unchanged(hostile, args, tmp_path):
    db, module, *_, markers = hostile
    before = sha256(db)
    out = invoke(*(a.format(tmp=tmp_path) for a in args), "--db", db)
    assert out.exit_code == 0, out.output
    assert out.stderr == ""
    assert_nothing_ran(module, markers)
    assert sha256(db) == before


def test_sharpness_of_a_run_with_stored_user_code_refuses_it_in_one_line(hostile):
    db, module, system_id, user_id, markers = hostile
    before = sha256(db)
    for run_id, name in ((system_id, "os:system"), (user_id, f"{module}:make_task")):
        for extra in ([], ["--json"], ["--task", "digits-mlp"]):
            out = invoke("sharpness", "--db", db, "--run", run_id, *extra)
            assert out.exit_code == 2, out.output
            assert out.stdout == "" and out.stderr.count("\n") == 1
            if extra[:1] == ["--task"]:
                assert out.stderr == (
                    f"error: task: run {run_id} was trained on task {name!r}, not 'digits-mlp'\n"
                )
            else:
                module_name = name.partition(":")[0]
                assert out.stderr == (
                    f"error: task: run {run_id} uses user code {name!r} (would import module "
                    f"{module_name!r}); pass --task {name} (or --trust-task-code) to run it\n"
                )
    assert_nothing_ran(module, markers)
    assert sha256(db) == before


@pytest.mark.parametrize("allow", ["--task", "--trust-task-code"])
def test_naming_the_user_task_or_opting_in_runs_it(hostile, allow):
    db, module, _, user_id, (imported, called, ran) = hostile
    before = sha256(db)
    flags = ["--task", f"{module}:make_task"] if allow == "--task" else [allow]
    out = invoke("sharpness", "--db", db, "--run", user_id, *flags, "--iters", 5, "--no-keskar")
    assert out.exit_code == 0, out.output
    assert imported.exists() and called.exists() and not ran.exists()
    assert sha256(db) == before


def test_the_real_cli_with_the_module_on_its_path_imports_nothing(hostile):
    """``python -m batchlab`` puts the current directory on ``sys.path``: still nothing imported."""
    db, _, system_id, user_id, markers = hostile
    before = sha256(db)
    for run_id in (user_id, system_id):
        proc = subprocess.run(
            [sys.executable, "-m", "batchlab", "sharpness", "--db", str(db), "--run", run_id],
            capture_output=True,
            text=True,
            cwd=db.parent,
            timeout=120,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)},
        )
        assert proc.returncode == 2, proc.stderr
        assert proc.stderr.startswith(f"error: task: run {run_id} uses user code")
        assert proc.stderr.count("\n") == 1
    assert [m.name for m in markers if m.exists()] == []
    assert sha256(db) == before


@pytest.mark.parametrize("task", ["os:system", "{module}:make_task"])
def test_a_sweep_file_naming_user_code_is_refused_unless_the_user_names_it(hostile, task, tmp_path):
    """A sweep file is data too: its ``module:function`` is imported only when named by --task."""
    db, module, *_, markers = hostile
    name = task.format(module=module)
    sweep_file = tmp_path / "sent.toml"
    sweep_file.write_text(
        f'study = "sent"\ntask = {{name = "{name}", options = {{command = "touch {markers[2]}"}}}}\n'
        "batch_sizes = [32]\nlr = [0.1]\nseeds = [0]\nbudget = {steps = 2}\n"
    )
    before = sha256(db)
    for extra in ([], ["--task", "digits-mlp"]):
        out = invoke("sweep", sweep_file, "--db", db, "--executor", "inline", *extra)
        assert out.exit_code == 2, out.output
        assert out.stdout == "" and out.stderr.count("\n") == 1
        if extra:
            says = f"the sweep file trains {name!r}, not 'digits-mlp'"
        else:
            says = (
                f"sweep file {sweep_file} uses user code {name!r} (would import module "
                f"{name.partition(':')[0]!r}); pass --task {name} (or --trust-task-code) to run it"
            )
        assert out.stderr == f"error: task: {says}\n"
    assert_nothing_ran(module, markers)
    assert sha256(db) == before


def test_a_sweep_file_user_task_runs_when_named(hostile, tmp_path):
    db, module, *_, (imported, called, ran) = hostile
    sweep_file = tmp_path / "mine.toml"
    sweep_file.write_text(
        f'study = "mine"\ntask = "{module}:make_task"\nbatch_sizes = [32]\nlr = [0.1]\n'
        "seeds = [0]\nbudget = {steps = 2}\n"
    )
    out = invoke(
        "sweep", sweep_file, "--db", db, "--executor", "inline", "--task", f"{module}:make_task"
    )
    assert out.exit_code == 0, out.output
    assert imported.exists() and called.exists() and not ran.exists()


def test_sweep_resume_over_forged_runs_imports_nothing(hostile, tmp_path):
    """A stored run whose id is a planned run's but whose spec names ``os:system``: the resume
    skips it as stored and only reads its numbers."""
    db, module, *_, markers = hostile
    sweep_file = tmp_path / "sweep.toml"
    sweep_file.write_text(
        'study = "evil"\ntask = "digits-mlp"\nbatch_sizes = [32]\nlr = [0.1]\nseeds = [0]\n'
        "budget = {steps = 2}\n"
    )
    (planned,) = plan(load_sweep(sweep_file))
    forged = planned.replace(task="os:system", task_options={"command": f"touch {markers[2]}"})
    with Store(db) as store:
        store.put(result(planned), study="evil")
    with sqlite3.connect(db) as raw:
        raw.execute(
            "UPDATE runs SET spec = ? WHERE id = ?", (json.dumps(forged.to_dict()), planned.run_id)
        )
    raw.close()
    out = invoke("sweep", sweep_file, "--db", db, "--executor", "inline", "--json")
    assert out.exit_code == 0, out.output
    assert json.loads(out.stdout)["skipped"] == 1
    assert_nothing_ran(module, markers)


def test_reproduce_judges_no_forged_run_with_stored_code(tmp_path):
    """Claim 4 measures stored grid runs: a run whose spec names other code is refused."""
    from batchlab.reproduce.claims import GRID, STUDY_PREFIX, Results, Setup, judge_claim4

    ran = tmp_path / "pwned"
    options = {"command": f"touch {ran}"}
    db = tmp_path / "grid.sqlite"
    with Store(db) as store:
        for b in (64, 256):
            spec = RunSpec(task="os:system", batch_size=b, lr=0.1, task_options=options)
            store.put(result(spec), study=STUDY_PREFIX + GRID, weights=digits_weights())
        with pytest.raises(SpecError, match="was trained on task 'os:system', not 'mnist1d-mlp'"):
            judge_claim4(Setup(), Results(store, Setup()))
    assert not ran.exists()


# -- damaged rows ----------------------------------------------------------------------------------

DAMAGES = {  # field named in the message -> SQL damaging run :id
    "spec": "UPDATE runs SET spec = 'not json' WHERE id = :id",
    "spec-array": "UPDATE runs SET spec = '[1, 2]' WHERE id = :id",
    "spec-missing": """UPDATE runs SET spec = '{"task": "digits-mlp"}' WHERE id = :id""",
    "spec-bytes": "UPDATE runs SET spec = CAST(x'7bff22' AS TEXT) WHERE id = :id",
    "final": "UPDATE runs SET final = '{not json' WHERE id = :id",
    "final-text": """UPDATE runs SET final = '{"val_loss": "low"}' WHERE id = :id""",
    "extra": "UPDATE runs SET extra = '[' WHERE id = :id",
    "steps": "UPDATE runs SET steps = 'many' WHERE id = :id",
    "status": "UPDATE runs SET status = 'great' WHERE id = :id",
    "history": "UPDATE history SET train_loss = 'low' WHERE run_id = :id AND seq = 1",
    "history-extra": "UPDATE history SET extra = '{' WHERE run_id = :id",
    "history-mask": "UPDATE history SET nan_mask = 'x' WHERE run_id = :id",
}


@pytest.fixture
def damaged_store(tmp_path: Path):
    """Three good digits-mlp runs with weights in study ``grid``; returns (db, ids)."""
    db = tmp_path / "runs.sqlite"
    specs = [RunSpec(task="digits-mlp", batch_size=64, lr=lr) for lr in (0.01, 0.1, 1.0)]
    with Store(db) as store:
        store.set_study("grid", TARGET)
        for spec in specs:
            store.put(result(spec), study="grid", weights=digits_weights())
    return db, [s.run_id for s in specs]


def damage(db: Path, sql: str, run_id: str) -> None:
    with sqlite3.connect(db) as raw:
        raw.execute("PRAGMA ignore_check_constraints = ON")
        raw.execute(sql, {"id": run_id})
    raw.close()


@pytest.mark.parametrize("kind", DAMAGES)
def test_a_damaged_row_is_one_warning_and_the_other_runs_are_read(damaged_store, kind, tmp_path):
    db, ids = damaged_store
    bad = ids[1]
    damage(db, DAMAGES[kind], bad)
    before = sha256(db)
    field = kind.split("-")[0]
    warning = f"warning: run {bad}: {field}: "
    in_history = field == "history"
    commands = [
        ["runs", "--json"],
        ["summary", "--json"],
        ["export", "--out", tmp_path / "export"],
    ]
    for args in commands:
        out = invoke(*args, "--db", db)
        assert out.exit_code == 0, out.output
        reads_history = args[0] != "runs"
        if in_history and not reads_history:
            assert out.stderr == ""  # `runs` never reads the history
            continue
        assert out.stderr.startswith(warning) and out.stderr.endswith("; skipped\n"), out.stderr
        assert out.stderr.count("\n") == 1
    listed = {r["id"] for r in json.loads(invoke("runs", "--db", db, "--json").stdout)}
    assert listed == ({*ids} if in_history else {ids[0], ids[2]})
    assert json.loads(invoke("summary", "--db", db, "--json").stdout)["n_runs"] == 2
    with (tmp_path / "export" / "runs.csv").open() as f:
        assert sum(1 for _ in f) == 3  # header + the two good runs
    out = invoke("sharpness", "--db", db, "--run", bad)
    if not in_history:  # sharpness reads the run's row, not its history
        assert out.exit_code == 2
        assert out.stderr.startswith(f"error: {field}: run {bad}: ") and out.stderr.count("\n") == 1
    assert sha256(db) == before


def test_random_bytes_as_weights_are_one_error_line(damaged_store):
    db, ids = damaged_store
    damage(db, "UPDATE weights SET data = randomblob(64) WHERE run_id = :id", ids[0])
    before = sha256(db)
    out = invoke("sharpness", "--db", db, "--run", ids[0])
    assert out.exit_code == 2
    assert out.stderr.startswith(f"error: weights: run {ids[0]}: not readable safetensors data")
    assert out.stderr.count("\n") == 1
    assert sha256(db) == before


@pytest.mark.parametrize(
    ("weights", "says"),
    [
        ({"0.weight": torch.zeros(64, 64, dtype=torch.float64)}, "names do not fit the model"),
        (
            {k: v.to(torch.float64) for k, v in digits_weights().items()},
            "0.weight is torch.float64 (64, 64), the model needs torch.float32 (64, 64)",
        ),
        (
            {**digits_weights(), "0.bias": torch.zeros(3)},
            "0.bias is torch.float32 (3,), the model needs torch.float32 (64,)",
        ),
    ],
    ids=["names", "dtype", "shape"],
)
def test_weights_that_do_not_fit_the_model_are_one_error_line(tmp_path, weights, says):
    db = tmp_path / "runs.sqlite"
    spec = RunSpec(task="digits-mlp", batch_size=64, lr=0.1)
    with Store(db) as store:
        store.put(result(spec), weights=weights)
    before = sha256(db)
    out = invoke("sharpness", "--db", db, "--run", spec.run_id)
    assert out.exit_code == 2
    assert out.stderr.startswith(f"error: weights: run {spec.run_id}: ") and says in out.stderr
    assert out.stderr.count("\n") == 1
    assert sha256(db) == before


@pytest.mark.parametrize("command", ["runs", "summary", "export", "report", "sharpness"])
@pytest.mark.parametrize("kind", ["text", "foreign", "newer", "unreadable-version"])
def test_a_file_that_is_no_readable_batchlab_store_is_one_line(tmp_path, command, kind):
    path = tmp_path / "x.sqlite"
    if kind == "text":
        path.write_bytes(os.urandom(4096))
    else:
        with sqlite3.connect(path) as raw:
            raw.execute("CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            if kind != "foreign":
                version = "99" if kind == "newer" else "one"
                raw.executemany(
                    "INSERT INTO meta VALUES (?, ?)",
                    [("application", "batchlab"), ("schema_version", version)],
                )
        raw.close()
    before = sha256(path)
    extra = {"sharpness": ["--run", "0"], "export": ["--out", tmp_path / "o"]}.get(command, [])
    out = invoke(command, "--db", path, *extra)
    assert out.exit_code == 2
    assert out.stderr.startswith("error: db: ") and out.stderr.count("\n") == 1, out.stderr
    assert sha256(path) == before
