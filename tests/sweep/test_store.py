"""The SQLite store: exact round-trips (NaN/inf included), put semantics, safety under kills."""

from __future__ import annotations

import importlib.metadata
import json
import math
import os
import random
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from datetime import datetime
from pathlib import Path

import pytest
import torch

import batchlab
from batchlab.engine.spec import RunResult, RunSpec
from batchlab.sweep.store import SCHEMA_VERSION, Store, StoreError

NAN, INF = math.nan, math.inf


def canon(value: object) -> str:
    """Comparable text: NaN equals NaN, int 1 differs from float 1.0, key order ignored."""
    return json.dumps(value, sort_keys=True)


def make_result(
    lr: float = 0.1, seed: int = 0, status: str = "ok", rows: int = 4, **kw
) -> RunResult:
    spec = RunSpec(task="digits-mlp", batch_size=32, lr=lr, seed=seed, budget=2.0)
    history = [
        {
            "step": 10 * k,
            "samples": 320 * k,
            "epoch": 320 * k / 1437,
            "lr": lr,
            "batch_size": 32,
            "train_loss": 2.3 / (k + 1),
            "val_loss": 2.4 / (k + 1),
            "val_metric": 0.1 * k,
            "wall_s": 0.01 * k,
            "noise_scale": None,
        }
        for k in range(rows)
    ]
    fields = {
        "steps": 10 * rows,
        "samples": 320 * rows,
        "wall_s": 0.5,
        "history": history,
        "final": {"train_loss": 0.5, "val_loss": 0.6, "val_metric": 0.8, "train_metric": 0.9},
    }
    fields.update(kw)
    return RunResult(spec=spec, status=status, **fields)


@pytest.fixture
def store(tmp_path: Path):
    with Store(tmp_path / "runs.sqlite") as s:
        yield s


def test_every_field_round_trips_including_nan_inf_history_weights_and_links(tmp_path: Path):
    spec = RunSpec(
        task="mnist1d-mlp",
        batch_size=256,
        lr=0.3,
        task_options={"n_samples": 5000, "hidden": [64, 32]},
        optimizer="adamw",
        beta2=0.98,
        weight_decay=0.01,
        schedule="multistep",
        schedule_options={"milestones": (0.5, 0.75), "gamma": 0.1},
        warmup_epochs=0.5,
        warmup="exponential",
        batch_schedule=((0, 256), (2.5, 1024)),
        budget_unit="samples",
        budget=1e5,
        eval_every=7,
        seed=3,
        micro_batch_size=64,
        noise_scale=True,
    )
    history = [
        {
            "step": 0,
            "samples": 0,
            "epoch": 0.0,
            "lr": 0.0,
            "batch_size": 256,
            "train_loss": 2.3,
            "val_loss": 2.31,
            "val_metric": 0.1,
            "wall_s": 0.0,
            "noise_scale": None,
            "grad_norm": 1.5,
        },
        {
            "step": 7,
            "samples": 1792,
            "epoch": 0.448,
            "lr": 0.3,
            "batch_size": 256,
            "train_loss": INF,
            "val_loss": NAN,
            "val_metric": 0.1,
            "wall_s": 0.25,
            "noise_scale": 812.5,
            "note": "spike",
            "grad_norm": NAN,
        },
    ]
    result = RunResult(
        spec=spec,
        status="diverged",
        steps=7,
        samples=1792,
        wall_s=0.25,
        history=history,
        final={"train_loss": NAN, "train_metric": 0.1, "val_loss": INF, "val_metric": -INF},
        diverged_at=7,
        error=None,
        extra={"device": "cpu", "member": {"lrs": [0.1, NAN], "best": -INF}},
    )
    weights = {"fc.weight": torch.randn(4, 3), "fc.bias": torch.arange(4, dtype=torch.int64)}
    path = tmp_path / "runs.sqlite"
    with Store(path) as store:
        store.put(result, study="scan", weights=weights)
    with Store(path) as store:  # reopened: nothing lives only in memory
        record = store.get(spec.run_id)
        assert record is not None
        assert record.id == spec.run_id == result.run_id
        assert record.spec == spec and record.spec.run_id == spec.run_id
        assert (record.task, record.batch_size, record.lr, record.seed, record.optimizer) == (
            "mnist1d-mlp",
            256,
            0.3,
            3,
            "adamw",
        )
        assert (record.status, record.steps, record.samples, record.wall_s) == (
            "diverged",
            7,
            1792,
            0.25,
        )
        assert (record.epochs, record.diverged_at, record.error) == (0.448, 7, None)
        assert canon(record.final) == canon(result.final)
        assert canon(record.extra) == canon(result.extra)
        assert record.studies == ("scan",)
        assert record.batchlab_version == batchlab.__version__
        assert record.torch_version == importlib.metadata.version("torch")
        assert datetime.fromisoformat(record.created_at).tzinfo is not None
        assert canon(store.history(spec.run_id)) == canon(history)
        loaded = store.weights(spec.run_id)
        assert loaded is not None and set(loaded) == set(weights)
        for name, tensor in weights.items():
            assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
        assert store.integrity_check() == "ok"
    # The JSON columns are strict JSON (SQLite's own parser accepts them), queryable in SQL.
    with sqlite3.connect(path) as raw:
        row = raw.execute(
            "SELECT json_valid(spec), json_valid(final), json_valid(extra), "
            "json_extract(final, '$.train_metric'), batch_size, lr, seed FROM runs"
        ).fetchone()
    assert row == (1, 1, 1, 0.1, 256, 0.3, 3)


