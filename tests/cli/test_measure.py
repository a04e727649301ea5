"""``batchlab lr-find`` and ``batchlab sharpness`` through the typer app."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from batchlab.cli import app
from batchlab.engine.sharpness import top_hessian_eigenvalue
from batchlab.engine.spec import RunResult, RunSpec
from batchlab.engine.tasks import get_task
from batchlab.sweep.store import Store

runner = CliRunner()


def test_lr_find_json_and_plot(tmp_path: Path) -> None:
    plot = tmp_path / "lr.png"
    args = ["lr-find", "--task", "digits-mlp", "--batch-sizes", "256,32", "--seeds", "2"]
    args += ["--steps", "50", "--start-lr", "1e-4", "--momentum", "0.9", "--plot", str(plot)]
    res = runner.invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    assert [b["batch_size"] for b in out["batch_sizes"]] == [32, 256]
    assert out["settings"]["momentum"] == 0.9 and out["method"] == "valley"
    for entry in out["batch_sizes"]:
        seeds = [s["suggested_lr"] for s in entry["seeds"]]
        assert len(seeds) == 2 and all(s["steps"] <= 50 for s in entry["seeds"])
        geo = math.exp(sum(math.log(s) for s in seeds) / 2)
        assert entry["suggested_lr"] == pytest.approx(geo)
        assert entry["suggestions"]["valley"] == pytest.approx(geo)
    lrs = [b["suggested_lr"] for b in out["batch_sizes"]]
    assert out["exponent"]["exponent"] == pytest.approx(math.log(lrs[1] / lrs[0]) / math.log(8))
    assert plot.stat().st_size > 1000 and out["plot"] == str(plot)


def test_lr_find_table() -> None:
    res = runner.invoke(app, ["lr-find", "--task", "digits-mlp", "-b", "64", "--seeds", "1"])
    assert res.exit_code == 0, res.output
    assert "valley*" in res.stdout and "steepest" in res.stdout
    assert "B^" not in res.stdout  # one batch size: no exponent


@pytest.mark.parametrize(
    ("extra", "line"),
    [
        ([], "error: batch_size: give --batch-size"),
        (
            ["-b", "32", "--start-lr", "0.1", "--end-lr", "0.01"],
            "error: end_lr: must be a number in (0.1, 1e+10], got 0.01",
        ),
        (["--batch-sizes", "32,abc"], "error: batch_sizes: expected comma-separated integers"),
        (["-b", "0"], "error: batch_size: every batch size must be >= 1"),
        (["-b", "32", "--seeds", "0"], "error: seeds: must be >= 1"),
        (["-b", "32", "--optimizer", "lion"], "error: optimizer: must be one of"),
        (
            ["-b", "32", "--optimizer", "adam", "--momentum", "0.9"],
            "error: momentum: applies to sgd only",
        ),
        (["-b", "32", "--method", "best"], "error: method: must be one of"),
        (["-b", "32", "--steps", "1"], "error: steps: must be an integer >= 2"),
    ],
)
def test_lr_find_bad_input(extra: list[str], line: str) -> None:
    res = runner.invoke(app, ["lr-find", "--task", "digits-mlp", *extra])
    assert res.exit_code == 2
    assert line in res.stderr


def test_lr_find_unknown_task() -> None:
    res = runner.invoke(app, ["lr-find", "--task", "no-such-task", "-b", "32"])
    assert res.exit_code == 2 and res.stderr.startswith("error: ")


@pytest.fixture
def store_with_runs(tmp_path: Path) -> tuple[Path, str, str, dict[str, torch.Tensor]]:
    """A store with one run that saved its weights and one that did not."""
    task = get_task("digits-mlp")
    model = task.make_model(1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(2.0)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    saved = RunSpec(task="digits-mlp", batch_size=64, lr=0.05, seed=1)
    unsaved = saved.replace(lr=0.1)
    db = tmp_path / "runs.sqlite"
    with Store(db) as store:
        for spec, w in ((saved, weights), (unsaved, None)):
            result = RunResult(spec=spec, status="ok", steps=10, samples=640, wall_s=0.1)
            store.put(result, weights=w)
    return db, saved.run_id, unsaved.run_id, weights


def test_sharpness_of_a_stored_run(store_with_runs) -> None:
    db, run_id, _, weights = store_with_runs
    res = runner.invoke(app, ["sharpness", "--db", str(db), "--run", run_id, "--json"])
    assert res.exit_code == 0, res.output
    out = json.loads(res.stdout)
    task = get_task("digits-mlp")
    model = task.make_model(1)
    model.load_state_dict(weights)
    exact = top_hessian_eigenvalue(model, task.loss_fn, task.x_train, task.y_train)
    assert out["run"] == run_id and out["lr"] == 0.05
    assert out["top_eigenvalue"] == pytest.approx(exact, rel=1e-6)
    assert out["stability_edge"] == pytest.approx(40.0)
    assert out["edge_ratio"] == pytest.approx(exact / 40.0)
    assert out["keskar"] > 0 and out["n_examples"] == task.n_train

    table = runner.invoke(app, ["sharpness", "--db", str(db), "--run", run_id, "--no-keskar"])
    assert table.exit_code == 0, table.output
    assert "top Hessian eigenvalue" in table.stdout and "stability edge 2/lr" in table.stdout


def test_sharpness_errors(store_with_runs, tmp_path: Path) -> None:
    db, run_id, unsaved_id, _ = store_with_runs
    res = runner.invoke(app, ["sharpness", "--db", str(db), "--run", unsaved_id])
    assert res.exit_code == 2
    assert "error: run:" in res.stderr and "--save-weights" in res.stderr
    res = runner.invoke(app, ["sharpness", "--db", str(db), "--run", "0000"])
    assert res.exit_code == 2 and "error: run: no run '0000'" in res.stderr
    missing = tmp_path / "missing.sqlite"
    res = runner.invoke(app, ["sharpness", "--db", str(missing), "--run", "0000"])
    assert res.exit_code == 2 and res.stderr.startswith("error: db:")
    assert not missing.exists()  # read-only: never creates a store
    res = runner.invoke(app, ["sharpness", "--db", str(db), "--run", run_id, "--epsilon", "0"])
    assert res.exit_code == 2 and "error: epsilon: must be a number > 0" in res.stderr
