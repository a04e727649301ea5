"""``batchlab runs`` and ``batchlab export`` against a store built by hand."""

from __future__ import annotations

import csv
import hashlib
import json
import math
import sqlite3
import sys
from pathlib import Path

import pytest
from typer.testing import CliRunner

from batchlab.cli import app
from batchlab.engine.spec import RunResult, RunSpec
from batchlab.sweep.store import Store

runner = CliRunner()


def result(lr: float, status: str = "ok", seed: int = 0, batch_size: int = 64) -> RunResult:
    spec = RunSpec(task="digits-mlp", batch_size=batch_size, lr=lr, seed=seed, momentum=0.9)
    diverged = status == "diverged"
    history = [
        {
            "step": 10 * k,
            "samples": 10 * k * batch_size,
            "epoch": 10 * k * batch_size / 1437,
            "lr": lr,
            "batch_size": batch_size,
            "train_loss": math.nan if diverged and k == 2 else 2.0 / (k + 1),
            "val_loss": 2.1 / (k + 1),
            "val_metric": 0.3 * k,
            "wall_s": 0.1 * k,
            "noise_scale": None,
        }
        for k in range(3 if status != "failed" else 0)
    ]
    final = (
        {}
        if status == "failed"
        else {
            "train_loss": math.nan if diverged else 0.4,
            "train_metric": 0.9,
            "val_loss": math.inf if diverged else 0.5,
            "val_metric": 0.85,
        }
    )
    return RunResult(
        spec=spec,
        status=status,
        steps=20,
        samples=20 * batch_size,
        wall_s=0.3,
        history=history,
        final=final,
        diverged_at=20 if diverged else None,
        error="boom" if status == "failed" else None,
    )


@pytest.fixture
def db(tmp_path: Path) -> Path:
    path = tmp_path / "runs.sqlite"
    with Store(path) as store:
        store.put_many(
            [result(0.01), result(0.1), result(3.0, "diverged"), result(1.0, "failed")],
            study="grid",
        )
        store.put(result(0.05, seed=1, batch_size=256), study="big")
        store.link("big", [result(0.1).run_id])
    return path


def invoke(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def test_runs_json_lists_every_run_with_its_fields(db: Path):
    out = invoke("runs", "--db", db, "--json")
    assert out.exit_code == 0, out.output
    rows = json.loads(out.stdout)
    assert len(rows) == 5
    by_lr = {row["lr"]: row for row in rows}
    assert set(by_lr) == {0.01, 0.05, 0.1, 1.0, 3.0}
    assert by_lr[0.1]["studies"] == ["big", "grid"] and by_lr[0.1]["study"] == "big"
    assert (by_lr[0.05]["batch_size"], by_lr[0.05]["seed"], by_lr[0.05]["study"]) == (256, 1, "big")
    diverged = by_lr[3.0]
    assert (diverged["status"], diverged["diverged_at"], diverged["id"]) == (
        "diverged",
        20,
        result(3.0, "diverged").run_id,
    )
    assert diverged["final"] == {  # NaN and inf become null: any JSON parser reads the output
        "train_loss": None,
        "train_metric": 0.9,
        "val_loss": None,
        "val_metric": 0.85,
    }
    assert (by_lr[1.0]["status"], by_lr[1.0]["error"], by_lr[1.0]["final"]) == (
        "failed",
        "boom",
        {},
    )


def test_runs_filters_by_study_and_status(db: Path):
    rows = json.loads(invoke("runs", "--db", db, "--study", "big", "--json").stdout)
    assert sorted(r["lr"] for r in rows) == [0.05, 0.1]
    assert {r["study"] for r in rows} == {"big"}
    rows = json.loads(
        invoke("runs", "--db", db, "--study", "grid", "--status", "ok", "--json").stdout
    )
    assert sorted(r["lr"] for r in rows) == [0.01, 0.1]
    rows = json.loads(invoke("runs", "--db", db, "--status", "failed", "--json").stdout)
    assert [r["lr"] for r in rows] == [1.0]


def test_runs_prints_tables_of_studies_and_runs(db: Path):
    out = invoke("runs", "--db", db)
    assert out.exit_code == 0, out.output
    lines = out.stdout.splitlines()
    grid = next(line.split() for line in lines if line.startswith("grid "))
    assert grid[:5] == ["grid", "4", "2", "1", "1"]
    assert next(line.split() for line in lines if line.startswith("big "))[:5] == [
        "big",
        "2",
        "2",
        "0",
        "0",
    ]
    assert "5 runs, task digits-mlp" in out.stdout
    run = next(line.split() for line in lines if line.startswith(result(3.0, "diverged").run_id))
    assert run[1:4] == ["grid", "diverged", "64"] and "inf" in run
    one = invoke("runs", "--db", db, "--study", "big", "--status", "ok")
    assert "2 runs, study big, task digits-mlp" in one.stdout


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (["runs", "--study", "nope"], "error: study: no study 'nope'"),
        (["runs", "--status", "done"], "error: status: must be one of ok, diverged, failed"),
        (["export", "--format", "xlsx"], "error: format: must be one of csv, parquet"),
        (["export", "--study", "nope"], "error: study: no study 'nope'"),
    ],
)
def test_bad_options_are_one_line_and_exit_2(db: Path, tmp_path: Path, args: list[str], line: str):
    out = invoke(*args, "--db", db, *(["--out", tmp_path / "x"] if args[0] == "export" else []))
    assert out.exit_code == 2
    assert out.stderr.startswith(line) and out.stderr.count("\n") == 1
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("command", ["runs", "export"])
def test_a_missing_or_foreign_db_is_an_error_and_never_created(tmp_path: Path, command: str):
    missing = tmp_path / "missing.sqlite"
    out = invoke(command, "--db", missing, *(["--out", tmp_path] if command == "export" else []))
    assert out.exit_code == 2
    assert out.stderr == f"error: db: no such file '{missing}'\n"
    assert not missing.exists()
    junk = tmp_path / "junk.sqlite"
    junk.write_text("not a database at all, just text; long enough to have a header\n")
    out = invoke(command, "--db", junk)
    assert out.exit_code == 2 and out.stderr.startswith("error: db: ")
    assert "not a batchlab database" in out.stderr


