"""``batchlab report`` and ``batchlab summary``: exit codes, JSON fields, error lines."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tests.analysis.synthetic import Truth, write_study
from typer.testing import CliRunner

from batchlab.cli import app
from batchlab.sweep.store import Store

runner = CliRunner()


@pytest.fixture(scope="module")
def db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cli") / "runs.sqlite"
    with Store(path) as store:
        write_study(store, "demo", Truth(), [16, 64, 256], seeds=(0, 1), steps=3000, eval_every=100)
    return path


def test_summary_json_has_the_key_numbers(db: Path) -> None:
    result = runner.invoke(app, ["summary", "--db", str(db), "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["study"] == "demo" and data["target"] == {"metric": "val_metric", "value": 0.9}
    assert data["batch_sizes"] == [16, 64, 256]
    assert data["scaling"]["critical_batch"] > 0
    assert [r["batch_size"] for r in data["to_target"]] == [16, 64, 256]
    assert data["best_lr"]["alpha"] == pytest.approx(0.5, abs=1e-6)
    assert data["cost"][0]["speedup"] == 1.0
    assert data["noise"] is None  # this study measured no noise scale: null, not an error


def test_summary_tables_and_target_override(db: Path) -> None:
    result = runner.invoke(app, ["summary", "--db", str(db), "--target", "val_loss=0.5"])
    assert result.exit_code == 0, result.output
    assert "critical batch B_crit" in result.stdout and "val_loss <= 0.5" in result.stdout
    assert "per batch size" in result.stdout


def test_report_writes_page_and_figures(db: Path, tmp_path: Path) -> None:
    out = tmp_path / "report"
    result = runner.invoke(
        app, ["report", "--db", str(db), "--out", str(out), "--study", "demo", "--json"]
    )
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert data["index"] == str(out / "index.html") and (out / "index.html").is_file()
    assert len(data["figures"]) == 5  # no noise scale measured: that figure is a note
    assert all(Path(p).is_file() and Path(p).with_suffix(".svg").is_file() for p in data["figures"])


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["summary", "--db", "missing.sqlite"], "error: db: no such file"),
        (["report", "--db", "missing.sqlite", "--out", "r"], "error: db: no such file"),
        (["summary", "--study", "nope"], "error: study: no study 'nope'"),
        (["summary", "--target", "val_metric"], "error: target: expected METRIC=VALUE"),
        (["summary", "--target", "accuracy=0.9"], "error: target: metric must be one of"),
        (["summary", "--target", "val_loss=low"], "error: target: value must be a number"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    db: Path, tmp_path: Path, monkeypatch, args, line
) -> None:
    monkeypatch.chdir(tmp_path)
    if "--db" not in args:
        args = [*args, "--db", str(db)]
    result = runner.invoke(app, args)
    assert result.exit_code == 2
    assert result.stderr.strip().startswith(line), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