def test_failed_run_and_plain_fields_round_trip(store: Store):
    result = make_result(status="failed", rows=0, final={}, error="RuntimeError: out of memory")
    store.put(result)
    record = store.get(result.run_id)
    assert record is not None
    assert (record.status, record.error, record.final, record.studies) == (
        "failed",
        "RuntimeError: out of memory",
        {},
        (),
    )
    assert store.history(result.run_id) == []
    assert store.weights(result.run_id) is None
    assert store.get("0" * 16) is None


def test_put_is_idempotent_and_keeps_a_finished_run(store: Store):
    first = make_result(rows=5)
    store.put(first, study="a")
    again = make_result(rows=2, final={"val_metric": 0.0})  # same spec, other numbers
    store.put(again, study="b", weights={"w": torch.zeros(2)})
    store.put(first, study="a")
    assert len(store.runs()) == 1
    record = store.get(first.run_id)
    assert record is not None and record.final == first.final
    assert record.studies == ("a", "b")
    assert len(store.history(first.run_id)) == 5
    assert store.weights(first.run_id) is None
    assert [(s.name, s.n_runs) for s in store.studies()] == [("a", 1), ("b", 1)]


def test_failed_run_is_replaced_but_keeps_its_study_links(store: Store):
    failed = make_result(status="failed", rows=2, error="boom")
    store.put(failed, study="a", weights={"w": torch.ones(3)})
    assert store.finished_ids() == set()
    ok = make_result(rows=6)
    store.put(ok, weights={"w": torch.full((2,), 7.0)})
    record = store.get(ok.run_id)
    assert record is not None
    assert (record.status, record.error, record.studies) == ("ok", None, ("a",))
    assert [h["step"] for h in store.history(ok.run_id)] == [0, 10, 20, 30, 40, 50]
    assert torch.equal(store.weights(ok.run_id)["w"], torch.full((2,), 7.0))
    store.put(make_result(status="failed", error="late"))  # a failure never replaces ok
    assert store.get(ok.run_id).status == "ok"
    assert store.finished_ids("a") == {ok.run_id}


def test_queries_filter_by_study_and_status(store: Store):
    results = {
        "ok": make_result(lr=0.1),
        "div": make_result(lr=3.0, status="diverged", diverged_at=5),
        "fail": make_result(lr=1.0, status="failed", error="x"),
        "other": make_result(lr=0.01, seed=1),
    }
    store.put_many([results["ok"], results["div"], results["fail"]], study="grid")
    store.put(results["other"], study="solo")
    ids = {k: r.run_id for k, r in results.items()}
    assert [r.lr for r in store.runs()] == [0.01, 0.1, 1.0, 3.0]  # ordered by lr within a batch
    assert {r.id for r in store.runs("grid")} == {ids["ok"], ids["div"], ids["fail"]}
    assert [r.id for r in store.runs("grid", status="diverged")] == [ids["div"]]
    assert [r.id for r in store.runs(status="ok")] == [ids["other"], ids["ok"]]
    assert store.runs("nope") == [] and store.finished_ids("nope") == set()
    assert store.finished_ids() == {ids["ok"], ids["div"], ids["other"]}
    assert store.finished_ids("grid") == {ids["ok"], ids["div"]}
    info = {s.name: s for s in store.studies()}
    assert (info["grid"].n_runs, info["grid"].n_ok, info["grid"].n_diverged) == (3, 1, 1)
    assert (info["grid"].n_failed, info["solo"].n_runs, info["solo"].n_ok) == (1, 1, 1)
    with pytest.raises(StoreError) as err:
        store.runs(status="done")
    assert err.value.field == "status" and "ok, diverged, failed" in str(err.value)


