"""The results store: one SQLite file plus one artifact folder per run cell.

SQLite because it ships with Python (no extra dependency, nothing to start), is a single file
a researcher can copy, gives atomic transactions, and pandas and Streamlit read it directly.
Analytic queries over a few thousand rows do not need a column store such as DuckDB.
Writes go through one `ResultStore` per process (the single writer); each cell's results
and its status change land in one transaction, so a crash never leaves half a cell.
"""

from __future__ import annotations

import json
import sqlite3
from contextlib import closing
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable

from harness import provenance
from harness.errors import HarnessError
from harness.results import RunKey
from harness.suite import Metric

DEFAULT_STORE = "harness-results/results.sqlite"  # relative to the working directory
SCHEMA_VERSION = 1
RUNNING, COMPLETE, FAILED = "running", "complete", "failed"
APPLICATION_ID = 0x4B434853  # "KCHS" in SQLite's header: a file this harness created

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS runs (
    run_key TEXT PRIMARY KEY,
    model TEXT NOT NULL, model_digest TEXT NOT NULL, family TEXT NOT NULL,
    method TEXT NOT NULL, method_params TEXT NOT NULL, ratio REAL NOT NULL,
    recovery TEXT NOT NULL, recovery_params TEXT NOT NULL,
    suite TEXT NOT NULL, suite_params TEXT NOT NULL, seed INTEGER NOT NULL, calibration TEXT NOT NULL,
    status TEXT NOT NULL, error TEXT,
    kept_ratio REAL, selection_digest TEXT,
    provenance TEXT, started TEXT, finished TEXT, duration_s REAL, artifacts TEXT
);
CREATE TABLE IF NOT EXISTS results (
    run_key TEXT NOT NULL REFERENCES runs(run_key) ON DELETE CASCADE,
    metric TEXT NOT NULL, value REAL, unit TEXT, details TEXT,
    PRIMARY KEY (run_key, metric)
);
"""


class ResultStore:
    """The store at `path`. `read_only` (readers: show, export, the leaderboard) opens an existing
    store through SQLite's read-only mode: nothing is created, migrated or written."""

    def __init__(self, path: str | Path, *, read_only: bool = False):
        self.path = Path(path).expanduser()
        self.read_only = read_only
        if self.path.is_dir():
            raise HarnessError(
                f"results store {self.path} is a folder; pass a file path such as {self.path / 'results.sqlite'}"
            )
        if read_only and not self.path.is_file():
            raise HarnessError(f"no results store at {self.path}; run `harness run ...` first or pass --store")
        if not read_only:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise HarnessError(
                    f"results store {self.path}: cannot create its folder ({exc.strerror or exc}); "
                    "pass a writable --store"
                ) from None
        self.artifacts_root = self.path.parent / "artifacts"
        try:
            with closing(self._connect()) as db, db:
                self._check_owner(db)
                if not read_only:
                    db.executescript(_SCHEMA)
                    db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                    db.execute("PRAGMA journal_mode=WAL")  # kept in the file: every later connection uses it
                if not read_only:  # a store that cannot take a write fails now, before any model loads
                    db.execute("UPDATE meta SET value = value WHERE key = 'schema_version'")
                row = db.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
                if row is None and not read_only:
                    db.execute("INSERT INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif row is None or int(row[0]) != SCHEMA_VERSION:
                    raise HarnessError(
                        f"results store {self.path} has schema {row[0] if row else 'none'}, this harness reads and writes "
                        f"{SCHEMA_VERSION}; use another --store"
                    )
        except sqlite3.DatabaseError as exc:
            if "readonly" in str(exc) or "read-only" in str(exc):
                raise HarnessError(f"results store {self.path} is read only ({exc}); pass a writable --store") from None
            raise HarnessError(
                f"results store {self.path} is not a usable SQLite file ({exc}); pass another --store"
            ) from None

    def _check_owner(self, db: sqlite3.Connection) -> None:
        """Refuse another program's database: a harness store carries APPLICATION_ID (or, made by
        an earlier version, its `meta` table with a schema version); an empty file is adopted."""
        if db.execute("PRAGMA application_id").fetchone()[0] == APPLICATION_ID:
            return
        tables = [r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type='table'")]
        if not tables:
            return
        if "meta" in tables and db.execute("SELECT 1 FROM meta WHERE key='schema_version'").fetchone():
            return
        listed = ", ".join(sorted(tables)[:5]) + (", ..." if len(tables) > 5 else "")
        raise HarnessError(
            f"{self.path} is another program's SQLite database (tables: {listed}), not a harness "
            "results store; pass a new --store path"
        )

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True, timeout=30)
        else:
            db = sqlite3.connect(self.path, timeout=30)
        db.row_factory = sqlite3.Row
        db.execute("PRAGMA foreign_keys=ON")
        return db

    def artifacts_dir(self, key: RunKey | str, *, create: bool = True) -> Path:
        """A cell's artifact folder (`key`: the RunKey or its digest, as in the runs table)."""
        digest = key.digest if isinstance(key, RunKey) else key
        if not _is_digest(digest):
            raise HarnessError(f"{digest!r} is not a run key")
        path = self.artifacts_root / digest
        if create and not self.read_only:
            path.mkdir(parents=True, exist_ok=True)
        return path

    # --- writes --------------------------------------------------------------------------
    def begin(self, key: RunKey, *, kept_ratio: float | None = None, selection_digest: str | None = None) -> None:
        """Mark a cell as running (replacing an earlier failed or interrupted attempt)."""
        k = asdict(key)
        with closing(self._connect()) as db, db:
            db.execute("DELETE FROM runs WHERE run_key=?", (key.digest,))
            db.execute(
                "INSERT INTO runs (run_key, model, model_digest, family, method, method_params, ratio, recovery,"
                " recovery_params, suite, suite_params, seed, calibration, status, kept_ratio, selection_digest, started,"
                " artifacts) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    key.digest,
                    k["model"],
                    k["model_digest"],
                    k["family"],
                    k["method"],
                    json.dumps(k["method_params"], sort_keys=True),
                    k["ratio"],
                    k["recovery"],
                    json.dumps(k["recovery_params"], sort_keys=True),
                    k["suite"],
                    json.dumps(k["suite_params"], sort_keys=True),
                    k["seed"],
                    json.dumps(k["calibration"], sort_keys=True),
                    RUNNING,
                    kept_ratio,
                    selection_digest,
                    provenance.now(),
                    str(self.artifacts_dir(key)),
                ),
            )

    def finish(self, key: RunKey, metrics: Iterable[Metric], *, prov: dict[str, Any], duration_s: float) -> None:
        """Store a cell's metrics and mark it complete, in one transaction."""
        with closing(self._connect()) as db, db:
            db.executemany(
                "INSERT OR REPLACE INTO results VALUES (?,?,?,?,?)",
                [
                    (key.digest, m.name, float(m.value), m.unit, json.dumps(m.details, sort_keys=True, default=str))
                    for m in metrics
                ],
            )
            db.execute(
                "UPDATE runs SET status=?, provenance=?, finished=?, duration_s=?, error=NULL WHERE run_key=?",
                (COMPLETE, json.dumps(prov, sort_keys=True), provenance.now(), duration_s, key.digest),
            )

    def put(self, records: Iterable[dict[str, Any]]) -> None:
        """Write cell records taken from another store (`records`), each in one transaction, its
        artifact files into this store's artifact folder: how a sweep's workers' cells reach the
        store of the driver, its single writer."""
        for record in records:
            run = {**record["run"]}
            folder = self.artifacts_root / run["run_key"]
            if not _is_digest(run["run_key"]):
                raise HarnessError(f"{run['run_key']!r} is not a run key")
            for name, data in record.get("artifacts", {}).items():
                target = (folder / name).resolve()
                if folder.resolve() not in target.parents:
                    raise HarnessError(f"artifact {name!r} of cell {run['run_key']} leaves its folder")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
            run["artifacts"] = str(folder)
            columns = list(run)
            with closing(self._connect()) as db, db:
                db.execute("DELETE FROM runs WHERE run_key=?", (run["run_key"],))
                db.execute(
                    f"INSERT INTO runs ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})",
                    [run[c] for c in columns],
                )
                db.executemany(
                    "INSERT INTO results VALUES (?,?,?,?,?)",
                    [(run["run_key"], r["metric"], r["value"], r["unit"], r["details"]) for r in record["results"]],
                )

    def records(self, run_keys: Iterable[str] | None = None) -> list[dict[str, Any]]:
        """Cells (all, or these) as self-contained records for `put`: the run row, its metric rows
        and its artifact files' bytes."""
        wanted = None if run_keys is None else set(run_keys)
        out = []
        with closing(self._connect()) as db:
            for run in db.execute("SELECT * FROM runs ORDER BY run_key").fetchall():
                run = dict(run)
                if wanted is not None and run["run_key"] not in wanted:
                    continue
                results = [
                    dict(r)
                    for r in db.execute(
                        "SELECT metric, value, unit, details FROM results WHERE run_key=? ORDER BY metric",
                        (run["run_key"],),
                    )
                ]
                folder = self.artifacts_root / run["run_key"]
                files = (
                    {
                        str(f.relative_to(folder)): f.read_bytes()
                        for f in sorted(folder.rglob("*"))
                        if f.is_file() and not f.is_symlink()
                    }
                    if folder.is_dir()
                    else {}
                )
                out.append({"run": run, "results": results, "artifacts": files})
        return out

    def fail(self, key: RunKey, error: str) -> None:
        with closing(self._connect()) as db, db:
            db.execute(
                "UPDATE runs SET status=?, error=?, finished=? WHERE run_key=?",
                (FAILED, error[:2000], provenance.now(), key.digest),
            )

    # --- reads ---------------------------------------------------------------------------
    def status(self, key: RunKey) -> str | None:
        with closing(self._connect()) as db:
            row = db.execute("SELECT status FROM runs WHERE run_key=?", (key.digest,)).fetchone()
        return None if row is None else row["status"]

    def metrics(self, key: RunKey) -> list[Metric]:
        with closing(self._connect()) as db:
            rows = db.execute(
                "SELECT metric, value, unit, details FROM results WHERE run_key=? ORDER BY metric", (key.digest,)
            ).fetchall()
        return [Metric(r["metric"], r["value"], r["unit"] or "", json.loads(r["details"] or "{}")) for r in rows]

    def runs(self) -> list[dict[str, Any]]:
        """Every cell, one dict per run (JSON columns still as text), whatever its status."""
        with closing(self._connect()) as db:
            return [
                dict(r)
                for r in db.execute("SELECT * FROM runs ORDER BY model, method, ratio, recovery, suite").fetchall()
            ]

    def results(self, run_keys: Iterable[str], prefix: str = "") -> list[dict[str, Any]]:
        """Metric rows of these cells (names starting with `prefix`), `details` parsed."""
        keys = list(run_keys)
        if not keys:
            return []
        sql = (
            f"SELECT run_key, metric, value, unit, details FROM results WHERE run_key IN ({','.join('?' * len(keys))})"
            " AND metric LIKE ? ESCAPE '\\' ORDER BY run_key, metric"
        )
        pattern = prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"
        with closing(self._connect()) as db:
            rows = [dict(r) for r in db.execute(sql, [*keys, pattern]).fetchall()]
        for row in rows:
            row["details"] = json.loads(row["details"] or "{}")
        return rows

    def table(self, **where: Any) -> list[dict[str, Any]]:
        """Runs joined with their metrics, one dict per metric (runs without metrics too)."""
        clauses, args = [], []
        for column, value in where.items():
            if value is not None:
                clauses.append(f"runs.{column} = ?")
                args.append(value)
        sql = (
            "SELECT runs.*, results.metric, results.value, results.unit FROM runs"
            " LEFT JOIN results ON results.run_key = runs.run_key"
            + (" WHERE " + " AND ".join(clauses) if clauses else "")
            + " ORDER BY runs.model, runs.method, runs.ratio, runs.recovery, runs.suite, results.metric"
        )
        with closing(self._connect()) as db:
            return [dict(r) for r in db.execute(sql, args).fetchall()]


def _is_digest(text: str) -> bool:
    return isinstance(text, str) and 8 <= len(text) <= 128 and all(c in "0123456789abcdef" for c in text)
