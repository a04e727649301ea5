"""``batchlab sweep``: a run, a resume, the progress line, and every bad file as one error line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batchlab.cli import app
from batchlab.sweep import runner as sweep_runner
from batchlab.sweep.spec import check, load_sweep, plan
from batchlab.sweep.store import Store

cli = CliRunner()

GOOD = """
study = "cli"
task = "digits-mlp"
batch_sizes = [32, 64]
lr = [0.05, 0.2]
seeds = [0]
optimizer = {name = "sgd", momentum = 0.9}
budget = {steps = 10}
target = {metric = "val_metric", value = 0.3}
"""

# (what replaces the GOOD line starting with its first word, or is appended; the key named)
BAD = [
    ("lrs = [0.1]", "lrs"),
    ('optimizer = {name = "sgd", momentun = 0.9}', "optimizer.momentun"),
    ("batch_sizes = []", "batch_sizes"),
    ("lr = []", "lr"),
    ("seeds = []", "seeds"),
    ("lr = [0.1, -0.05]", "lr"),
    ("lr = [0.1, 0.1]", "lr"),
    ("batch_sizes = [64, 4096]", "batch_sizes"),
    ("target = {value = 0.5}", "target.metric"),
    ('target = {metric = "accuracy", value = 0.5}', "target.metric"),
    ("budget = {steps = 10, epochs = 2}", "budget"),
    ("budget = {epoch = 3}", "budget.epoch"),
    ("budget = {steps = 10.5}", "budget.steps"),
    ('optimizer = {name = "sgd", momentum = 1.5}', "optimizer.momentum"),
    ('optimizer = {name = "sgd", momentum = "0.9"}', "optimizer.momentum"),
    ('optimizer = {name = "sgd", nesterov = true}', "optimizer.nesterov"),
    ('optimizer = "lion"', "optimizer.name"),
    ('schedule = {name = "multistep", gama = 0.1}', "schedule.gama"),
    ('schedule = "cosin"', "schedule.name"),
    ('lr = {rule = "linear", base_batch = 128}', "lr.base_lr"),
    ('lr = {rule = "cubic", base_batch = 128, base_lr = 0.1}', "lr.rule"),
    ('lr = {rule = "linear", base_batch = 128, base_lr = 0.1, span = [4, 1]}', "lr.span"),
    ('lr = {rule = "linear", base_batch = 128, base_lr = 0.1, centre = 1}', "lr.centre"),
    ('lr = {rule = "critical", base_batch = 128, base_lr = 0.1}', "lr.noise_scale"),
    ('task = "no-such-task"', "task"),
    ('task = {name = "digits-mlp", options = {widht = 3}}', "task.options.widht"),
    ("eval_every = -1", "eval_every"),
    ('noise_scale = "yes"', "noise_scale"),
    ("lr = [0.1", "sweep"),
    ("per_batch = 3", "per_batch"),
    ("[per_batch.128]\nbudget = {steps = 5}", "per_batch.128"),
    ("[per_batch.big]\neval_every = 1", "per_batch.big"),
    ("[per_batch.64]\nbudgets = {steps = 5}", "per_batch.64.budgets"),
    ("[per_batch.64]\nbudget = {steps = 5.5}", "per_batch.64.budget.steps"),
    ("[per_batch.64]\nbudget = {samples = -64}", "per_batch.64.budget.samples"),
    ("[per_batch.64]\nbudget = {}", "per_batch.64.budget"),
    ("[per_batch.64]\neval_every = -1", "per_batch.64.eval_every"),
    ("[per_batch.64]\nbudget = {min_evals = 5}\neval_every = 2", "per_batch.64.budget.min_evals"),
    ("[per_batch.64]\nbudget = {epochs = 1, min_evals = 5}", "per_batch.64.budget.min_evals"),
    ("budget = {epochs = 2, min_evals = 5}", "budget.min_evals"),
    ("budget = {steps = 10, min_evals = 0}", "budget.min_evals"),
    ("budget = {steps = 10, min_evals = 5}\neval_every = 2", "budget.min_evals"),
    ("budget = {min_evals = 5}", "budget"),
]


def bad_file(line: str) -> str:
    """GOOD with the line of the same key replaced by ``line`` (or ``line`` appended)."""
    key = line.split("=")[0].strip()
    lines = [ln for ln in GOOD.strip().splitlines() if ln.split("=")[0].strip() != key]
    return "\n".join([*lines, line]) + "\n"


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if anything is trained."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started for a bad sweep")

    monkeypatch.setattr(sweep_runner, "train_ensemble", refuse)


@pytest.mark.parametrize(("line", "key"), BAD, ids=[key for _, key in BAD])
def test_bad_file_is_one_error_naming_the_key_before_anything_runs(
    tmp_path, no_training, line, key
):
    path = tmp_path / "bad.toml"
    path.write_text(bad_file(line))
    db = tmp_path / "runs.sqlite"
    result = cli.invoke(app, ["sweep", str(path), "--db", str(db)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {key}: "), result.stderr
    assert not db.exists()


def test_a_missing_file_and_bad_options_are_errors_too(tmp_path, no_training):
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    db = tmp_path / "runs.sqlite"
    cases = [
        ([str(tmp_path / "missing.toml")], "sweep"),
        ([str(path), "--executor", "slurm"], "executor"),
        ([str(path), "--workers", "0"], "workers"),
        ([str(path), "--address", "10.0.0.1:6379"], "address"),
    ]
    for args, key in cases:
        result = cli.invoke(app, ["sweep", *args, "--db", str(db)])
        assert result.exit_code == 2, result.output
        assert result.stderr.startswith(f"error: {key}: "), result.stderr
    assert not db.exists()


def test_sweep_runs_stores_and_resumes(tmp_path):
    path = tmp_path / "good.toml"
    path.write_text(GOOD)
    db = tmp_path / "runs.sqlite"
    first = cli.invoke(app, ["sweep", str(path), "--db", str(db), "--json"])
    assert first.exit_code == 0, first.output
    report = json.loads(first.stdout)
    assert (report["planned"], report["ran"], report["ok"], report["skipped"]) == (4, 4, 4, 0)
    assert report["study"] == "cli" and report["executor"] == "inline"
    assert report["best"]["metric"] == "val_metric"
    assert "4/4" in first.stderr and "best val_metric" in first.stderr  # the progress line
    with Store(db) as store:
        finals = [r.final["val_metric"] for r in store.runs("cli")]
        assert {r.id for r in store.runs("cli")} == {s.run_id for s in plan(load_sweep(path))}
    assert report["best"]["value"] == max(finals)
    again = cli.invoke(app, ["sweep", str(path), "--db", str(db)])
    assert again.exit_code == 0, again.output
    assert "already stored  4" in again.stdout.replace("│", " ")


def test_example_sweep_files_are_valid():
    examples = sorted((Path(__file__).resolve().parents[2] / "examples").glob("*.toml"))
    assert len(examples) >= 2
    for path in examples:
        sweep = load_sweep(path)
        check(sweep)
        assert plan(sweep)
