"""The results database: every evaluation run, its metrics and its judged samples, in one SQLite file.

Default location `$SAFETYPATCH_HOME/results.db` (override with `--db`). The database is insert-only: a run is
recorded in one transaction (run row, metrics and samples land together or not at all), triggers refuse any
UPDATE or DELETE, and a rerun is a new run id. WAL mode and a busy timeout let several processes record at once.

Tables
- runs(id, created, name, suite, model_spec, model_fingerprint, patch_path, patch_sha256, config, status)
- metrics(run, variant, benchmark, attack, judge, metric, value, n)
- samples(run, variant, benchmark, attack, item_id, prompt, response, judge, label, refused, score)

The standard library's sqlite3 is used directly: nothing in torch / transformers / peft covers a results store.
"""

from __future__ import annotations

import json
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator

from ..config import safetypatch_home
from ..io_utils import utc_now
from ..errors import StoreError

SCHEMA_VERSION = 1
BUSY_TIMEOUT_MS = 60_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS schema_info (version INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    created TEXT NOT NULL,
    name TEXT,
    suite TEXT,
    model_spec TEXT NOT NULL,
    model_fingerprint TEXT,
    patch_path TEXT,
    patch_sha256 TEXT,
    config TEXT NOT NULL,
    status TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS metrics (
    run INTEGER NOT NULL REFERENCES runs(id),
    variant TEXT NOT NULL,
    benchmark TEXT NOT NULL,
    attack TEXT NOT NULL DEFAULT '',
    judge TEXT NOT NULL DEFAULT '',
    metric TEXT NOT NULL,
    value REAL,
    n INTEGER
);
CREATE TABLE IF NOT EXISTS samples (
    run INTEGER NOT NULL REFERENCES runs(id),
    variant TEXT NOT NULL,
    benchmark TEXT NOT NULL,
    attack TEXT NOT NULL DEFAULT '',
    item_id TEXT,
    prompt TEXT,
    response TEXT,
    judge TEXT NOT NULL DEFAULT '',
    label TEXT,
    refused INTEGER,
    score REAL
);
CREATE INDEX IF NOT EXISTS metrics_run ON metrics(run);
CREATE INDEX IF NOT EXISTS samples_run ON samples(run);
"""
_TRIGGERS = "".join(
    f"CREATE TRIGGER IF NOT EXISTS {t}_no_{op.lower()} BEFORE {op} ON {t} "
    f"BEGIN SELECT RAISE(ABORT, 'results are insert-only: {t} rows are never changed or removed'); END;\n"
    for t in ("runs", "metrics", "samples") for op in ("UPDATE", "DELETE")
)




@dataclass
class RunInfo:
    """What identifies a run: the model, the patch, the suite and its full configuration."""

    model_spec: str
    name: str | None = None
    suite: str | None = None
    model_fingerprint: str | None = None
    patch_path: str | None = None
    patch_sha256: str | None = None
    config: dict[str, Any] = field(default_factory=dict)
    status: str = "complete"


@dataclass(frozen=True)
class MetricRow:
    variant: str  # "base" | "patched" | "difference"
    benchmark: str
    metric: str
    value: float | None
    n: int | None = None
    attack: str = ""
    judge: str = ""


@dataclass(frozen=True)
class SampleRow:
    variant: str
    benchmark: str
    prompt: str
    response: str
    judge: str = ""
    label: str | None = None
    refused: bool | None = None
    score: float | None = None
    attack: str = ""
    item_id: str | None = None


def default_db_path() -> Path:
    return safetypatch_home() / "results.db"


def _while_locked(action: Any) -> Any:
    """Run `action`, retrying for up to the busy timeout while SQLite answers 'database is locked'. Two processes
    creating the same fresh database race on switching it to WAL, which can fail at once, without the busy
    handler (the handler is skipped when waiting could deadlock)."""
    deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
    while True:
        try:
            return action()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class ResultsStore:
    """An insert-only SQLite results database (one connection per instance; open one per process)."""

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path else default_db_path()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self.conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None)
            self.conn.row_factory = sqlite3.Row
            self.conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            _while_locked(lambda: self.conn.execute("PRAGMA journal_mode = WAL"))
            self.conn.execute("PRAGMA foreign_keys = ON")
            _while_locked(self._create_schema)
            version = self.conn.execute("SELECT MAX(version) FROM schema_info").fetchone()[0]
        except sqlite3.DatabaseError as e:
            raise StoreError(f"{self.path}: not a usable results database ({e})") from None
        if version > SCHEMA_VERSION:
            self.conn.close()
            raise StoreError(f"{self.path}: written by a newer safetypatch (schema {version} > {SCHEMA_VERSION})")

    def _create_schema(self) -> None:
        with self._transaction():
            for stmt in (_SCHEMA + _TRIGGERS).split(";\n"):  # executescript would COMMIT on its own
                if stmt.strip():
                    self.conn.execute(stmt)
            if self.conn.execute("SELECT COUNT(*) FROM schema_info").fetchone()[0] == 0:
                self.conn.execute("INSERT INTO schema_info(version) VALUES (?)", (SCHEMA_VERSION,))

    # ------------------------------------------------------------------------------------------ writing
    def _transaction(self) -> "_Tx":
        return _Tx(self.conn)

    def record_run(self, info: RunInfo, metrics: Iterable[MetricRow] = (),
                   samples: Iterable[SampleRow] = ()) -> int:
        """Insert a run with its metrics and samples in one transaction; returns the new run id."""
        with self._transaction():
            cur = self.conn.execute(
                "INSERT INTO runs(created, name, suite, model_spec, model_fingerprint, patch_path, patch_sha256, "
                "config, status) VALUES (?,?,?,?,?,?,?,?,?)",
                (utc_now(), info.name, info.suite, info.model_spec, info.model_fingerprint, info.patch_path,
                 info.patch_sha256, json.dumps(info.config, sort_keys=True, default=str), info.status))
            run_id = int(cur.lastrowid)
            self.conn.executemany(
                "INSERT INTO metrics(run, variant, benchmark, attack, judge, metric, value, n) VALUES (?,?,?,?,?,?,?,?)",
                [(run_id, m.variant, m.benchmark, m.attack, m.judge, m.metric,
                  None if m.value is None else float(m.value), m.n) for m in metrics])
            self.conn.executemany(
                "INSERT INTO samples(run, variant, benchmark, attack, item_id, prompt, response, judge, label, "
                "refused, score) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                [(run_id, s.variant, s.benchmark, s.attack, s.item_id, s.prompt, s.response, s.judge, s.label,
                  None if s.refused is None else int(bool(s.refused)), s.score) for s in samples])
        return run_id

    # ------------------------------------------------------------------------------------------ reading
    def runs(self, limit: int | None = None) -> list[dict[str, Any]]:
        """All runs, newest first, each with `n_metrics` and `n_samples`."""
        q = ("SELECT runs.*, (SELECT COUNT(*) FROM metrics WHERE metrics.run = runs.id) AS n_metrics, "
             "(SELECT COUNT(*) FROM samples WHERE samples.run = runs.id) AS n_samples FROM runs ORDER BY id DESC"
             + (f" LIMIT {int(limit)}" if limit else ""))
        return [self._run_dict(r) for r in self.conn.execute(q)]

    def get_run(self, ref: str | int) -> dict[str, Any]:
        """A run by id, or the newest run with that name."""
        row = None
        if isinstance(ref, int) or str(ref).isdigit():
            row = self.conn.execute("SELECT * FROM runs WHERE id = ?", (int(ref),)).fetchone()
        if row is None:
            row = self.conn.execute("SELECT * FROM runs WHERE name = ? ORDER BY id DESC LIMIT 1", (str(ref),)).fetchone()
        if row is None:
            raise StoreError(f"{self.path}: no run with id or name '{ref}' (list them with `safetypatch runs`)")
        return self._run_dict(row)

    def metrics(self, run_id: int) -> list[MetricRow]:
        rows = self.conn.execute("SELECT * FROM metrics WHERE run = ? ORDER BY rowid", (run_id,))
        return [MetricRow(variant=r["variant"], benchmark=r["benchmark"], metric=r["metric"], value=r["value"],
                          n=r["n"], attack=r["attack"], judge=r["judge"]) for r in rows]

    def samples(self, run_id: int) -> Iterator[SampleRow]:
        for r in self.conn.execute("SELECT * FROM samples WHERE run = ? ORDER BY rowid", (run_id,)):
            yield SampleRow(variant=r["variant"], benchmark=r["benchmark"], prompt=r["prompt"],
                            response=r["response"], judge=r["judge"], label=r["label"],
                            refused=None if r["refused"] is None else bool(r["refused"]), score=r["score"],
                            attack=r["attack"], item_id=r["item_id"])

    def count(self, table: str, run_id: int | None = None) -> int:
        if table not in ("runs", "metrics", "samples"):
            raise ValueError(table)
        if run_id is None:
            return int(self.conn.execute(f"SELECT COUNT(*) FROM {table}").fetchone()[0])
        col = "id" if table == "runs" else "run"
        return int(self.conn.execute(f"SELECT COUNT(*) FROM {table} WHERE {col} = ?", (run_id,)).fetchone()[0])

    @staticmethod
    def _run_dict(row: sqlite3.Row) -> dict[str, Any]:
        d = dict(row)
        d["config"] = json.loads(d["config"]) if d.get("config") else {}
        return d

    def close(self) -> None:
        self.conn.close()

    def __enter__(self) -> "ResultsStore":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _Tx:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): the write lock is taken up front, so two writers queue on
    the busy timeout instead of failing with 'database is locked' when a read lock would need upgrading."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> None:
        self.conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.conn.execute("ROLLBACK" if exc_type else "COMMIT")


# ------------------------------------------------------------------------------------------ comparisons
MetricKey = tuple[str, str, str, str, str]  # variant, benchmark, attack, judge, metric


def metric_key(m: MetricRow) -> MetricKey:
    return (m.variant, m.benchmark, m.attack, m.judge, m.metric)


def compare_runs(store: ResultsStore, a: str | int, b: str | int) -> list[dict[str, Any]]:
    """Metrics of two runs side by side (matched on variant, benchmark, attack, judge, metric), with B - A."""
    run_a, run_b = store.get_run(a), store.get_run(b)
    ma = {metric_key(m): m for m in store.metrics(run_a["id"])}
    mb = {metric_key(m): m for m in store.metrics(run_b["id"])}
    out = []
    for key in list(ma) + [k for k in mb if k not in ma]:
        va = ma[key].value if key in ma else None
        vb = mb[key].value if key in mb else None
        out.append({"variant": key[0], "benchmark": key[1], "attack": key[2], "judge": key[3], "metric": key[4],
                    "a": va, "b": vb, "difference": (vb - va) if va is not None and vb is not None else None})
    return out
