"""``batchlab train``: JSON output, the store, and one clear error line for every bad input."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from batchlab.cli import app
from batchlab.sweep.store import Store

runner = CliRunner()
BASE = ["train", "--task", "digits-mlp", "--batch-size", "64", "--lr", "0.1", "--steps", "30"]


def run(*args: str):
    return runner.invoke(app, [*BASE, *args])


def test_json_has_the_documented_fields():
    res = run("--momentum", "0.9", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["status"] == "ok" and out["steps"] == 30 and out["samples"] == 30 * 64
    assert {"train_loss", "val_loss", "val_metric"} <= set(out["final"])
    assert out["wall_s"] > 0 and out["spec"]["momentum"] == 0.9


def test_human_output_is_a_table():
    res = run()
    assert res.exit_code == 0
    assert "val loss / metric" in res.stdout and "digits-mlp" in res.stdout


def test_db_stores_the_run_with_weights_and_sharpness(tmp_path):
    db = tmp_path / "runs.sqlite"
    res = run("--db", str(db), "--save-weights", "--sharpness", "--study", "s", "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert out["extra"]["sharpness"]["top_eigenvalue"] > 0
    with Store(db) as store:
        record = store.get(out["id"])
        assert record is not None and record.studies == ("s",)
        assert store.weights(out["id"]) is not None
        assert len(store.history(out["id"])) >= 2


def test_diverging_run_is_a_result_not_a_crash():
    res = runner.invoke(
        app, [*BASE[:-4], "--lr", "1e5", "--momentum", "0.9", "--steps", "30", "--json"]
    )
    assert res.exit_code == 0
    assert json.loads(res.stdout)["status"] == "diverged"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--batch-size", "0"], "batch_size"),
        (["--batch-size", "100000"], "batch_size"),
        (["--lr", "0"], "lr"),
        (["--lr", "-1"], "lr"),
        (["--optimizer", "lion"], "optimizer"),
        (["--momentum", "1.5"], "momentum"),
        (["--task", "no-such-task"], "task"),
        (["--schedule", "zigzag"], "schedule"),
        (["--epochs", "2"], "budget"),
        (["--save-weights"], "save_weights"),
        (["--task-option", "novalue"], "task_option"),
        (["--threads", "0"], "threads"),
        (["-o", "norm=ghost", "-o", "ghost_batch_size=48"], "ghost_batch_size"),
        (["--max-batch-size", "512"], "adaptive_batch"),
        (["--adaptive-batch", "--adaptive-rule", "cubic"], "adaptive_options.rule"),
        (["--adaptive-batch", "--adaptive-option", "patience=0"], "adaptive_options.patience"),
        (["--adaptive-batch", "--adaptive-option", "grow=2"], "adaptive_options.grow"),
        (["--adaptive-batch", "--max-batch-size", "32"], "adaptive_options.max_batch"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, field):
    res = run(*args)
    assert res.exit_code == 2
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}: ")


def test_adaptive_batch_grows_and_the_store_keeps_each_change(tmp_path):
    db = tmp_path / "runs.sqlite"
    args = ["--batch-size", "8", "--steps", "150", "--adaptive-batch", "--adaptive-rule", "linear"]
    res = run(*args, "--max-batch-size", "32", "--db", str(db), "--json")
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    changes = out["extra"]["adaptive_batch"]["changes"]
    assert [c["batch_size"] for c in changes] == [16, 32]  # one doubling each, up to the bound
    assert [c["lr"] for c in changes] == pytest.approx([0.2, 0.4])
    assert out["spec"]["adaptive_options"] == {"rule": "linear", "max_batch": 32}
    with Store(db) as store:
        record = store.get(out["id"])
        stored = record.extra["adaptive_batch"]["changes"]
        assert [(c["step"], c["batch_size"], c["lr"]) for c in stored] == [
            (c["step"], c["batch_size"], c["lr"]) for c in changes
        ]
        sizes = [row["batch_size"] for row in store.history(out["id"])]
        assert sizes[0] == 8 and sizes[-1] == 32
    table = run(*args)
    assert table.exit_code == 0 and "adaptive batch (linear)" in table.stdout


def test_unreadable_db_is_exit_2_and_left_alone(tmp_path):
    db = tmp_path / "runs.sqlite"
    db.write_text("not a database")
    res = run("--db", str(db))
    assert res.exit_code == 2 and res.stderr.startswith("error: db: ")
    assert db.read_text() == "not a database"