def test_export_csv_writes_runs_and_history(db: Path, tmp_path: Path):
    out_dir = tmp_path / "out"
    out = invoke("export", "--db", db, "--format", "csv", "--out", out_dir, "--study", "grid")
    assert out.exit_code == 0, out.output
    assert "exported 4 runs" in out.stdout
    with (out_dir / "runs.csv").open() as f:
        runs = {float(r["lr"]): r for r in csv.DictReader(f)}
    assert set(runs) == {0.01, 0.1, 1.0, 3.0}
    assert runs[3.0]["status"] == "diverged" and runs[3.0]["final_train_loss"] == "nan"
    assert (runs[3.0]["final_val_loss"], runs[3.0]["momentum"], runs[3.0]["seed"]) == (
        "inf",
        "0.9",
        "0",
    )
    assert runs[0.1]["studies"] == "big;grid" and runs[1.0]["error"] == "boom"
    assert runs[1.0]["final_val_metric"] == ""  # a failed run has no final metrics
    with (out_dir / "history.csv").open() as f:
        history = list(csv.DictReader(f))
    assert len(history) == 9  # 3 rows for each of the three runs that trained
    assert {h["run_id"] for h in history} == {runs[lr]["id"] for lr in (0.01, 0.1, 3.0)}
    spike = [h for h in history if h["run_id"] == runs[3.0]["id"] and h["step"] == "20"]
    assert spike[0]["train_loss"] == "nan" and spike[0]["noise_scale"] == ""


def test_export_parquet_round_trips_numbers(db: Path, tmp_path: Path):
    pq = pytest.importorskip("pyarrow.parquet")
    out = invoke("export", "--db", db, "--format", "parquet", "--out", tmp_path, "--json")
    assert out.exit_code == 0, out.output
    report = json.loads(out.stdout)
    assert report == {
        "files": [str(tmp_path / "runs.parquet"), str(tmp_path / "history.parquet")],
        "runs": 5,
    }
    runs = pq.read_table(tmp_path / "runs.parquet").to_pylist()
    diverged = next(r for r in runs if r["status"] == "diverged")
    assert math.isnan(diverged["final_train_loss"]) and diverged["final_val_loss"] == math.inf
    assert diverged["lr"] == 3.0 and diverged["batch_size"] == 64
    history = pq.read_table(tmp_path / "history.parquet")
    assert history.num_rows == 12
    assert history.schema.field("step").type == "int64"


def test_parquet_without_pyarrow_says_how_to_get_it(db: Path, tmp_path: Path, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)  # import pyarrow now raises ImportError
    out = invoke("export", "--db", db, "--format", "parquet", "--out", tmp_path / "p")
    assert out.exit_code == 2
    assert out.stderr == (
        "error: format: parquet export needs pyarrow: pip install 'batchlab[parquet]'\n"
    )
    assert not (tmp_path / "p").exists()


def test_a_damaged_run_is_one_warning_and_the_others_are_listed_and_exported(
    db: Path, tmp_path: Path
):
    bad = result(0.1).run_id
    with sqlite3.connect(db) as raw:
        raw.execute("UPDATE runs SET final = 'oops' WHERE id = ?", (bad,))
    raw.close()
    before = hashlib.sha256(db.read_bytes()).hexdigest()
    warning = f"warning: run {bad}: final: not valid JSON (Expecting value: line 1 column 1 (char 0)); skipped\n"
    out = invoke("runs", "--db", db)
    assert out.exit_code == 0 and out.stderr == warning
    assert "4 runs" in out.stdout and bad not in out.stdout
    assert all(result(lr).run_id in out.stdout for lr in (0.01, 3.0, 1.0))
    out = invoke("export", "--db", db, "--out", tmp_path / "e", "--study", "grid")
    assert out.exit_code == 0 and out.stderr == warning
    assert out.stdout.startswith("exported 3 runs")
    assert hashlib.sha256(db.read_bytes()).hexdigest() == before