def test_histories_bulk_matches_single_reads_across_chunks(store: Store):
    results = [make_result(lr=0.01 * (i + 1), rows=i + 1) for i in range(5)]
    store.put_many(results)
    ids = [r.run_id for r in results]
    unknown = [f"{i:016x}" for i in range(1000)]  # forces several IN (...) chunks
    bulk = store.histories([*unknown[:500], *ids, *unknown[500:]])
    for r in results:
        assert canon(bulk[r.run_id]) == canon(r.history) == canon(store.history(r.run_id))
    assert bulk[unknown[0]] == [] and len(bulk) == 1005


def test_history_is_ordered_by_step_and_keeps_duplicate_steps(store: Store):
    rows = [{"step": s, "val_metric": v} for s, v in ((20, 0.3), (0, 0.1), (20, 0.4), (10, 0.2))]
    result = make_result(history=rows)
    store.put(result)
    got = store.history(result.run_id)
    assert [(h["step"], h["val_metric"]) for h in got] == [
        (0, 0.1),
        (10, 0.2),
        (20, 0.3),
        (20, 0.4),
    ]
    assert got[0]["train_loss"] is None  # typed keys are always present


def test_link_and_study_config(store: Store):
    a, b = make_result(lr=0.1), make_result(lr=0.2)
    store.put_many([a, b])
    config = {"batch_sizes": [32], "lr": [0.1, 0.2], "target": {"value": NAN}}
    store.set_study("sweep", config)
    created = store.studies()[0].created_at
    store.link("sweep", [a.run_id, b.run_id, a.run_id])
    with pytest.raises(StoreError) as err:
        store.link("sweep2", [a.run_id, "feedfacefeedface"])
    assert err.value.field == "run_id" and "feedfacefeedface" in err.value.message
    assert [s.name for s in store.studies()] == ["sweep"]  # nothing of the failed link stayed
    store.set_study("sweep", {"lr": [0.1]})
    info = store.studies()[0]
    assert (info.n_runs, info.config, info.created_at) == (2, {"lr": [0.1]}, created)
    store.set_study("sweep", config)
    assert canon(store.study_config("sweep")) == canon(config)
    assert store.study_config("missing") is None


def test_put_many_is_all_or_nothing(store: Store):
    good = make_result(lr=0.1)
    bad = make_result(lr=0.2, extra={"obj": object()})
    with pytest.raises(StoreError) as err:
        store.put_many([good, bad], study="s")
    assert err.value.field == "extra"
    assert store.runs() == [] and store.studies() == []
    with pytest.raises(StoreError, match="got 1 entries for 2 results"):
        store.put_many([good, make_result(lr=0.3)], weights=[None])
    store.put_many([good, make_result(lr=0.3)], weights=[None, {"w": torch.ones(2)}])
    assert store.weights(good.run_id) is None
    assert torch.equal(store.weights(make_result(lr=0.3).run_id)["w"], torch.ones(2))


def test_a_put_failing_midway_through_its_sql_leaves_nothing(tmp_path: Path):
    path = tmp_path / "runs.sqlite"
    Store(path).close()
    with sqlite3.connect(path) as raw:  # the 4th history row fails after the run row went in
        raw.execute(
            "CREATE TRIGGER boom BEFORE INSERT ON history WHEN NEW.step = 30 "
            "BEGIN SELECT RAISE(ABORT, 'disk on fire'); END"
        )
    raw.close()
    with Store(path) as store:
        store.put(make_result(rows=3), study="s")
        with pytest.raises(StoreError, match="disk on fire") as err:
            store.put(make_result(lr=0.5, rows=6), study="t", weights={"w": torch.ones(1)})
        assert err.value.field == "db"
        assert [r.lr for r in store.runs()] == [0.1] and [s.name for s in store.studies()] == ["s"]
        with sqlite3.connect(path) as raw:
            counts = [
                raw.execute(f"SELECT count(*) FROM {t}").fetchone()[0]
                for t in ("history", "weights")
            ]
        raw.close()
        assert counts == [3, 0]
        store.put(make_result(lr=0.7, rows=2))  # the connection is usable afterwards
        assert len(store.runs()) == 2


