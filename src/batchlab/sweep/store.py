"""SQLite store of runs: the only module that speaks SQL.

One file holds every run of every study: the resolved ``RunSpec`` (JSON), status, summary, history
rows, optional final weights (safetensors bytes) and the batchlab and torch versions that produced it.
A run and all its rows go in in one transaction, so a process killed at any moment leaves either the
whole run or nothing (SQLite's atomic commit; WAL mode so readers never block the writer). Non-finite
floats survive the trip: typed history columns keep a NaN bit mask (SQLite stores NaN as NULL), and
JSON columns hold ``{"$float": "nan"}`` (strict JSON has no NaN), so ``json_extract`` still works.

A store someone sends is data: reading one decodes JSON and safetensors only (no pickle, no
imports). A row batchlab cannot decode is reported as a ``Damage`` (``on_damage``, by default a
logged warning) and skipped by ``runs``; ``get`` of that run raises ``StoreError``.

A ``Store`` is one connection: use it from one thread; open one per thread or process.
"""

from __future__ import annotations

import csv
import dataclasses
import functools
import importlib.metadata
import json
import logging
import math
import os
import sqlite3
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import batchlab
from batchlab.engine.spec import HISTORY_COLUMNS, RunResult, RunSpec, RunStatus, SpecError
from batchlab.errors import FieldError

if TYPE_CHECKING:
    from torch import Tensor

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
STATUSES = tuple(RunStatus)
EXPORT_FORMATS = ("csv", "parquet")
BUSY_TIMEOUT_S = 60.0
_FLOAT_TAG = "$float"
_IN_CHUNK = 900  # ids per IN (...) list: below SQLite's oldest variable limit (999)

# Every table's columns are declared once, as (name, SQL declaration); the CREATE TABLE statements,
# the inserts and the readers are built from these tuples.
_SQL_TYPES = {int: "INTEGER", float: "REAL"}

_RUN_COLUMNS_SQL: tuple[tuple[str, str], ...] = (
    ("id", "TEXT PRIMARY KEY"),
    ("spec", "TEXT NOT NULL"),
    ("task", "TEXT NOT NULL"),
    ("batch_size", "INTEGER NOT NULL"),
    ("lr", "REAL NOT NULL"),
    ("seed", "INTEGER NOT NULL"),
    ("optimizer", "TEXT NOT NULL"),
    ("budget_unit", "TEXT NOT NULL"),
    ("budget", "REAL NOT NULL"),
    ("status", f"TEXT NOT NULL CHECK (status IN ({', '.join(repr(s.value) for s in STATUSES)}))"),
    ("steps", "INTEGER NOT NULL"),
    ("samples", "INTEGER NOT NULL"),
    ("epochs", "REAL NOT NULL"),
    ("wall_s", "REAL NOT NULL"),
    ("diverged_at", "INTEGER"),
    ("error", "TEXT"),
    ("final", "TEXT NOT NULL"),
    ("extra", "TEXT NOT NULL"),
    ("batchlab_version", "TEXT NOT NULL"),
    ("torch_version", "TEXT NOT NULL"),
    ("created_at", "TEXT NOT NULL"),
)
_RUN_COLUMNS = tuple(name for name, _ in _RUN_COLUMNS_SQL)

# History keys stored as typed SQL columns, in bit order of ``history.nan_mask``; other keys of a
# row go to its ``extra`` JSON.
_HISTORY_COLUMNS: tuple[tuple[str, type], ...] = tuple((k.value, t) for k, t in HISTORY_COLUMNS)
_HISTORY_NAMES = tuple(name for name, _ in _HISTORY_COLUMNS)
_HISTORY_COLUMNS_SQL: tuple[tuple[str, str], ...] = (
    ("run_id", "TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE"),
    ("seq", "INTEGER NOT NULL"),
    *((name, _SQL_TYPES[kind]) for name, kind in _HISTORY_COLUMNS),
    ("nan_mask", "INTEGER NOT NULL DEFAULT 0"),
    ("extra", "TEXT"),
)


def _create_table(
    name: str, columns: Sequence[tuple[str, str]], *constraints: str, rowid: bool = True
) -> str:
    """``CREATE TABLE name (...)`` from (column, declaration) pairs and table constraints."""
    body = ",\n    ".join([*(f"{c} {decl}" for c, decl in columns), *constraints])
    return f"CREATE TABLE {name} (\n    {body}\n)" + ("" if rowid else " WITHOUT ROWID")


