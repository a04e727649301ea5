"""The store's tables are generated from one column list each and keep the version-1 format."""

from __future__ import annotations

import sqlite3
from pathlib import Path

from batchlab.engine.spec import HISTORY_COLUMNS
from batchlab.sweep.store import SCHEMA_VERSION, Store

# The version-1 file format (columns in order, declared type, NOT NULL, primary-key position):
# a change here is a schema change and needs a new SCHEMA_VERSION and a migration.
V1_RUNS = [
    ("id", "TEXT", 0, 1),
    ("spec", "TEXT", 1, 0),
    ("task", "TEXT", 1, 0),
    ("batch_size", "INTEGER", 1, 0),
    ("lr", "REAL", 1, 0),
    ("seed", "INTEGER", 1, 0),
    ("optimizer", "TEXT", 1, 0),
    ("budget_unit", "TEXT", 1, 0),
    ("budget", "REAL", 1, 0),
    ("status", "TEXT", 1, 0),
    ("steps", "INTEGER", 1, 0),
    ("samples", "INTEGER", 1, 0),
    ("epochs", "REAL", 1, 0),
    ("wall_s", "REAL", 1, 0),
    ("diverged_at", "INTEGER", 0, 0),
    ("error", "TEXT", 0, 0),
    ("final", "TEXT", 1, 0),
    ("extra", "TEXT", 1, 0),
    ("batchlab_version", "TEXT", 1, 0),
    ("torch_version", "TEXT", 1, 0),
    ("created_at", "TEXT", 1, 0),
]
V1_HISTORY_KEYS = [
    "step", "samples", "epoch", "lr", "batch_size", "train_loss", "val_loss", "val_metric",
    "wall_s", "noise_scale",
]  # fmt: skip


def _columns(conn: sqlite3.Connection, table: str) -> list[tuple]:
    return [(r[1], r[2], r[3], r[5]) for r in conn.execute(f"PRAGMA table_info({table})")]


def test_generated_schema_is_the_version_1_format(tmp_path: Path) -> None:
    path = tmp_path / "s.sqlite"
    Store(path).close()
    conn = sqlite3.connect(path)
    assert SCHEMA_VERSION == 1
    assert _columns(conn, "runs") == V1_RUNS
    history = _columns(conn, "history")
    assert [c[0] for c in history] == ["run_id", "seq", *V1_HISTORY_KEYS, "nan_mask", "extra"]
    assert [k for k, _ in HISTORY_COLUMNS] == V1_HISTORY_KEYS
    assert [c[3] for c in history[:2]] == [1, 2]  # PRIMARY KEY (run_id, seq)
    sql = dict(conn.execute("SELECT name, sql FROM sqlite_master WHERE type = 'table'").fetchall())
    assert "CHECK (status IN ('ok', 'diverged', 'failed'))" in sql["runs"]
    assert sql["history"].endswith("WITHOUT ROWID") and sql["study_runs"].endswith("WITHOUT ROWID")
    indexes = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"runs_grid", "study_runs_run"} <= indexes
    for table in ("history", "study_runs", "weights"):
        assert conn.execute(f"PRAGMA foreign_key_list({table})").fetchall()