def test_readonly_mode(tmp_path: Path):
    path = tmp_path / "runs.sqlite"
    with pytest.raises(StoreError) as err:
        Store(path, readonly=True)
    assert err.value.field == "db" and "no such file" in err.value.message
    assert not path.exists()
    with Store(path) as writer:
        writer.put(make_result(), study="s")
    with Store(path, readonly=True) as reader:
        assert len(reader.runs("s")) == 1
        for write in (
            lambda: reader.put(make_result(lr=0.5)),
            lambda: reader.set_study("t", {}),
            lambda: reader.link("s", []),
        ):
            with pytest.raises(StoreError, match="read-only"):
                write()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs.sqlite"]  # nothing left behind
    empty = tmp_path / "empty.sqlite"
    empty.touch()
    with pytest.raises(StoreError, match="not a batchlab store"):
        Store(empty, readonly=True)  # read-only never creates the schema
    assert empty.stat().st_size == 0


@pytest.mark.parametrize(("version", "word"), [(SCHEMA_VERSION + 1, "newer"), (0, "older")])
def test_other_schema_versions_are_refused(tmp_path: Path, version: int, word: str):
    path = tmp_path / "runs.sqlite"
    Store(path).close()
    with sqlite3.connect(path) as raw:
        raw.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
    raw.close()
    for readonly in (False, True):
        with pytest.raises(StoreError) as err:
            Store(path, readonly=readonly)
        assert err.value.field == "db" and word in err.value.message
        assert f"schema version {version}" in err.value.message


def test_files_that_are_not_batchlab_stores_are_refused_untouched(tmp_path: Path):
    text = tmp_path / "notes.txt"
    text.write_text("this is not a database, just some text that is long enough\n" * 4)
    other = tmp_path / "other.sqlite"
    with sqlite3.connect(other) as raw:
        raw.execute("CREATE TABLE users (name TEXT)")
    raw.close()
    before = {p: p.read_bytes() for p in (text, other)}
    for path, reason in ((text, "file is not a database"), (other, "not a batchlab store")):
        for readonly in (False, True):
            with pytest.raises(StoreError) as err:
                Store(path, readonly=readonly)
            assert err.value.field == "db" and reason in err.value.message
            assert str(err.value).count("\n") == 0 and str(path.name) in str(err.value)
    assert {p: p.read_bytes() for p in before} == before
    with pytest.raises(StoreError, match="cannot open"):
        Store(tmp_path / "no" / "such" / "dir.sqlite")


def test_readers_and_writers_work_concurrently(tmp_path: Path):
    path = tmp_path / "runs.sqlite"
    Store(path).close()
    n_each = 15
    errors: list[BaseException] = []

    def write(offset: int) -> None:
        try:
            with Store(path) as writer:
                for i in range(n_each):
                    writer.put(make_result(lr=0.001 * (offset + i + 1), rows=50), study="c")
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(k * n_each,)) for k in range(2)]
    with Store(path, readonly=True) as reader:
        for t in threads:
            t.start()
        seen = 0
        while any(t.is_alive() for t in threads) or seen < 2 * n_each:
            records = reader.runs("c")
            histories = reader.histories(r.id for r in records)
            assert all(len(histories[r.id]) == 50 for r in records)  # never a partial run
            assert len(records) >= seen  # committed runs never disappear
            seen = len(records)
            if not any(t.is_alive() for t in threads):
                break
        for t in threads:
            t.join()
        assert not errors, errors
        assert len(reader.runs("c")) == 2 * n_each
        assert reader.integrity_check() == "ok"


KILL_WRITER = textwrap.dedent(
    """
    import sys
    sys.path[:0] = [sys.argv[2]]
    from store_kill_common import make, N
    from batchlab.sweep.store import Store

    with Store(sys.argv[1]) as store:
        done = store.finished_ids("kill")  # resume: skip what a killed writer stored
        print("ready", len(done), flush=True)
        for i in range(N):
            result, weights = make(i)
            if result.run_id not in done:
                print("put", i, flush=True)
                store.put(result, study="kill", weights=weights)
    print("finished", flush=True)
    """
)

