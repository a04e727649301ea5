"""``batchlab noise``: estimates against exact per-example gradients at a fixed point (lr 0), the modes
against each other and against ``train --noise-scale``, the scaling table against its closed form, the
store, and one clear error line for every bad input."""

from __future__ import annotations

import json
import statistics

import pytest
import torch
from torch.func import functional_call, grad, vmap
from typer.testing import CliRunner

from batchlab.cli import app
from batchlab.engine.tasks import get_task
from batchlab.sweep.store import Store

runner = CliRunner()


def invoke(*args: str, task: str = "digits-mlp"):
    return runner.invoke(app, ["noise", "--task", task, "--batch-size", "64", *args])


def run(*args: str, task: str = "digits-mlp") -> dict:
    res = invoke(*args, "--json", task=task)
    assert res.exit_code == 0, res.output
    return json.loads(res.stdout)


@pytest.fixture(scope="module")
def exact_noise_scale() -> float:
    """B_simple = tr(Sigma) / |G|^2 of ``make_model(0)`` over the whole training set."""
    task = get_task("digits-mlp")
    model = task.make_model(0)
    params = {k: v.detach() for k, v in model.named_parameters()}

    def loss(p, x, y):
        return task.loss_fn(functional_call(model, p, (x[None],)), y[None])

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))(params, task.x_train, task.y_train)
    g = torch.cat([v.reshape(v.shape[0], -1) for v in per_example.values()], 1).double()
    grad_sq = g.mean(0).square().sum().item()
    return (g.square().sum(1).mean().item() - grad_sq) / grad_sq


@pytest.fixture(scope="module")
def at_init() -> dict[str, dict]:
    """lr 0, 400 steps, in each mode (accumulation: 4 micro-batches of 16, as split cuts 64)."""
    common = ("--lr", "0", "--steps", "400")
    return {
        "per_example": run(*common),
        "split": run(*common, "--mode", "split"),
        "accumulation": run(*common, "--micro-batch-size", "16"),
    }


def test_json_has_the_documented_fields_and_ordered_intervals():
    out = run("--lr", "0.1", "--steps", "300", "--momentum", "0.9")
    assert out["status"] == "ok" and out["steps"] == 300 and out["mode"] == "per_example"
    assert set(out["noise_scale"]) == {"start", "middle", "end"}
    steps = [out["noise_scale"][phase]["step"] for phase in ("start", "middle", "end")]
    assert steps[0] < steps[1] < steps[2] == 300
    history = out["history"]
    assert len(history) >= 40
    assert [h["step"] for h in history] == sorted({h["step"] for h in history})
    assert history[-1]["noise_scale"] == out["noise_scale"]["end"]["value"]
    for est in [*out["noise_scale"].values(), *history]:
        value = est.get("value", est.get("noise_scale"))
        high = math_inf_if_none(est["high"])
        assert 0 <= est["low"] <= value <= high
    assert out["critical_batch"]["value"] == out["noise_scale"]["end"]["value"]


def math_inf_if_none(value: float | None) -> float:
    """JSON writes an unbounded interval's ``inf`` as null."""
    return float("inf") if value is None else value


def test_lr_0_keeps_the_initial_weights():
    task = get_task("digits-mlp")
    with torch.no_grad():
        initial = task.loss_fn(task.make_model(0)(task.x_train), task.y_train).item()
    for optimizer in (["--momentum", "0.9"], ["--optimizer", "adam"]):
        out = run("--lr", "0", "--steps", "50", *optimizer)
        assert out["final"]["train_loss"] == pytest.approx(initial, rel=1e-6)
        assert len(out["history"]) >= 45 and out["noise_scale"]["end"]["value"] > 0