_SCHEMA = (
    _create_table("meta", [("key", "TEXT PRIMARY KEY"), ("value", "TEXT NOT NULL")]),
    _create_table("runs", _RUN_COLUMNS_SQL),
    "CREATE INDEX runs_grid ON runs (task, batch_size, lr, seed)",
    _create_table("history", _HISTORY_COLUMNS_SQL, "PRIMARY KEY (run_id, seq)", rowid=False),
    _create_table(
        "studies",
        [("name", "TEXT PRIMARY KEY"), ("config", "TEXT"), ("created_at", "TEXT NOT NULL")],
    ),
    _create_table(
        "study_runs",
        [
            ("study", "TEXT NOT NULL REFERENCES studies (name) ON DELETE CASCADE"),
            ("run_id", "TEXT NOT NULL REFERENCES runs (id) ON DELETE CASCADE"),
        ],
        "PRIMARY KEY (study, run_id)",
        rowid=False,
    ),
    "CREATE INDEX study_runs_run ON study_runs (run_id)",
    _create_table(
        "weights",
        [
            ("run_id", "TEXT PRIMARY KEY REFERENCES runs (id) ON DELETE CASCADE"),
            ("format", "TEXT NOT NULL"),
            ("data", "BLOB NOT NULL"),
        ],
    ),
)
"""Schema version ``SCHEMA_VERSION``: the same columns, in the same order, as every file of it."""

_UPSERT_RUN = (
    f"INSERT INTO runs ({', '.join(_RUN_COLUMNS)}) "
    f"VALUES ({', '.join(':' + c for c in _RUN_COLUMNS)}) "
    "ON CONFLICT (id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _RUN_COLUMNS if c != "id")
)
_INSERT_HISTORY = (
    f"INSERT INTO history ({', '.join(name for name, _ in _HISTORY_COLUMNS_SQL)}) "
    f"VALUES ({', '.join('?' * len(_HISTORY_COLUMNS_SQL))})"
)


class StoreError(FieldError):
    """A store problem for the user: ``field`` names what is wrong (``db``, ``status``, ...)."""


@dataclass(frozen=True)
class Damage:
    """A stored row batchlab cannot decode: ``where`` (``run <id>`` or ``study <name>``), the
    ``field`` (``spec``, ``final``, ``history``, ...) and what is wrong with it."""

    where: str
    field: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.field}: {self.message}"


