"""Every bad input is one ``error: <field>: ...`` line on stderr and exit 2 before any work; a run
that fails while training is one ``error: run: ...`` line and exit 1. Where a ``--db`` is given,
the store file's sha256 is the same afterwards (nothing half-written on a refusal).

Damaged store rows (a spec that is not a spec, ``final`` not JSON, random weights) are covered by
``test_hostile_store.py``; this file covers the other inputs of issue 11, sections 3 to 5.
"""

from __future__ import annotations

import dataclasses
import hashlib
import textwrap
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batchlab.cli import app
from batchlab.engine.spec import RunResult, RunSpec
from batchlab.sweep.store import Store

runner = CliRunner()
SWEEP = 'task = "digits-mlp"\nbatch_sizes = [32]\nlr = [0.1]\nbudget = {steps = 2}\n'
TRAIN = ["train", "--task", "digits-mlp", "-b", "32", "--lr", "0.1", "--steps", "2"]


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_error(res, field: str, code: int = 2) -> str:
    """The error line of a command, checked: ``error: <field>: ...`` and exit ``code``.

    A refused input (exit 2) is the only line on stderr; a failed run (exit 1) may follow what
    was printed while it trained (the plan line, logs), but it is the one error line, and last.
    """
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == code, res.output
    errors = [line for line in lines if line.startswith("error:")]
    assert errors == lines[-1:] and errors[0].startswith(f"error: {field}: "), res.stderr
    assert code != 2 or len(lines) == 1, res.stderr
    return errors[0]


@pytest.fixture
def store(tmp_path: Path) -> Path:
    """A store with one finished run of study ``s`` (nothing trained)."""
    db = tmp_path / "runs.sqlite"
    spec = RunSpec(task="digits-mlp", batch_size=32, lr=0.1)
    final = {"train_loss": 0.4, "train_metric": 0.9, "val_loss": 0.5, "val_metric": 0.85}
    with Store(db) as s:
        s.put(RunResult(spec, "ok", 10, 320, 0.1, final=final), study="s")
    return db