def test_lr_0_converges_to_the_exact_noise_scale_in_every_mode(at_init, exact_noise_scale):
    for mode, out in at_init.items():
        assert out["mode"] == mode and out["steps"] == 400
        values = [h["noise_scale"] for h in out["history"]]
        late = statistics.median(values[len(values) // 2 :])
        assert late == pytest.approx(exact_noise_scale, rel=0.1), mode
        covered = [
            h["low"] <= exact_noise_scale <= math_inf_if_none(h["high"]) for h in out["history"]
        ]
        assert sum(covered) >= 0.85 * len(covered), mode
        end = out["noise_scale"]["end"]
        assert end["low"] <= exact_noise_scale <= end["high"], mode


def test_lr_0_with_the_default_steps_prints_the_exact_value_within_5_percent(exact_noise_scale):
    """A fixed point: every step's measurement counts equally (ratio of the sums over all steps)."""
    out = run("--lr", "0")
    end = out["noise_scale"]["end"]
    assert out["steps"] == 3000 and end["step"] == 3000
    assert end["value"] == pytest.approx(exact_noise_scale, rel=0.05)
    assert end["low"] <= exact_noise_scale <= end["high"]
    assert end["high"] / end["low"] < 1.1  # 3000 steps pin it down


def test_split_and_accumulation_read_the_same_micro_batches(at_init):
    split, accumulation = at_init["split"], at_init["accumulation"]
    assert split["noise_splits"] == 4 and accumulation["micro_batch_size"] == 16
    for a, b in zip(split["history"], accumulation["history"], strict=True):
        assert a["step"] == b["step"]
        assert a["noise_scale"] == pytest.approx(b["noise_scale"], rel=1e-6)


def test_default_mode_matches_train_noise_scale():
    args = ["--lr", "0.1", "--steps", "120"]
    out = run(*args)
    train = ["train", "--task", "digits-mlp", "-b", "64", *args, "--noise-scale", "--json"]
    res = runner.invoke(app, train)
    assert res.exit_code == 0, res.output
    trained = json.loads(res.stdout)
    assert trained["id"] == out["id"]
    assert trained["extra"]["noise_scale"] == out["noise_scale"]


def test_scaling_table_follows_the_critical_rule():
    out = run("--lr", "0.1", "--steps", "200")
    crit = out["critical_batch"]["value"]
    rows = {row["batch_size"]: row for row in out["scaling"]["rows"]}
    assert {16, 32, 64, 128, 256, 512, 1024, round(crit)} == set(rows)
    assert rows[64]["lr"] == pytest.approx(0.1) and rows[64]["steps_ratio"] == pytest.approx(1)
    for b, row in rows.items():  # S = S_min (1 + B_noise/B), E = E_min (1 + B/B_noise)
        assert row["steps_ratio"] == pytest.approx((1 + crit / b) / (1 + crit / 64))
        assert row["samples_ratio"] == pytest.approx(row["steps_ratio"] * b / 64)
        assert row["lr"] == pytest.approx(0.1 * (1 + crit / 64) / (1 + crit / b))
    assert out["critical_batch"]["steps_over_min"] == pytest.approx(1 + crit / 64)


def test_human_output_names_the_critical_batch():
    res = invoke("--lr", "0", "--steps", "100")
    assert res.exit_code == 0, res.output
    assert "B_crit" in res.stdout and "this run" in res.stdout and "per_example" in res.stdout


def test_db_stores_the_run_and_its_noise_history(tmp_path):
    db = tmp_path / "runs.sqlite"
    out = run("--lr", "0.1", "--steps", "100", "--db", str(db), "--study", "gns")
    with Store(db) as store:
        record = store.get(out["id"])
        assert record is not None and record.studies == ("gns",)
        stored = {r["step"]: r["noise_scale"] for r in store.history(out["id"])}
    # the store also keeps the rows before the first estimate
    assert len(stored) > len(out["history"]) >= 40
    assert [stored[h["step"]] for h in out["history"]] == [h["noise_scale"] for h in out["history"]]
    again = run("--lr", "0.1", "--steps", "100", "--mode", "split", "--db", str(db))
    assert again["id"] != out["id"]  # the mode is part of the spec, so of the run's id
    with Store(db) as store:
        assert {r.id for r in store.runs()} == {out["id"], again["id"]}


USER_TASKS = """
import dataclasses

import torch
from torch import nn

from batchlab.engine.tasks import get_task, seeded_model_factory


class Scaled(nn.Module):  # a parameter used outside the functions per_example knows
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.body(x) * self.scale


class Broken(nn.Linear):
    def forward(self, x):
        raise RuntimeError("this model always fails")


def make_task(kind="scaled"):
    build = {"scaled": Scaled, "broken": lambda: Broken(64, 10)}[kind]
    return dataclasses.replace(get_task("digits-mlp"), make_model=seeded_model_factory(build))
"""


@pytest.fixture
def user_tasks(tmp_path, monkeypatch) -> str:
    (tmp_path / "noise_user_tasks.py").write_text(USER_TASKS)
    monkeypatch.syspath_prepend(str(tmp_path))
    return "noise_user_tasks:make_task"


def test_per_example_falls_back_to_split_and_says_so(user_tasks):
    res = invoke("--lr", "0.1", "--steps", "60", task=user_tasks)
    assert res.exit_code == 0, res.output
    assert "per_example fell back to split" in res.stdout and "Scaled" in res.stdout
    out = run("--lr", "0.1", "--steps", "60", "--noise-splits", "8", task=user_tasks)
    assert out["mode"] == "split" and out["noise_splits"] == 8 and "Scaled" in out["fallback"]
    assert out["noise_scale"]["end"]["value"] > 0


def test_a_failing_model_is_a_failed_result(user_tasks):
    res = invoke("--lr", "0.1", "--steps", "20", "-o", "kind=broken", "--json", task=user_tasks)
    assert res.exit_code == 1 and res.stderr.startswith("error: run: ")
    assert "this model always fails" in res.stderr.splitlines()[-1]
    out = json.loads(res.stdout)
    assert out["status"] == "failed" and "this model always fails" in out["error"]
    assert out["history"] == [] and out["critical_batch"] is None


def test_diverging_run_is_a_result_without_estimates():
    out = run("--lr", "1e5", "--momentum", "0.9", "--steps", "30")
    assert out["status"] == "diverged" and out["diverged_at"] is not None
    assert out["noise_scale"]["end"] == {"value": None, "low": None, "high": None, "step": None}
    assert out["critical_batch"] is None and out["scaling"] is None


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--batch-size", "1"], "batch_size"),
        (["--batch-size", "0"], "batch_size"),
        (["--batch-size", "100000"], "batch_size"),
        (["--micro-batch-size", "24"], "micro_batch_size"),
        (["--micro-batch-size", "64"], "micro_batch_size"),
        (["--mode", "accumulation"], "micro_batch_size"),
        (["--mode", "split", "--micro-batch-size", "16"], "micro_batch_size"),
        (["--lr", "-1"], "lr"),
        (["--lr", "nan"], "lr"),
        (["--task", "no-such-task"], "task"),
        (["--mode", "distributed"], "mode"),
        (["--mode", "sideways"], "mode"),
        (["--task-option", "norm=batch"], "mode"),
        (["--mode", "split", "--noise-splits", "1"], "noise_splits"),
        (["--mode", "split", "--noise-splits", "65"], "noise_splits"),
        (["--micro-batch-size", "16", "--noise-splits", "4"], "noise_splits"),
        (["--steps", "1"], "steps"),
        (["--optimizer", "lion"], "optimizer"),
        (["--momentum", "1.5"], "momentum"),
        (["--task-option", "novalue"], "task_option"),
        (["--device", "abacus"], "device"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, field):
    res = invoke("--lr", "0.1", "--steps", "20", *args)
    assert res.exit_code == 2, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}: "), res.stderr


def test_unreadable_db_is_exit_2_and_left_alone(tmp_path):
    db = tmp_path / "runs.sqlite"
    db.write_text("not a database")
    res = invoke("--lr", "0.1", "--steps", "20", "--db", str(db))
    assert res.exit_code == 2 and res.stderr.startswith("error: db: ")
    assert db.read_text() == "not a database"
