"""``batchlab advise``: JSON fields against the papers' numbers, the table, and one-line errors."""

from __future__ import annotations

import json
import math

import pytest
from typer.testing import CliRunner

from batchlab.cli import app

runner = CliRunner()
IMAGENET = [
    "advise", "--batch-size", "256", "--lr", "0.1", "--to-batch-size", "8192",
    "--train-size", "1281167", "--epochs", "90",
]  # fmt: skip


def _json(*extra: str) -> dict:
    result = runner.invoke(app, [*IMAGENET, *extra, "--json"])
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def test_goyal_imagenet_json():
    out = _json("--optimizer", "sgd", "--momentum", "0.9")
    assert out["rule"] == "linear" and out["requested_rule"] == "auto"
    assert out["lr"] == pytest.approx(3.2)
    assert out["warmup_epochs"] == 5.0 and out["warmup_start_lr"] == pytest.approx(0.1)
    assert out["warmup_steps"] == math.ceil(5 * 1281167 / 8192)
    assert out["total_steps"] == math.ceil(90 * 1281167 / 8192)
    assert out["noise_temperature"] == pytest.approx(out["base_noise_temperature"])
    assert out["warnings"] == []
    assert "beta1" not in out and "steps_ratio" not in out


def test_noise_scale_gives_steps_and_samples_ratios():
    out = _json("--noise-scale", "15000")
    assert out["rule"] == "critical"
    s0, s1 = 1 + 15000 / 256, 1 + 15000 / 8192  # S = S_min (1 + B_noise / B)
    assert out["steps_ratio"] == pytest.approx(s1 / s0)
    assert out["samples_ratio"] == pytest.approx((1 + 8192 / 15000) / (1 + 256 / 15000))
    assert out["lr"] == pytest.approx(0.1 * s0 / s1)  # the AdaScale gain
    assert out["efficiency"] == pytest.approx(1 / out["samples_ratio"])
    assert out["warnings"] == []
    beyond = _json("--noise-scale", "4000")
    assert any("critical batch size" in w for w in beyond["warnings"])


def test_adam_fields_malladi_k4():
    result = runner.invoke(
        app,
        ["advise", "--batch-size", "64", "--lr", "0.001", "--to-batch-size", "256",
         "--optimizer", "adam", "--train-size", "50000", "--epochs", "10", "--json"],
    )  # fmt: skip
    out = json.loads(result.stdout)
    assert out["rule"] == "adam_sqrt"
    assert out["lr"] == pytest.approx(0.002)
    assert (out["beta1"], out["beta2"]) == (pytest.approx(0.6), pytest.approx(0.996))
    assert out["eps"] == pytest.approx(0.5e-8)
    assert "noise_temperature" not in out


def test_warnings_sqrt_sgd_and_batch_beyond_training_set():
    out = _json("--rule", "sqrt", "--train-size", "5000")
    text = " ".join(out["warnings"])
    assert "Table 2a" in text and "larger than the training set" in text
    assert out["lr"] == pytest.approx(0.1 * math.sqrt(32))
    assert any("N/10" in w for w in _json("--train-size", "50000")["warnings"])


def test_table_cites_every_figure():
    result = runner.invoke(
        app, [*IMAGENET, "--momentum", "0.9", "--noise-scale", "15000"], env={"COLUMNS": "200"}
    )
    assert result.exit_code == 0, result.output
    for text in ("learning rate", "2.105", "arXiv:1812.06162", "arXiv:1706.02677",
                 "arXiv:1711.00489", "782 steps", "14076", "why: auto: sgd"):  # fmt: skip
        assert text in result.stdout


@pytest.mark.parametrize(
    ("args", "field"),
    [
        (["--batch-size", "0"], "batch_size"),
        (["--to-batch-size", "-8"], "to_batch_size"),
        (["--lr", "0"], "lr"),
        (["--lr", "-0.1"], "lr"),
        (["--momentum", "1.0"], "momentum"),
        (["--momentum", "-0.5"], "momentum"),
        (["--rule", "cubic"], "rule"),
        (["--noise-scale", "0"], "noise_scale"),
        (["--noise-scale", "-3"], "noise_scale"),
        (["--rule", "surge"], "noise_scale"),
        (["--optimizer", "lamb"], "optimizer"),
        (["--train-size", "0"], "train_size"),
        (["--epochs", "0"], "epochs"),
        (["--optimizer", "adam", "--rule", "adam_sqrt"], "to_batch_size"),
        (["--optimizer", "adam", "--beta2", "1"], "beta2"),
        (["--warmup-epochs", "-1"], "warmup_epochs"),
    ],
)
def test_bad_input_is_one_error_line(args, field):
    result = runner.invoke(app, [*IMAGENET, *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {field}: "), result.stderr
    assert result.stdout == ""