def write_sweep(tmp_path: Path, text: str, name: str = "sweep.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# --- section 3: one line, exit 2, before any work ---------------------------------------------


def test_rich_markup_in_a_study_name_is_shown_as_written(tmp_path: Path) -> None:
    db = tmp_path / "mk.sqlite"
    sweep = write_sweep(tmp_path, 'study = "mk[/red]"\n' + SWEEP)
    res = runner.invoke(app, ["sweep", str(sweep), "--db", str(db), "--executor", "inline"])
    assert res.exit_code == 0, res.output
    assert "study mk[/red] in" in res.stdout
    listed = runner.invoke(app, ["runs", "--db", str(db)])
    assert listed.exit_code == 0, listed.output
    assert "study mk[/red]" in listed.stdout and "mk[/red] " in listed.stdout


def test_a_stored_study_and_task_with_markup_are_listed_as_text(tmp_path: Path) -> None:
    db = tmp_path / "m.sqlite"
    spec = RunSpec(task="digits-mlp", batch_size=32, lr=0.1)
    with Store(db) as s:
        s.put(RunResult(spec, "ok", 1, 32, 0.1), study="[bold]b[/bold]")
        s.put(RunResult(spec.replace(lr=0.2), "ok", 1, 32, 0.1), study="[link=x]y")
    res = runner.invoke(app, ["runs", "--db", str(db)])
    assert res.exit_code == 0, res.output
    assert "[bold]b[/bold]" in res.stdout and "[link=x]y" in res.stdout


@pytest.mark.parametrize("command", ["export", "report"])
@pytest.mark.parametrize("where", ["existing file", "below a file"])
def test_an_out_that_is_a_file_or_cannot_be_made_is_one_line(
    store: Path, tmp_path: Path, command: str, where: str
) -> None:
    blocker = tmp_path / "notes.txt"
    blocker.write_text("keep me")
    out = blocker if where == "existing file" else blocker / "sub"
    before = sha256(store)
    res = runner.invoke(app, [command, "--db", str(store), "--out", str(out)])
    line = one_error(res, "out")
    assert str(blocker) in line
    assert sha256(store) == before and blocker.read_text() == "keep me"


def test_an_existing_out_folder_is_written_into(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "export"
    out.mkdir()
    (out / "mine.txt").write_text("kept")
    res = runner.invoke(app, ["export", "--db", str(store), "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert (out / "runs.csv").exists() and (out / "mine.txt").read_text() == "kept"


def test_a_sweep_file_that_is_not_utf8_is_one_line(tmp_path: Path) -> None:
    sweep = tmp_path / "latin1.toml"
    sweep.write_bytes('study = "café"\n'.encode("latin-1") + SWEEP.encode())
    db = tmp_path / "never.sqlite"
    line = one_error(runner.invoke(app, ["sweep", str(sweep), "--db", str(db)]), "sweep")
    assert "not UTF-8" in line and "offset 12" in line
    assert not db.exists()


@pytest.mark.parametrize("seed", [str(2**64), str(2**32), "-1"])
def test_train_seeds_outside_0_to_2_32_are_refused(store: Path, seed: str) -> None:
    before = sha256(store)
    res = runner.invoke(app, [*TRAIN, "--seed", seed, "--db", str(store)])
    assert "[0, 4294967295]" in one_error(res, "seed")
    assert sha256(store) == before


@pytest.mark.parametrize(("seeds", "field"), [("[-1]", "seeds"), (f"[{2**40}]", "seeds")])
def test_sweep_seeds_outside_the_range_are_refused(tmp_path: Path, seeds: str, field: str) -> None:
    sweep = write_sweep(tmp_path, f"seeds = {seeds}\n" + SWEEP)
    db = tmp_path / "never.sqlite"
    one_error(runner.invoke(app, ["sweep", str(sweep), "--db", str(db)]), field)
    assert not db.exists()


def test_the_largest_seed_trains(tmp_path: Path) -> None:
    res = runner.invoke(app, [*TRAIN, "--seed", str(2**32 - 1), "--json"])
    assert res.exit_code == 0, res.output


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--plot", "lr.xyz"], "plot"),
        (["--plot", "lr"], "plot"),
        (["--start-lr", "1e300", "--end-lr", "1e308"], "start_lr"),
        (["--end-lr", "1e11"], "end_lr"),
    ],
)
def test_lr_find_plot_type_and_ramp_are_checked_first(
    tmp_path: Path, args: list[str], field: str
) -> None:
    res = runner.invoke(
        app, ["lr-find", "--task", "digits-mlp", "-b", "32", "--seeds", "1", "--steps", "5", *args]
    )
    one_error(res, field)
    assert res.stdout == "" and not (tmp_path / "lr.xyz").exists()


@pytest.mark.parametrize(
    ("args", "field"),
    [
        ([*TRAIN, "--weight-decay", "nan"], "weight_decay"),
        ([*TRAIN, "--momentum", "nan"], "momentum"),
        ([*TRAIN, "--warmup-epochs", "inf"], "warmup_epochs"),
        ([*TRAIN, "--beta2", "-inf"], "beta2"),
        (["lr-find", "--task", "digits-mlp", "-b", "32", "--weight-decay", "nan"], "weight_decay"),
        (["advise", "--batch-size", "32", "--lr", "nan", "--to-batch-size", "64"], "lr"),
        (["plan", "--critical-batch", "inf", "--target-steps", "100"], "critical_batch"),
        (["noise", "--task", "digits-mlp", "-b", "32", "--momentum", "nan"], "momentum"),
    ],
)
def test_every_float_option_refuses_nan_and_inf_alike(args: list[str], field: str) -> None:
    assert "must be a finite number" in one_error(runner.invoke(app, args), field)


def test_a_nan_in_a_sweep_file_is_refused_like_on_the_command_line(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, SWEEP + "optimizer = {name = 'sgd', weight_decay = nan}\n")
    db = tmp_path / "never.sqlite"
    line = one_error(
        runner.invoke(app, ["sweep", str(sweep), "--db", str(db)]), "optimizer.weight_decay"
    )
    assert "got nan" in line and not db.exists()


@pytest.mark.parametrize(
    ("args", "field"), [(["--iters", "0"], "iters"), (["--epsilon", "nan"], "epsilon")]
)
def test_sharpness_options_are_checked_before_the_store_is_read(
    store: Path, args: list[str], field: str
) -> None:
    before = sha256(store)
    res = runner.invoke(app, ["sharpness", "--db", str(store), "--run", "no-such-run", *args])
    one_error(res, field)  # not "error: run: no run ...": nothing was read or built
    assert res.stdout == "" and sha256(store) == before


@pytest.mark.parametrize(
    ("args", "field", "says"),
    [
        (["train", "--task", "digits-mlp", "-b", "abc", "--lr", "0.1"], "--batch-size", "integer"),
        (["train", "--task", "digits-mlp", "-b", "32"], "--lr", "Missing option '--lr'"),
        ([*TRAIN, "--bogus"], "--bogus", "No such option"),
        (["trian"], "usage", "Did you mean 'train'"),
        (["sweep"], "path", "Missing argument"),
    ],
)
def test_typer_usage_errors_are_one_line(args: list[str], field: str, says: str) -> None:
    assert says in one_error(runner.invoke(app, args), field)


# --- section 4: a failed run is a failure ------------------------------------------------------

USER_TASKS = """
import dataclasses

import torch
from torch import nn

from batchlab.engine.tasks import get_task, seeded_model_factory


def make_task(kind):
    task = get_task("digits-mlp")
    if kind == "width":  # the model expects 32 input features, the data has 64
        return dataclasses.replace(task, make_model=seeded_model_factory(lambda: nn.Linear(32, 10)))
    if kind == "dtype":  # float64 weights on float32 data
        model = lambda: nn.Linear(64, 10).double()
        return dataclasses.replace(task, make_model=seeded_model_factory(model))
    if kind == "labels":  # labels 10..19 for a 10-class model
        return dataclasses.replace(task, y_train=task.y_train + 10)
    x = task.x_train.clone()
    x[:12, 0] = float("nan") if kind == "nan" else float("inf")
    return dataclasses.replace(task, x_train=x)
"""


@pytest.fixture
def user_task(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "bad_input_tasks.py").write_text(textwrap.dedent(USER_TASKS))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "bad_input_tasks:make_task"


@pytest.mark.parametrize(
    ("kind", "says"),
    [("width", "shapes cannot be multiplied"), ("dtype", "dtype"), ("labels", "out of bounds")],
)
def test_a_run_that_fails_exits_1_with_the_reason(
    user_task: str, tmp_path: Path, kind: str, says: str
) -> None:
    db = tmp_path / "runs.sqlite"
    args = ["train", "--task", user_task, "-o", f"kind={kind}", "-b", "32", "--lr", "0.1"]
    res = runner.invoke(app, [*args, "--steps", "2", "--db", str(db)])
    line = one_error(res, "run", code=1)
    assert says in line
    with Store(db, readonly=True) as store:
        (record,) = store.runs()
    assert record.status == "failed" and record.id in line


def test_a_sweep_with_failed_runs_counts_them_and_exits_1(user_task: str, tmp_path: Path) -> None:
    task = f'task = {{name = "{user_task}", options = {{kind = "width"}}}}\n'
    sweep = write_sweep(
        tmp_path,
        'study = "bad"\n' + task + "batch_sizes = [16, 32]\nlr = [0.1]\nbudget = {steps = 2}\n",
    )
    db = tmp_path / "runs.sqlite"
    args = ["sweep", str(sweep), "--db", str(db), "--executor", "inline", "--task", user_task]
    res = runner.invoke(app, args)
    line = one_error(res, "run", code=1)
    assert line.startswith("error: run: 2 of 2 runs of study 'bad' failed: ")
    assert "failed 2" in res.stdout


@pytest.mark.parametrize("kind", ["nan", "inf"])
def test_non_finite_task_data_is_refused_when_the_task_is_built(
    user_task: str, store: Path, kind: str
) -> None:
    before = sha256(store)
    args = ["train", "--task", user_task, "-o", f"kind={kind}", "-b", "32", "--lr", "0.1"]
    line = one_error(runner.invoke(app, [*args, "--db", str(store)]), "task")
    assert line == "error: task: x_train has 12 non-finite values (NaN or inf); clean the data"
    assert sha256(store) == before


# --- section 5: budgets that cannot finish ---------------------------------------------------


def test_a_train_budget_past_max_steps_is_refused_with_the_plan(store: Path) -> None:
    before = sha256(store)
    res = runner.invoke(app, [*TRAIN[:-2], "--epochs", "1e12", "--db", str(store)])
    line = one_error(res, "budget")
    assert "44,906,250,000,000 steps planned" in line and "--max-steps 10,000,000" in line
    assert sha256(store) == before


def test_max_steps_is_the_limit_and_can_be_raised() -> None:
    base = [*TRAIN[:-1], "20"]
    one_error(runner.invoke(app, [*base, "--max-steps", "19"]), "budget")
    res = runner.invoke(app, [*base, "--max-steps", "20", "--json"])
    assert res.exit_code == 0, res.output


def test_a_million_run_grid_is_refused_before_anything_is_built(tmp_path: Path) -> None:
    grid = f"batch_sizes = {list(range(1, 101))}\nlr = {[i / 1000 for i in range(1, 101)]}\n"
    sweep = write_sweep(
        tmp_path, f'task = "digits-mlp"\n{grid}seeds = {list(range(100))}\nbudget = {{steps = 2}}\n'
    )
    db = tmp_path / "never.sqlite"
    line = one_error(runner.invoke(app, ["sweep", str(sweep), "--db", str(db)]), "runs")
    assert "plans 1,000,000 runs" in line and "--max-runs 10,000" in line
    assert not db.exists()


def test_max_runs_is_the_limit(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, SWEEP.replace("[0.1]", "[0.1, 0.2]"))
    db = tmp_path / "never.sqlite"
    line = one_error(
        runner.invoke(app, ["sweep", str(sweep), "--db", str(db), "--max-runs", "1"]), "runs"
    )
    assert "plans 2 runs" in line and not db.exists()


def test_a_sweep_run_past_max_steps_is_refused(tmp_path: Path) -> None:
    sweep = write_sweep(tmp_path, SWEEP.replace("{steps = 2}", "{epochs = 1e12}"))
    db = tmp_path / "never.sqlite"
    line = one_error(runner.invoke(app, ["sweep", str(sweep), "--db", str(db)]), "budget")
    assert "44,906,250,000,000 steps" in line and not db.exists()


@pytest.mark.parametrize(
    ("value", "field"), [(str(10**30), "to_batch_size"), ("1e30", "--to-batch-size")]
)
def test_advise_bounds_the_batch_size(value: str, field: str) -> None:
    args = ["advise", "--batch-size", "32", "--lr", "0.1", "--to-batch-size", value]
    one_error(runner.invoke(app, args), field)
    ok = runner.invoke(app, [*args[:-1], str(10**12), "--json"])
    assert ok.exit_code == 0, ok.output


def test_a_batch_size_past_the_bound_is_refused_in_every_layer() -> None:
    one_error(
        runner.invoke(app, ["train", "--task", "digits-mlp", "-b", str(10**12 + 1), "--lr", "1"]),
        "batch_size",
    )
    with pytest.raises(ValueError, match="batch_size"):
        dataclasses.replace(RunSpec(task="digits-mlp", batch_size=32, lr=0.1), batch_size=10**13)


def test_help_is_unchanged_by_the_one_line_errors() -> None:
    bare = runner.invoke(app, [])
    assert bare.exit_code == 2 and "Usage:" in bare.stdout and bare.stderr == ""
    helped = runner.invoke(app, ["train", "--help"])
    assert helped.exit_code == 0 and "--max-steps" in helped.stdout