KILL_COMMON = textwrap.dedent(
    """
    import math, torch
    from batchlab.engine.spec import RunResult, RunSpec

    N = 200

    def n_rows(i):
        return 100 + (i * 37) % 300

    def make(i):
        spec = RunSpec(task="digits-mlp", batch_size=16 + i, lr=0.01, seed=i)
        rows = [
            {"step": k, "samples": k * (16 + i), "epoch": k / 100, "lr": 0.01, "batch_size": 16 + i,
             "train_loss": 1.0 / (k + 1), "val_loss": math.nan if k % 7 == 0 else float(i),
             "val_metric": k / n_rows(i), "wall_s": 0.001 * k, "noise_scale": None}
            for k in range(n_rows(i))
        ]
        result = RunResult(spec=spec, status="ok", steps=n_rows(i), samples=n_rows(i) * (16 + i),
                           wall_s=1.0, history=rows, final={"val_metric": float(i)})
        return result, {"w": torch.full((64, 64), float(i))}
    """
)


def test_sigkill_mid_write_never_leaves_a_partial_run(tmp_path: Path):
    """Kill the writer while it is inside ``put`` (after its k-th "put" line), resume, repeat."""
    (tmp_path / "store_kill_common.py").write_text(KILL_COMMON)
    script = tmp_path / "writer.py"
    script.write_text(KILL_WRITER)
    sys.path.insert(0, str(tmp_path))
    try:
        import store_kill_common as common
    finally:
        sys.path.remove(str(tmp_path))
    path = tmp_path / "runs.sqlite"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(script), str(path), str(tmp_path)]
    rng = random.Random(1234)
    stored_counts = []
    for _ in range(5):
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=env)
        assert proc.stdout is not None
        assert proc.stdout.readline().split()[0] == "ready"
        for _ in range(rng.randint(3, 30)):
            assert proc.stdout.readline().split()[0] == "put"
        threading.Event().wait(rng.uniform(0.0005, 0.004))  # somewhere inside that put
        assert proc.poll() is None
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        proc.stdout.close()
        with Store(path, readonly=True) as store:  # opens the hot WAL a killed writer left
            assert store.integrity_check() == "ok"
            stored_counts.append(len(store.runs()))
    assert stored_counts == sorted(stored_counts) and 0 < stored_counts[-1] < common.N
    finished = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert finished.returncode == 0, finished.stderr
    lines = finished.stdout.splitlines()
    assert lines[0] == f"ready {stored_counts[-1]}" and lines[-1] == "finished"
    with Store(path, readonly=True) as store:
        assert store.integrity_check() == "ok"
        records = store.runs()
        assert sorted(r.seed for r in records) == list(range(common.N))  # each exactly once
        histories = store.histories(r.id for r in records)
        for record in records:  # a run cut by a kill would still be here, short of rows
            expected, weights = common.make(record.seed)
            assert record.id == expected.run_id and record.studies == ("kill",)
            assert len(histories[record.id]) == common.n_rows(record.seed) == record.steps
            assert canon(histories[record.id]) == canon(expected.history)
            assert torch.equal(store.weights(record.id)["w"], weights["w"])


# -- a store is data: damaged rows are reported per run, the rest is read --------------------------


def _damage(path: Path, *statements: str) -> None:
    with sqlite3.connect(path) as raw:
        raw.execute("PRAGMA ignore_check_constraints = ON")
        for statement in statements:
            raw.execute(statement)
    raw.close()


