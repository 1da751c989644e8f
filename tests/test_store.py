import sqlite3

import pytest

from harness.errors import HarnessError
from harness.results import RunKey
from harness.store import COMPLETE, FAILED, RUNNING, ResultStore
from harness.suite import Metric


def key(**over):
    base = dict(
        model="m",
        model_digest="d",
        family="deltanet",
        method="random",
        method_params={"seed": 0},
        ratio=0.5,
        suite="ppl",
        suite_params={"limit": 10},
        seed=0,
    )
    return RunKey(**{**base, **over})


def test_key_identity():
    assert key().digest == key(model="same weights elsewhere").digest
    assert key().digest != key(ratio=0.25).digest
    assert key().digest != key(method_params={"seed": 1}).digest


def test_cell_lifecycle(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    k = key()
    assert store.status(k) is None
    store.begin(k, kept_ratio=0.5)
    assert store.status(k) == RUNNING
    store.finish(k, [Metric("ppl", 12.5), Metric("nll", 2.5, "nats")], prov={"device": "cpu"}, duration_s=1.0)
    assert store.status(k) == COMPLETE
    assert [(m.name, m.value) for m in store.metrics(k)] == [("nll", 2.5), ("ppl", 12.5)]
    rows = store.table(method="random")
    assert {r["metric"] for r in rows} == {"ppl", "nll"} and all(r["status"] == COMPLETE for r in rows)
    assert (store.artifacts_dir(k)).is_dir()
    # a second store object on the same file sees the same data (single file, no server)
    assert ResultStore(tmp_path / "r.sqlite").status(k) == COMPLETE


def test_failure_keeps_other_cells(tmp_path):
    store = ResultStore(tmp_path / "r.sqlite")
    done, broken = key(), key(suite="other")
    store.begin(done)
    store.finish(done, [Metric("ppl", 3.0)], prov={}, duration_s=0.1)
    store.begin(broken)
    store.fail(broken, "KeyboardInterrupt: ")
    assert store.status(done) == COMPLETE and store.status(broken) == FAILED
    # rerunning the broken cell replaces the failed attempt
    store.begin(broken)
    assert store.status(broken) == RUNNING


def test_bad_store_paths(tmp_path):
    with pytest.raises(HarnessError, match="is a folder"):
        ResultStore(tmp_path)
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(HarnessError, match="not a usable SQLite file"):
        ResultStore(junk)
    other = tmp_path / "v9.sqlite"
    ResultStore(other)
    with sqlite3.connect(other) as db:
        db.execute("UPDATE meta SET value='9' WHERE key='schema_version'")
    with pytest.raises(HarnessError, match="schema 9"):
        ResultStore(other)


def test_read_only_store_reads_everything_and_writes_nothing(tmp_path):
    path = tmp_path / "r.sqlite"
    with pytest.raises(HarnessError, match="no results store"):
        ResultStore(path, read_only=True)
    assert not path.exists() and not (tmp_path / "artifacts").exists()
    writer = ResultStore(path)
    k = key(method="per_cent%_x")
    writer.begin(k)
    writer.finish(
        k,
        [
            Metric("ppl", 3.0),
            Metric("u_final/L0H1", 0.5, "fraction", {"layer": 0, "head": 1}),
            Metric("u_final_mean", 0.4),
        ],
        prov={},
        duration_s=0.1,
    )
    reader = ResultStore(path, read_only=True)
    assert [r["method"] for r in reader.runs()] == ["per_cent%_x"]
    # the prefix is literal: "_" and "%" are not LIKE wildcards
    rows = reader.results([k.digest], "u_final/")
    assert [(r["metric"], r["details"]) for r in rows] == [("u_final/L0H1", {"layer": 0, "head": 1})]
    assert [r["metric"] for r in reader.results([k.digest])] == ["ppl", "u_final/L0H1", "u_final_mean"]
    assert reader.artifacts_dir(k.digest, create=False) == writer.artifacts_dir(k)
    with pytest.raises(HarnessError, match="not a run key"):
        reader.artifacts_dir("../../etc", create=False)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.begin(key(suite="other"))
