"""The results DB: insert-only, one transaction per run, concurrent writers all land, compare."""

import sqlite3
import subprocess
import sys
import threading

import pytest

from safetypatch.evals.store import MetricRow, ResultsStore, RunInfo, SampleRow, compare_runs, default_db_path
from safetypatch.errors import StoreError


def _record(store: ResultsStore, tag: str, value: float = 0.5, n_samples: int = 3) -> int:
    return store.record_run(
        RunInfo(model_spec="tiny", name=tag, suite="quick", patch_sha256="ab" * 32, config={"tag": tag}),
        [MetricRow("base", "builtin_harmful", "refusal_rate", 0.1, 40, judge="refusal_xstest"),
         MetricRow("patched", "builtin_harmful", "refusal_rate", value, 40, judge="refusal_xstest"),
         MetricRow("patched", "mmlu", "accuracy", 0.3, 100)],
        [SampleRow("patched", "builtin_harmful", f"prompt {i}", "I'm sorry", judge="refusal_xstest", refused=True,
                   item_id=str(i)) for i in range(n_samples)])


def test_default_location_under_home(tmp_path, monkeypatch):
    monkeypatch.setenv("SAFETYPATCH_HOME", str(tmp_path / "h"))
    assert default_db_path() == tmp_path / "h" / "results.db"
    with ResultsStore() as st:
        assert st.path == tmp_path / "h" / "results.db" and st.runs() == []
        mode = st.conn.execute("PRAGMA journal_mode").fetchone()[0]
    assert mode == "wal"


def test_record_and_read_back(tmp_path):
    with ResultsStore(tmp_path / "r.db") as st:
        a = _record(st, "first")
        b = _record(st, "second", value=0.9)
        assert (a, b) == (1, 2)
        runs = st.runs()
        assert [r["id"] for r in runs] == [2, 1] and runs[0]["n_metrics"] == 3 and runs[0]["n_samples"] == 3
        assert st.get_run("first")["config"] == {"tag": "first"} and st.get_run(2)["name"] == "second"
        samples = list(st.samples(1))
        assert samples[0].refused is True and samples[0].prompt == "prompt 0"
        rows = compare_runs(st, 1, "second")
        row = next(r for r in rows if r["variant"] == "patched" and r["metric"] == "refusal_rate")
        assert row["a"] == 0.5 and row["b"] == 0.9 and row["difference"] == pytest.approx(0.4)
        with pytest.raises(StoreError, match="no run with id or name 'nope'"):
            st.get_run("nope")


def test_insert_only(tmp_path):
    with ResultsStore(tmp_path / "r.db") as st:
        _record(st, "x")
        for stmt in ("UPDATE runs SET name = 'y'", "DELETE FROM runs", "UPDATE metrics SET value = 1",
                     "DELETE FROM samples"):
            with pytest.raises(sqlite3.DatabaseError, match="insert-only"):
                st.conn.execute(stmt)
        assert st.get_run(1)["name"] == "x" and st.count("samples") == 3


def test_failed_record_leaves_nothing(tmp_path):
    with ResultsStore(tmp_path / "r.db") as st:
        with pytest.raises(Exception):
            st.record_run(RunInfo(model_spec="m"), [MetricRow("base", "b", "m", 1.0)],
                          [SampleRow("base", "b", object(), "r")])  # type: ignore[arg-type]  # unbindable
        assert st.count("runs") == 0 and st.count("metrics") == 0


def test_not_a_database(tmp_path):
    bad = tmp_path / "bad.db"
    bad.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(StoreError, match="not a usable results database"):
        ResultsStore(bad)


def test_concurrent_threads_all_land(tmp_path):
    db = tmp_path / "r.db"
    errors: list[BaseException] = []

    def work(k: int) -> None:
        try:
            with ResultsStore(db) as st:
                for j in range(5):
                    _record(st, f"t{k}-{j}", n_samples=50)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    with ResultsStore(db) as st:
        assert st.count("runs") == 20 and st.count("samples") == 20 * 50
        assert {r["name"] for r in st.runs()} == {f"t{k}-{j}" for k in range(4) for j in range(5)}


WRITER = """
import sys, time
from safetypatch.evals.store import MetricRow, ResultsStore, RunInfo, SampleRow
db, tag, start = sys.argv[1], sys.argv[2], float(sys.argv[3])
while time.time() < start:
    time.sleep(0.005)
for j in range(8):
    with ResultsStore(db) as st:
        st.record_run(RunInfo(model_spec="m", name=f"{tag}-{j}"), [MetricRow("base", "b", "refusal_rate", 0.5, 1)],
                      [SampleRow("base", "b", f"p{i}", "r", judge="j", refused=True) for i in range(300)])
"""


def test_two_processes_writing_at_once_both_land(tmp_path):
    import time

    db = tmp_path / "fresh.db"  # both processes also race to create the schema
    start = str(time.time() + 1.5)
    procs = [subprocess.Popen([sys.executable, "-c", WRITER, str(db), tag, start], stderr=subprocess.PIPE)
             for tag in ("p1", "p2")]
    for p in procs:
        _, err = p.communicate(timeout=120)
        assert p.returncode == 0, err.decode()
    with ResultsStore(db) as st:
        names = {r["name"] for r in st.runs()}
        assert names == {f"{t}-{j}" for t in ("p1", "p2") for j in range(8)}
        assert st.count("samples") == 16 * 300
        assert all(st.count("samples", r["id"]) == 300 for r in st.runs())
