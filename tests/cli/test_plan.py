"""``batchlab plan``: predictions from given numbers and a throughput file, one measured run on a
small task, the figure, one-line errors; ``advise --throughput``."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from typer.testing import CliRunner

from batchlab.cli import app
from batchlab.core.plan import ThroughputTable

runner = CliRunner()


@pytest.fixture
def table_file(tmp_path):
    table = ThroughputTable(
        device="cpu", task="toy", optimizer="sgd", batch_sizes=(8, 64, 512),
        seconds=(0.001, 0.0015, 0.006), spread=(0.0, 0.0, 0.0), repeats=5, warmup_steps=3,
        max_batch=512, max_batch_source="given", peak_memory=(),
    )  # fmt: skip
    path = tmp_path / "tp.json"
    path.write_text(json.dumps(table.to_dict()))
    return path


def _plan(*args: str) -> dict:
    result = runner.invoke(app, ["plan", *args, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_given_numbers_predict_and_recommend(table_file):
    out = _plan(
        "--throughput", str(table_file), "--critical-batch", "200", "--critical-low", "100",
        "--critical-high", "400", "--target-steps", "3000", "--reference-batch", "32",
        "--batch-sizes", "8,32,128,512,2048", "--batch-size", "32", "--lr", "0.05",
        "--train-size", "10000",
    )  # fmt: skip
    preds = {p["batch_size"]: p for p in out["predictions"]}
    assert preds[32]["steps"] == pytest.approx(3000)  # exact at the reference batch
    s_min = 3000 / (1 + 200 / 32)
    assert preds[512]["steps"] == pytest.approx(s_min * (1 + 200 / 512))
    assert preds[512]["step_time_s"] == pytest.approx(0.006)
    assert preds[2048]["accumulation"] == 4  # beyond the 512 that fits
    low, high = preds[8]["steps_interval"]
    assert low < preds[8]["steps"] < high
    best = min(out["predictions"], key=lambda p: p["wall_s"])
    assert out["fastest"]["batch_size"] == best["batch_size"]
    advice = out["fastest"]["advice"]
    assert advice["rule"] == "critical" and advice["base_batch"] == 32
    assert advice["warmup_steps"] is not None


def test_cheapest_may_use_fewer_devices(table_file):
    out = _plan(
        "--throughput", str(table_file), "--critical-batch", "200", "--target-steps", "500",
        "--devices", "4",
    )  # fmt: skip
    assert all(p["devices"] == 4 for p in out["predictions"])
    assert out["cheapest"]["device_hours"] <= min(p["device_hours"] for p in out["predictions"])
    assert out["fastest"]["wall_s"] <= min(p["wall_s"] for p in out["predictions"])


def test_table_and_plot(table_file, tmp_path):
    png = tmp_path / "plan.png"
    result = runner.invoke(
        app,
        ["plan", "--throughput", str(table_file), "--critical-batch", "200", "--target-steps",
         "500", "--plot", str(png)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "fastest" in result.stdout and "cheapest" in result.stdout
    assert png.read_bytes()[:4] == b"\x89PNG"


def test_measures_on_a_task():
    out = _plan(
        "--task", "digits-mlp", "--noise-steps", "40", "--batch-sizes", "8,32,128",
        "--device", "cpu",
    )  # fmt: skip
    assert "noise scale" in out["critical_source"] and out["critical_batch"] > 0
    assert out["target"]["reference_batch"] == 64 and out["target"]["steps"] == 40
    assert [m["batch_size"] for m in out["throughput"]["measured"]] == [8, 32, 128]
    assert out["fastest"]["advice"]["rule"] == "critical"


def test_measures_at_the_users_setting():
    """With --batch-size/--lr/--optimizer the measuring run trains there, and the advice starts
    from it (Adam: the surge rule)."""
    out = _plan(
        "--task", "digits-mlp", "--noise-steps", "30", "--batch-sizes", "8,32",
        "--batch-size", "16", "--lr", "0.002", "--optimizer", "adam", "--device", "cpu",
    )  # fmt: skip
    assert "30 adam steps" in out["critical_source"] and "B=16, lr=0.002" in out["critical_source"]
    assert out["target"]["reference_batch"] == 16 and out["target"]["steps"] == 30
    assert out["fastest"]["advice"]["rule"] == "surge"


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--critical-batch", "200", "--target-steps", "5"], "throughput"),
        (["--throughput", "TP", "--target-steps", "5"], "critical_batch"),
        (["--throughput", "TP", "--critical-batch", "200"], "target_steps"),
        (["--throughput", "TP", "--critical-batch", "-1", "--target-steps", "5"], "critical_batch"),
        (["--throughput", "TP", "--critical-batch", "9", "--target-steps", "5", "--target-samples",
          "9", "--reference-batch", "4"], "target_samples"),
        (["--throughput", "TP", "--critical-batch", "9", "--target-steps", "5", "--lr", "0.1"],
         "lr"),
        (["--throughput", "TP", "--critical-batch", "9", "--target-steps", "5", "--plot", "x.pdf"],
         "plot"),
        (["--throughput", "TP", "--critical-batch", "9", "--target-steps", "5", "--batch-sizes",
          "8,x"], "batch_sizes"),
        (["--throughput", "MISSING", "--critical-batch", "9", "--target-steps", "5"], "throughput"),
        (["--throughput", "BAD", "--critical-batch", "9", "--target-steps", "5"], "throughput"),
    ],
)  # fmt: skip
def test_bad_input_is_one_line_and_exit_2(args, field, table_file, tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"format": "batchlab-throughput/1", "device": 3}))
    paths = {"TP": str(table_file), "MISSING": str(tmp_path / "none.json"), "BAD": str(bad)}
    result = runner.invoke(app, ["plan", *(paths.get(a, a) for a in args)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}: "), result.stderr


def test_advise_gains_time_and_cost(table_file):
    result = runner.invoke(
        app,
        ["advise", "--batch-size", "8", "--lr", "0.05", "--to-batch-size", "64", "--noise-scale",
         "200", "--train-size", "6400", "--epochs", "1", "--throughput", str(table_file), "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    costs = json.loads(result.stdout)["costs"]
    assert costs["step_time_s"] == pytest.approx([0.001, 0.0015])
    assert costs["wall_s"] == pytest.approx([800 * 0.001, 100 * 0.0015])


def test_advise_without_train_size_or_epochs():
    result = runner.invoke(
        app, ["advise", "--batch-size", "64", "--lr", "1e-3", "--to-batch-size", "256",
              "--optimizer", "adam", "--noise-scale", "500", "--json"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    out = json.loads(result.stdout)
    assert out["rule"] == "surge" and out["total_steps"] is None
    assert out["beta2"] == pytest.approx(0.999**4)


def test_plan_arithmetic_needs_no_torch():
    code = (
        "import sys; from batchlab.core.plan import *; from batchlab.core.rules import advise\n"
        "fit = fit_step_time([8, 64], [0.001, 0.002])\n"
        "p = predict([8, 64], target=Target(100.0), critical_batch=50.0, step_time=fit)\n"
        "recommend(p, critical_batch=50.0, base_batch=8, base_lr=0.1)\n"
        "print('torch' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