class _Damaged(Exception):
    """Raised while decoding one row; the caller turns it into a ``Damage`` or a ``StoreError``."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(message)
        self.field = field_name
        self.message = message


# Read as UTF-8 with bad bytes replaced: a damaged text cell must not abort a whole query.
_text = functools.partial(str, encoding="utf-8", errors="replace")


def _from_spec(name: str) -> Any:
    """A read-only property forwarding to ``self.spec.<name>``."""
    return property(lambda self: getattr(self.spec, name), doc=f"``spec.{name}``.")


@dataclass(frozen=True)
class RunRecord:
    """One stored run: its spec, result summary, the studies it belongs to and where it came from."""

    id: str
    spec: RunSpec
    status: str
    steps: int
    samples: int
    epochs: float
    wall_s: float
    diverged_at: int | None
    error: str | None
    final: dict[str, Any]
    extra: dict[str, Any]
    studies: tuple[str, ...]
    created_at: str
    batchlab_version: str
    torch_version: str

    task = _from_spec("task")
    batch_size = _from_spec("batch_size")
    lr = _from_spec("lr")
    seed = _from_spec("seed")
    optimizer = _from_spec("optimizer")

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict of every field (the spec through ``RunSpec.to_dict``)."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out.update(spec=self.spec.to_dict(), studies=list(self.studies))
        return out


# RunRecord fields read from runs columns as they are (spec, final, extra are JSON; studies joined)
_RECORD_COLUMNS = tuple(
    f.name
    for f in dataclasses.fields(RunRecord)
    if f.name not in ("spec", "final", "extra", "studies")
)


@dataclass(frozen=True)
class StudyInfo:
    """A study: its run counts by status and the resolved sweep config saved with it (if any)."""

    name: str
    n_runs: int
    n_ok: int
    n_diverged: int
    n_failed: int
    config: dict[str, Any] | None
    created_at: str


@dataclass(frozen=True)
class _Prepared:
    """A result turned into SQL parameters before the transaction opens (keeps it short)."""

    row: dict[str, Any]
    history: list[tuple[Any, ...]]
    weights: bytes | None


def _encode(value: Any, field_name: str) -> Any:
    """JSON-ready copy of ``value`` with non-finite floats tagged and numpy/torch values unboxed."""
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return float(value) if math.isfinite(value) else {_FLOAT_TAG: repr(float(value))}
    if isinstance(value, dict):
        return {str(k): _encode(v, field_name) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_encode(v, field_name) for v in value]
    if hasattr(value, "tolist"):  # numpy scalars and arrays, torch tensors
        return _encode(value.tolist(), field_name)
    raise StoreError(field_name, f"cannot store a value of type {type(value).__name__}")


def _decode_float(obj: dict[str, Any]) -> Any:
    return float(obj[_FLOAT_TAG]) if len(obj) == 1 and _FLOAT_TAG in obj else obj


def _dumps(value: Any, field_name: str) -> str:
    """Strict JSON text of ``value`` (non-finite floats encoded, see module docstring)."""
    return json.dumps(_encode(value, field_name), allow_nan=False, separators=(",", ":"))


def _loads(text: str | None) -> Any:
    return None if text is None else json.loads(text, object_hook=_decode_float)


def _json_cell(value: Any, field_name: str) -> Any:
    """A JSON column decoded (``_loads``), or ``_Damaged`` naming the column."""
    try:
        return _loads(value)
    except (ValueError, TypeError) as exc:
        raise _Damaged(field_name, f"not valid JSON ({_short(exc)})") from exc


def _short(value: Any) -> str:
    """A value or error as at most 80 characters of text (a damaged cell may be huge)."""
    text = str(value)
    return text if len(text) <= 80 else text[:77] + "..."


# Kinds of the runs columns a RunRecord takes as they are (others are text); None allowed where
# ``_OPTIONAL``. SQLite hands back int, float, str, bytes or None.
_COLUMN_KINDS: dict[str, tuple[type, ...]] = {
    "steps": (int,),
    "samples": (int,),
    "epochs": (int, float),
    "wall_s": (int, float),
    "diverged_at": (int,),
}
_OPTIONAL = ("diverged_at", "error")


def _checked_column(name: str, value: Any) -> Any:
    """A runs column value of the right kind, or ``_Damaged``."""
    if value is None and name in _OPTIONAL:
        return value
    kinds = _COLUMN_KINDS.get(name, (str,))
    if not isinstance(value, kinds):
        raise _Damaged(name, f"must be {kinds[-1].__name__}, got {_short(repr(value))}")
    if name == "status" and value not in STATUSES:
        raise _Damaged(name, f"must be one of {', '.join(STATUSES)}, got {_short(repr(value))}")
    return value


def _decoded_spec(value: Any) -> RunSpec:
    """The spec column as a validated ``RunSpec`` (its data only: nothing is imported)."""
    data = _json_cell(value, "spec")
    if not isinstance(data, dict):
        raise _Damaged("spec", f"must be a JSON object, got {type(data).__name__}")
    try:
        spec = RunSpec.from_dict(data)
    except (SpecError, TypeError, ValueError) as exc:
        raise _Damaged("spec", f"not a valid run spec ({_short(exc)})") from exc
    if not isinstance(spec.task, str) or not spec.task:
        raise _Damaged("spec", f"task must be a name, got {_short(repr(spec.task))}")
    if not isinstance(spec.seed, int) or isinstance(spec.seed, bool):
        raise _Damaged("spec", f"seed must be an integer, got {_short(repr(spec.seed))}")
    return spec


def _decoded_final(value: Any) -> dict[str, Any]:
    """The final column: an object of numbers (None where a metric is missing)."""
    final = _json_cell(value, "final")
    if not isinstance(final, dict) or not all(
        v is None or (isinstance(v, int | float) and not isinstance(v, bool))
        for v in final.values()
    ):
        raise _Damaged("final", f"must be an object of numbers, got {_short(final)}")
    return final


def _decoded_record(row: sqlite3.Row, studies: tuple[str, ...]) -> RunRecord:
    """One runs row as a ``RunRecord``, every field checked; ``_Damaged`` names the bad one."""
    extra = _json_cell(row["extra"], "extra")
    if not isinstance(extra, dict):
        raise _Damaged("extra", f"must be a JSON object, got {_short(extra)}")
    return RunRecord(
        **{name: _checked_column(name, row[name]) for name in _RECORD_COLUMNS},
        spec=_decoded_spec(row["spec"]),
        final=_decoded_final(row["final"]),
        extra=extra,
        studies=studies,
    )


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _torch_version() -> str:
    try:
        return importlib.metadata.version("torch")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def _history_row(run_id: str, seq: int, row: dict[str, Any]) -> tuple[Any, ...]:
    """One history dict as SQL parameters: typed columns, NaN bit mask, JSON of the other keys."""
    values: list[Any] = []
    mask = 0
    for bit, (name, kind) in enumerate(_HISTORY_COLUMNS):
        value = row.get(name)
        if value is not None:
            try:
                value = kind(value)
            except (TypeError, ValueError) as exc:
                raise StoreError(
                    f"history.{name}", f"must be {kind.__name__}, got {value!r}"
                ) from exc
            if kind is float and math.isnan(value):
                mask |= 1 << bit
                value = None
        values.append(value)
    extra = {k: v for k, v in row.items() if k not in _HISTORY_NAMES}
    return (run_id, seq, *values, mask, _dumps(extra, "history") if extra else None)


# Python types a history cell may have, per typed column (floats may come back as ints).
_HISTORY_KINDS = tuple(
    (name, (int,) if kind is int else (int, float)) for name, kind in _HISTORY_COLUMNS
)


def _bad_history(row: sqlite3.Row, what: str) -> _Damaged:
    return _Damaged("history", f"row {_short(row['seq'])}: {what}")


def _history_dict(row: sqlite3.Row) -> dict[str, Any]:
    """Inverse of ``_history_row`` for one fetched row; ``_Damaged("history", ...)`` when a cell
    has the wrong kind or the extra JSON is unreadable."""
    mask = row["nan_mask"]
    if not isinstance(mask, int):
        raise _bad_history(row, f"nan_mask must be an integer, got {_short(repr(mask))}")
    out = {}
    for bit, (name, kinds) in enumerate(_HISTORY_KINDS):
        value = row[name]
        if mask >> bit & 1:
            value = math.nan
        elif value is not None and not isinstance(value, kinds):
            kind = kinds[-1].__name__
            raise _bad_history(row, f"{name} must be {kind}, got {_short(repr(value))}")
        out[name] = value
    if row["extra"] is not None:
        try:
            extra = _json_cell(row["extra"], "history")
        except _Damaged as exc:
            raise _bad_history(row, f"extra {exc.message}") from exc
        if not isinstance(extra, dict):
            raise _bad_history(row, f"extra must be a JSON object, got {_short(extra)}")
        out.update(extra)
    return out


def _weights_bytes(weights: dict[str, Tensor]) -> bytes:
    from safetensors.torch import save

    return save({k: v.detach().to("cpu").contiguous().clone() for k, v in weights.items()})


def _prepare(result: RunResult, weights: dict[str, Tensor] | None) -> _Prepared:
    """SQL parameters for one result (spec JSON, denormalized columns, history, weights)."""
    _check_status(result.status)
    spec = result.spec
    run_id = result.run_id
    last_epoch = result.history[-1].get("epoch") if result.history else None
    row = {
        "id": run_id,
        "spec": _dumps(spec.to_dict(), "spec"),
        "task": spec.task,
        "batch_size": spec.batch_size,
        "lr": spec.lr,
        "seed": spec.seed,
        "optimizer": spec.optimizer,
        "budget_unit": spec.budget_unit,
        "budget": spec.budget,
        "status": result.status,
        "steps": int(result.steps),
        "samples": int(result.samples),
        "epochs": 0.0 if last_epoch is None else float(last_epoch),
        "wall_s": float(result.wall_s),
        "diverged_at": None if result.diverged_at is None else int(result.diverged_at),
        "error": result.error,
        "final": _dumps(result.final, "final"),
        "extra": _dumps(result.extra, "extra"),
        "batchlab_version": batchlab.__version__,
        "torch_version": _torch_version(),
        "created_at": _now(),
    }
    history = [_history_row(run_id, seq, h) for seq, h in enumerate(result.history)]
    return _Prepared(row, history, None if weights is None else _weights_bytes(weights))


def _chunks(items: Sequence[str]) -> Iterator[Sequence[str]]:
    for start in range(0, len(items), _IN_CHUNK):
        yield items[start : start + _IN_CHUNK]


def _marks(items: Sequence[Any]) -> str:
    return ", ".join("?" * len(items))


def _check_status(status: str) -> None:
    if status not in STATUSES:
        raise StoreError("status", f"must be one of {', '.join(STATUSES)}, got {status!r}")


def _where(study: str | None, statuses: Sequence[str] | None) -> tuple[str, list[str]]:
    """SQL ``WHERE`` clause (or "") and parameters selecting runs of a study and statuses."""
    clauses, params = [], []
    if study is not None:
        clauses.append("id IN (SELECT run_id FROM study_runs WHERE study = ?)")
        params.append(study)
    if statuses is not None:
        clauses.append(f"status IN ({_marks(statuses)})")
        params.extend(statuses)
    return (" WHERE " + " AND ".join(clauses) if clauses else ""), params


def _cell(value: Any) -> Any:
    """An export cell: scalars as they are, lists and dicts as JSON text."""
    return _dumps(value, "export") if isinstance(value, dict | list | tuple) else value


def _columns(rows: list[dict[str, Any]], fixed: Sequence[str]) -> list[str]:
    """``fixed`` then every other key in first-seen order."""
    names = dict.fromkeys(fixed)
    for row in rows:
        names.update(dict.fromkeys(row))
    return list(names)


def _write_csv(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


def _parquet_writer() -> Callable[[Path, list[dict[str, Any]], list[str]], None]:
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError as exc:
        raise StoreError(
            "format", "parquet export needs pyarrow: pip install 'batchlab[parquet]'"
        ) from exc

    def write(path: Path, rows: list[dict[str, Any]], columns: list[str]) -> None:
        table = pa.table({c: [row.get(c) for row in rows] for c in columns})
        pq.write_table(table, path)

    return write


class Store:
    """A batchlab SQLite file of runs and studies (see the module docstring for the guarantees)."""

    def __init__(
        self,
        path: str | os.PathLike[str] = "batchlab.sqlite",
        *,
        readonly: bool = False,
        on_damage: Callable[[Damage], None] | None = None,
    ):
        """Open ``path``, creating file and schema unless ``readonly`` (then a missing file is an error).

        Raises ``StoreError("db", ...)`` for a file that is not a batchlab SQLite store or whose
        schema version this batchlab cannot read. ``on_damage`` is told once about each row that
        cannot be decoded (default: a logged warning).
        """
        self.path = Path(path)
        self.readonly = readonly
        self._on_damage = on_damage or (lambda d: log.warning("%s; skipped", d))
        self._reported: set[tuple[str, str]] = set()
        if readonly and not self.path.is_file():
            raise StoreError("db", f"no such file '{self.path}'")
        try:
            # mode=rw never creates the file; read-only is enforced by query_only below, which
            # (unlike mode=ro) lets the last connection tidy the -wal/-shm files away on close.
            uri = self.path.resolve().as_uri() + ("?mode=rw" if readonly else "?mode=rwc")
            conn = sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError("db", f"cannot open '{self.path}': {exc}") from exc
        conn.row_factory = sqlite3.Row
        conn.text_factory = _text
        self._conn = conn
        try:
            conn.execute("PRAGMA foreign_keys = ON")
            if readonly:
                conn.execute("PRAGMA query_only = ON")
            conn.execute("SELECT count(*) FROM sqlite_master")  # fails for a non-SQLite file
            if not readonly:
                self._create_schema()
            self._check_schema()  # before WAL mode: never convert another program's database
            if not readonly:
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: atomic on a kill
        except sqlite3.Error as exc:
            conn.close()
            raise StoreError("db", f"'{self.path}' is not a batchlab database: {exc}") from exc
        except StoreError:
            conn.close()
            raise

    def _create_schema(self) -> None:
        """Create the tables in a file that has none (racing creators: the first one wins)."""
        with self._transaction(write=True) as conn:
            if conn.execute("SELECT count(*) FROM sqlite_master").fetchone()[0] == 0:
                for statement in _SCHEMA:
                    conn.execute(statement)
                conn.executemany(
                    "INSERT INTO meta (key, value) VALUES (?, ?)",
                    [("application", "batchlab"), ("schema_version", str(SCHEMA_VERSION))],
                )
                log.info("created batchlab store %s (schema %d)", self.path, SCHEMA_VERSION)

    def _check_schema(self) -> None:
        tables = {r[0] for r in self._conn.execute("SELECT name FROM sqlite_master")}
        meta = (
            dict(self._conn.execute("SELECT key, value FROM meta").fetchall())
            if "meta" in tables
            else {}
        )
        if meta.get("application") != "batchlab":
            raise StoreError(
                "db",
                f"'{self.path}' is an SQLite database but not a batchlab store (no batchlab meta)",
            )
        try:
            version = int(meta.get("schema_version", "0"))
        except ValueError:
            raise StoreError(
                "db",
                f"'{self.path}' has an unreadable schema version {_short(meta['schema_version'])!r}",
            ) from None
        if version > SCHEMA_VERSION:
            raise StoreError(
                "db",
                f"'{self.path}' has schema version {version}, newer than the {SCHEMA_VERSION} "
                f"batchlab {batchlab.__version__} reads; upgrade batchlab",
            )
        if version < SCHEMA_VERSION:
            raise StoreError(
                "db",
                f"'{self.path}' has schema version {version}, older than {SCHEMA_VERSION}, "
                "and no migration exists",
            )

    def close(self) -> None:
        """Close the connection (committed data is already on disk)."""
        self._conn.close()

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextmanager
    def _transaction(self, *, write: bool) -> Iterator[sqlite3.Connection]:
        """One transaction: a consistent snapshot for reads, all-or-nothing for writes."""
        if write and self.readonly:
            raise StoreError("db", f"'{self.path}' is open read-only")
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            yield conn
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            raise StoreError("db", f"{self.path}: {exc}") from exc
        finally:
            if conn.in_transaction:  # the body raised, or COMMIT failed
                conn.rollback()

    # ---- writing -------------------------------------------------------------------------------

    def put(
        self,
        result: RunResult,
        *,
        study: str | None = None,
        weights: dict[str, Tensor] | None = None,
    ) -> None:
        """Store one run, its history, study link and weights in one transaction.

        A run already stored as ok or diverged is kept (only the study link is added); a stored
        ``failed`` run is replaced. Weights are stored only when given (``result.weights`` is not
        read: the caller decides).
        """
        self.put_many([result], study=study, weights=[weights])

    def put_many(
        self,
        results: Iterable[RunResult],
        *,
        study: str | None = None,
        weights: Sequence[dict[str, Tensor] | None] | None = None,
    ) -> None:
        """Store many runs in ONE transaction (all or none), each as ``put`` would.

        One commit for an ensemble's K results is much faster than K; a driver that wants every
        run durable as soon as it finishes calls ``put`` per result instead. ``weights``: one
        dict of tensors (or None) per result.
        """
        results = list(results)
        given = list(weights) if weights is not None else [None] * len(results)
        if len(given) != len(results):
            raise StoreError("weights", f"got {len(given)} entries for {len(results)} results")
        prepared = [_prepare(r, w) for r, w in zip(results, given, strict=True)]
        with self._transaction(write=True) as conn:
            if study is not None:
                self._ensure_study(conn, study)
            for item in prepared:
                run_id = item.row["id"]
                stored = conn.execute("SELECT status FROM runs WHERE id = ?", (run_id,)).fetchone()
                if stored is None or stored["status"] == "failed":
                    conn.execute("DELETE FROM history WHERE run_id = ?", (run_id,))
                    conn.execute("DELETE FROM weights WHERE run_id = ?", (run_id,))
                    conn.execute(_UPSERT_RUN, item.row)
                    conn.executemany(_INSERT_HISTORY, item.history)
                    if item.weights is not None:
                        conn.execute(
                            "INSERT INTO weights (run_id, format, data) VALUES (?, 'safetensors', ?)",
                            (run_id, item.weights),
                        )
                else:
                    log.debug("run %s already stored as %s: kept", run_id, stored["status"])
                if study is not None:
                    self._link(conn, study, [run_id])

    @staticmethod
    def _ensure_study(conn: sqlite3.Connection, name: str) -> None:
        conn.execute(
            "INSERT OR IGNORE INTO studies (name, config, created_at) VALUES (?, NULL, ?)",
            (name, _now()),
        )

    @staticmethod
    def _link(conn: sqlite3.Connection, study: str, run_ids: Iterable[str]) -> None:
        conn.executemany(
            "INSERT OR IGNORE INTO study_runs (study, run_id) VALUES (?, ?)",
            [(study, run_id) for run_id in run_ids],
        )

    def link(self, study: str, run_ids: Iterable[str]) -> None:
        """Add stored runs to ``study`` (created if new); an unknown run id links nothing."""
        ids = list(dict.fromkeys(run_ids))
        with self._transaction(write=True) as conn:
            known = self._existing_ids(conn, ids)
            missing = [i for i in ids if i not in known]
            if missing:
                raise StoreError("run_id", f"no run {missing[0]!r} in '{self.path}'")
            self._ensure_study(conn, study)
            self._link(conn, study, ids)

    def set_study(self, name: str, config: dict[str, Any]) -> None:
        """Save the resolved sweep config with study ``name`` (created if new, config replaced)."""
        text = _dumps(config, "config")
        with self._transaction(write=True) as conn:
            self._ensure_study(conn, name)
            conn.execute("UPDATE studies SET config = ? WHERE name = ?", (text, name))

    # ---- reading -------------------------------------------------------------------------------

    @staticmethod
    def _existing_ids(conn: sqlite3.Connection, ids: Sequence[str]) -> set[str]:
        found: set[str] = set()
        for chunk in _chunks(ids):
            found.update(
                r[0]
                for r in conn.execute(f"SELECT id FROM runs WHERE id IN ({_marks(chunk)})", chunk)
            )
        return found

    def _damage(self, where: str, exc: _Damaged) -> None:
        """Report one undecodable row, once per store."""
        if (where, exc.field) not in self._reported:
            self._reported.add((where, exc.field))
            self._on_damage(Damage(where, exc.field, exc.message))

    def _config(self, name: str, text: Any) -> dict[str, Any] | None:
        """A study's config decoded; a damaged one is reported and read as None."""
        try:
            config = _json_cell(text, "config")
            if not isinstance(config, dict | None):
                raise _Damaged("config", f"must be a JSON object, got {_short(config)}")
        except _Damaged as exc:
            self._damage(f"study {name}", exc)
            return None
        return config

    def study_config(self, name: str) -> dict[str, Any] | None:
        """The config saved with ``set_study``, or None (unknown study, none saved, or damaged)."""
        with self._transaction(write=False) as conn:
            row = conn.execute("SELECT config FROM studies WHERE name = ?", (name,)).fetchone()
        return None if row is None else self._config(name, row["config"])

    def finished_ids(self, study: str | None = None) -> set[str]:
        """Ids of runs stored as ok or diverged (in ``study`` when given): what a resume skips."""
        where, params = _where(study, ("ok", "diverged"))
        with self._transaction(write=False) as conn:
            return {r[0] for r in conn.execute(f"SELECT id FROM runs{where}", params)}

    def get(self, run_id: str) -> RunRecord | None:
        """The stored run with this id, or None; a damaged row is a ``StoreError`` naming the field."""
        with self._transaction(write=False) as conn:
            records = self._records(conn, " WHERE id = ?", [run_id], strict=True)
        return records[0] if records else None

    def runs(self, study: str | None = None, *, status: str | None = None) -> list[RunRecord]:
        """Stored runs (of ``study``, with ``status``), ordered by task, batch size, lr, seed, id.

        A row that cannot be decoded is reported (``on_damage``) and left out.
        """
        if status is not None:
            _check_status(status)
        where, params = _where(study, None if status is None else (status,))
        with self._transaction(write=False) as conn:
            return self._records(conn, where, params)

    def _records(
        self, conn: sqlite3.Connection, where: str, params: list[str], *, strict: bool = False
    ) -> list[RunRecord]:
        """Decoded runs rows; a damaged one is skipped and reported, or raised when ``strict``."""
        links: dict[str, list[str]] = {}
        for run_id, name in conn.execute(
            f"SELECT run_id, study FROM study_runs WHERE run_id IN (SELECT id FROM runs{where}) "
            "ORDER BY study",
            params,
        ):
            links.setdefault(run_id, []).append(name)
        rows = conn.execute(
            f"SELECT * FROM runs{where} ORDER BY task, batch_size, lr, seed, id", params
        ).fetchall()
        records = []
        for r in rows:
            try:
                records.append(_decoded_record(r, tuple(links.get(r["id"], ()))))
            except _Damaged as exc:
                if strict:
                    raise StoreError(exc.field, f"run {r['id']}: {exc.message}") from None
                self._damage(f"run {r['id']}", exc)
        return records

    def history(self, run_id: str) -> list[dict[str, Any]]:
        """History rows of one run ordered by step ([] for an unknown id; damaged: ``StoreError``)."""
        return self._histories([run_id], strict=True)[run_id]

    def histories(self, run_ids: Iterable[str]) -> dict[str, list[dict[str, Any]]]:
        """History rows of many runs, one query per 900 ids; every requested id gets a list but a
        run with a damaged row, which is reported (``on_damage``) and left out."""
        return self._histories(run_ids, strict=False)

    def _histories(
        self, run_ids: Iterable[str], *, strict: bool
    ) -> dict[str, list[dict[str, Any]]]:
        ids = list(dict.fromkeys(run_ids))
        out: dict[str, list[dict[str, Any]]] = {i: [] for i in ids}
        damaged: dict[str, _Damaged] = {}
        with self._transaction(write=False) as conn:
            for chunk in _chunks(ids):
                for row in conn.execute(
                    f"SELECT * FROM history WHERE run_id IN ({_marks(chunk)}) "
                    "ORDER BY run_id, step, seq",
                    chunk,
                ):
                    run_id = row["run_id"]
                    if run_id in damaged:
                        continue
                    try:
                        out[run_id].append(_history_dict(row))
                    except _Damaged as exc:
                        damaged[run_id] = exc
        for run_id, exc in damaged.items():
            if strict:
                raise StoreError(exc.field, f"run {run_id}: {exc.message}")
            self._damage(f"run {run_id}", exc)
            del out[run_id]
        return out

    def runs_with_histories(
        self, study: str | None = None
    ) -> tuple[list[RunRecord], dict[str, list[dict[str, Any]]]]:
        """``runs(study)`` and their ``histories``, without any run whose row or history is damaged."""
        records = self.runs(study)
        histories = self.histories(r.id for r in records)
        return [r for r in records if r.id in histories], histories

    def studies(self) -> list[StudyInfo]:
        """Every study with its run counts by status, oldest first."""
        with self._transaction(write=False) as conn:
            rows = conn.execute(
                """SELECT s.name, s.config, s.created_at, count(r.id) AS n_runs,
                          coalesce(sum(r.status = 'ok'), 0) AS n_ok,
                          coalesce(sum(r.status = 'diverged'), 0) AS n_diverged,
                          coalesce(sum(r.status = 'failed'), 0) AS n_failed
                   FROM studies s
                   LEFT JOIN study_runs l ON l.study = s.name
                   LEFT JOIN runs r ON r.id = l.run_id
                   GROUP BY s.name ORDER BY s.created_at, s.name"""
            ).fetchall()
        return [
            StudyInfo(**{**dict(r), "config": self._config(r["name"], r["config"])}) for r in rows
        ]

    def weights(self, run_id: str) -> dict[str, Tensor] | None:
        """Final weights stored with the run (CPU tensors), or None.

        Safetensors only (never pickle); a blob that does not decode is ``StoreError("weights")``.
        Check them against the model before use (``engine.train.check_weights``).
        """
        with self._transaction(write=False) as conn:
            row = conn.execute(
                "SELECT format, data FROM weights WHERE run_id = ?", (run_id,)
            ).fetchone()
        if row is None:
            return None
        if row["format"] != "safetensors" or not isinstance(row["data"], bytes):
            raise StoreError(
                "weights",
                f"run {run_id}: stored as {_short(row['format'])!r}, not safetensors bytes",
            )
        from safetensors import SafetensorError
        from safetensors.torch import load

        try:
            return load(row["data"])
        except SafetensorError as exc:
            raise StoreError(
                "weights", f"run {run_id}: not readable safetensors data ({_short(exc)})"
            ) from None

    def integrity_check(self) -> str:
        """``"ok"``, or SQLite's integrity and foreign-key problems one per line."""
        with self._transaction(write=False) as conn:
            problems = [r[0] for r in conn.execute("PRAGMA integrity_check")]
            problems += [
                f"{r[0]} row {r[1]}: dangling reference to {r[2]}"
                for r in conn.execute("PRAGMA foreign_key_check")
            ]
        return "\n".join(p for p in problems if p != "ok") or "ok"

    # ---- export --------------------------------------------------------------------------------

    def export(
        self, out_dir: str | os.PathLike[str], *, fmt: str = "csv", study: str | None = None
    ) -> list[Path]:
        """Write ``runs.<fmt>`` and ``history.<fmt>`` under ``out_dir``; returns both paths.

        Runs: one row each with the spec's fields as columns, ``final_<metric>`` columns and
        ``studies`` (joined by ``;``); history: ``run_id`` plus every history key. Parquet needs
        pyarrow (the ``parquet`` extra). NaN and inf stay NaN and inf (``nan``/``inf`` in CSV).
        """
        if fmt not in EXPORT_FORMATS:
            raise StoreError("format", f"must be one of {', '.join(EXPORT_FORMATS)}, got {fmt!r}")
        write = _write_csv if fmt == "csv" else _parquet_writer()
        records, histories = self.runs_with_histories(study)
        run_rows = [_export_run(r) for r in records]
        history_rows = [
            {"run_id": r.id, **{k: _cell(v) for k, v in row.items()}}
            for r in records
            for row in histories[r.id]
        ]
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        paths = [out / f"runs.{fmt}", out / f"history.{fmt}"]
        write(paths[0], run_rows, _columns(run_rows, _EXPORT_RUN_FIXED))
        write(paths[1], history_rows, _columns(history_rows, ("run_id", *_HISTORY_NAMES)))
        log.info("exported %d runs, %d history rows to %s", len(run_rows), len(history_rows), out)
        return paths


_EXPORT_RUN_FIXED = ("id", "studies", "status", "task", "batch_size", "lr", "seed", "optimizer")


def _export_run(record: RunRecord) -> dict[str, Any]:
    """One run as a flat export row: summary, spec fields, ``final_<metric>``, extra as JSON."""
    row = record.to_dict()
    spec, final = row.pop("spec"), row.pop("final")
    row["studies"] = ";".join(record.studies)
    row["extra"] = _dumps(record.extra, "extra")
    row.update((k, _cell(v)) for k, v in spec.items())
    row.update((f"final_{k}", _cell(v)) for k, v in final.items())
    return row