@pytest.mark.parametrize(
    ("field", "sql", "says"),
    [
        ("spec", "UPDATE runs SET spec = 'x' WHERE id = :id", "not valid JSON"),
        ("spec", """UPDATE runs SET spec = '{"task": 1}' WHERE id = :id""", "not a valid run spec"),
        ("spec", """UPDATE runs SET spec = json_set(spec, '$.seed', 'a') WHERE id = :id""", "seed"),
        ("spec", """UPDATE runs SET spec = json_set(spec, '$.task', 7) WHERE id = :id""", "task"),
        ("final", "UPDATE runs SET final = x'00ff' WHERE id = :id", "not valid JSON"),
        ("final", """UPDATE runs SET final = '[1]' WHERE id = :id""", "object of numbers"),
        ("extra", "UPDATE runs SET extra = '3' WHERE id = :id", "JSON object"),
        ("wall_s", "UPDATE runs SET wall_s = 'slow' WHERE id = :id", "must be float"),
        ("status", "UPDATE runs SET status = 'great' WHERE id = :id", "must be one of"),
        ("diverged_at", "UPDATE runs SET diverged_at = 1.5 WHERE id = :id", "must be int"),
    ],
)
def test_a_damaged_run_row_is_reported_once_and_skipped(tmp_path: Path, field, sql, says):
    path = tmp_path / "runs.sqlite"
    good, bad = make_result(lr=0.1), make_result(lr=0.2)
    with Store(path) as store:
        store.put_many([good, bad], study="s")
    _damage(path, sql.replace(":id", f"'{bad.run_id}'"))
    seen = []
    with Store(path, readonly=True, on_damage=seen.append) as store:
        assert [r.id for r in store.runs()] == [good.run_id]
        assert [r.id for r in store.runs("s")] == [good.run_id]
        records, histories = store.runs_with_histories("s")
        assert [r.id for r in records] == [good.run_id] and len(histories[good.run_id]) == 4
        with pytest.raises(StoreError) as err:
            store.get(bad.run_id)
        assert err.value.field == field and err.value.message.startswith(f"run {bad.run_id}: ")
        assert says in err.value.message and "\n" not in str(err.value)
        assert store.get(good.run_id) is not None
    assert [(d.where, d.field) for d in seen] == [(f"run {bad.run_id}", field)]  # once
    assert says in seen[0].message


def test_a_damaged_history_row_leaves_its_run_out_of_the_histories(tmp_path: Path):
    path = tmp_path / "runs.sqlite"
    good, bad = make_result(lr=0.1), make_result(lr=0.2)
    with Store(path) as store:
        store.put_many([good, bad], study="s")
    _damage(path, f"UPDATE history SET step = 'x' WHERE run_id = '{bad.run_id}' AND seq = 2")
    seen = []
    with Store(path, readonly=True, on_damage=seen.append) as store:
        assert len(store.runs()) == 2  # the run row itself is fine
        histories = store.histories([good.run_id, bad.run_id])
        assert list(histories) == [good.run_id]
        with pytest.raises(StoreError, match=f"run {bad.run_id}: row 2: step must be int"):
            store.history(bad.run_id)
        records, _ = store.runs_with_histories()
        assert [r.id for r in records] == [good.run_id]
    assert [str(d) for d in seen] == [
        f"run {bad.run_id}: history: row 2: step must be int, got 'x'"
    ]


def test_a_damaged_study_config_is_reported_and_read_as_none(tmp_path: Path):
    path = tmp_path / "runs.sqlite"
    with Store(path) as store:
        store.set_study("s", {"target": {"metric": "val_metric", "value": 0.5}})
        store.put(make_result(), study="s")
    _damage(path, "UPDATE studies SET config = '{' WHERE name = 's'")
    seen = []
    with Store(path, readonly=True, on_damage=seen.append) as store:
        assert store.study_config("s") is None
        assert [s.config for s in store.studies()] == [None]
        assert len(store.runs("s")) == 1
    assert [(d.where, d.field) for d in seen] == [("study s", "config")]


def test_damaged_weights_are_a_store_error_never_a_safetensors_traceback(tmp_path: Path):
    path = tmp_path / "runs.sqlite"
    a, b = make_result(lr=0.1), make_result(lr=0.2)
    with Store(path) as store:
        for r in (a, b):
            store.put(r, weights={"w": torch.ones(2)})
    _damage(
        path,
        f"UPDATE weights SET data = randomblob(100) WHERE run_id = '{a.run_id}'",
        f"UPDATE weights SET format = 'pickle' WHERE run_id = '{b.run_id}'",
    )
    with Store(path, readonly=True) as store:
        for run_id, says in ((a.run_id, "not readable safetensors data"), (b.run_id, "'pickle'")):
            with pytest.raises(StoreError) as err:
                store.weights(run_id)
            assert err.value.field == "weights" and err.value.message.startswith(f"run {run_id}:")
            assert says in err.value.message


def test_an_unreadable_schema_version_is_refused(tmp_path: Path):
    path = tmp_path / "runs.sqlite"
    Store(path).close()
    _damage(path, "UPDATE meta SET value = 'one' WHERE key = 'schema_version'")
    for readonly in (False, True):
        with pytest.raises(StoreError, match="unreadable schema version 'one'") as err:
            Store(path, readonly=readonly)
        assert err.value.field == "db"
