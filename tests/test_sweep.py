"""Sweeps: the grid, the local and Ray executors (same rows, values too), resume after a killed
driver without recomputing, failed cells recorded while the rest finishes, dead Ray workers."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import sweeps
from harness.errors import HarnessError
from harness.store import COMPLETE, ResultStore

SMALL = {"ppl": {"limit": 512}, "state-rank": {"num_sequences": 2, "seq_len": 64, "batch_size": 2}}
GRID = dict(
    models=["deltanet-tiny"],
    methods=["random", "l1"],
    ratios=[0.25, 0.5],
    suites=["ppl", "state-rank"],
    suite_params=SMALL,
)
CELLS = 3 + 2 * 2 * 3  # dense (compression, ppl, state-rank) + methods x ratios x (compression + 2 suites)
FLAGS = [
    "--models",
    "deltanet-tiny",
    "--methods",
    "random,l1",
    "--ratios",
    "0.25,0.5",
    "--suite",
    "ppl,state-rank",
    "--suite-param",
    "ppl.limit=512",
    "--suite-param",
    "state-rank.num_sequences=2",
    "--suite-param",
    "state-rank.seq_len=64",
    "--suite-param",
    "state-rank.batch_size=2",
]


def rows(store: Path) -> list[tuple]:
    with sqlite3.connect(store) as db:
        return sorted(db.execute("SELECT run_key, metric, value, unit FROM results").fetchall())


def runs(store: Path) -> dict[str, tuple]:
    with sqlite3.connect(store) as db:
        return {k: (s, started) for k, s, started in db.execute("SELECT run_key, status, started FROM runs")}


@pytest.fixture(scope="module")
def local_store(tmp_path_factory):
    store = tmp_path_factory.mktemp("sweep") / "local.sqlite"
    report = sweeps.sweep(store=store, progress=False, **GRID)
    assert (report.total, report.computed, report.failed) == (CELLS, CELLS, [])
    return store


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


def test_a_rerun_computes_nothing_and_the_keys_are_harness_runs(local_store, tmp_path):
    again = sweeps.sweep(store=local_store, progress=False, **GRID)
    assert (again.done_before, again.computed) == (CELLS, 0)
    assert sweeps.describe(again) == {"done": CELLS, "failed": 0, "missing": 0}
    # the same cell through `harness run` is found complete, not recomputed
    from harness.pipeline import run

    report = run(
        model="deltanet-tiny",
        method="l1",
        ratios=[0.5],
        suites=["ppl"],
        suite_params={"ppl": SMALL["ppl"]},
        store=local_store,
        progress=False,
    )
    assert report.computed == 0 and report.reused > 0


def test_ray_executor_stores_exactly_what_the_local_executor_stores(local_store, ray_cluster, tmp_path):
    store = tmp_path / "ray.sqlite"
    report = sweeps.sweep(store=store, executor="ray", progress=False, **GRID)
    assert (report.computed, report.failed) == (CELLS, [])
    assert rows(store) == rows(local_store)  # same cells, metrics and values, under fixed seeds and threads
    assert {k: s for k, (s, _) in runs(store).items()} == {k: s for k, (s, _) in runs(local_store).items()}
    # artifacts came back to the driver's store
    selection = next(ResultStore(store).artifacts_root.glob("*/selection.json"))
    assert selection.stat().st_size > 0


def test_a_killed_driver_loses_nothing_and_the_rerun_computes_only_what_is_missing(local_store, tmp_path):
    store = tmp_path / "killed.sqlite"
    cmd = [sys.executable, "-m", "harness.cli", "sweep", *FLAGS, "--store", str(store), "-q"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and proc.poll() is None:
        done = [k for k, (s, _) in runs(store).items() if s == COMPLETE] if store.exists() else []
        if len(done) >= 6:  # the dense cells and at least one task's
            break
        time.sleep(0.2)
    assert proc.poll() is None, "the sweep finished before it could be killed: " + proc.stderr.read().decode()[-500:]
    os.killpg(proc.pid, signal.SIGKILL)  # a killed driver: no chance to clean up
    proc.wait(timeout=30)
    before = {k: v for k, v in runs(store).items() if v[0] == COMPLETE}
    assert 6 <= len(before) < CELLS

    report = sweeps.sweep(store=store, progress=False, **GRID)
    assert report.done_before == len(before) and report.computed == CELLS - len(before)  # nothing twice
    after = runs(store)
    assert all(after[k] == v for k, v in before.items())  # finished cells untouched (same start time)
    assert rows(store) == rows(local_store)  # nothing lost: equal to an uninterrupted sweep


def test_a_failing_cell_is_recorded_and_the_others_finish(tmp_path):
    store = tmp_path / "r.sqlite"
    grid = sweeps.Grid(
        models=["deltanet-tiny"],
        ratios=[0.5],
        suites=["ppl"],
        suite_params={"ppl": SMALL["ppl"]},
        methods=["random", {"name": "l1", "params": {"nope": 1}}],
    )
    report = sweeps.sweep(grid, store=store, progress=False)
    assert sweeps.describe(report) == {"done": 4, "failed": 2, "missing": 0}
    assert report.failed and all("unknown parameter 'nope' for method l1" in error for _, error in report.failed)
    failed = [r for r in ResultStore(store).runs() if r["status"] == "failed"]
    assert len(failed) == 2 and all("unknown parameter 'nope'" in r["error"] for r in failed)
    # dry run (harness sweep --dry-run) shows the same states and runs nothing
    status = sweeps.status(grid, store)
    assert sweeps.describe(status) == {"done": 4, "failed": 2, "missing": 0}
    # on the command line: a sweep with failed cells exits 1; a dry run that finds them refused, 2
    from typer.testing import CliRunner

    from harness.cli import app

    common = [
        "sweep",
        "--models",
        "deltanet-tiny",
        "--ratios",
        "0.5",
        "--suite",
        "ppl",
        "--suite-param",
        f"ppl.limit={SMALL['ppl']['limit']}",
        "--methods",
        "random,l1",
        "--param",
        "l1.nope=1",
        "--store",
        str(store),
    ]
    rerun = CliRunner().invoke(app, common)
    assert rerun.exit_code == 1 and "failed: deltanet-tiny · l1" in rerun.output
    dry = CliRunner().invoke(app, [*common, "--dry-run"])
    assert (
        dry.exit_code == 2 and "invalid: deltanet-tiny · l1" in dry.output and "unknown parameter 'nope'" in dry.output
    )


def dies_once(job):
    """A worker function whose first process dies hard; the retry then runs the task."""
    marker = Path(job["suite_params"]["ppl"]["text_file"]).with_suffix(".died")
    if not marker.exists():
        marker.write_text("x")
        os._exit(1)
    return sweeps.execute(job)


def always_dies(job):
    os._exit(1)


@pytest.mark.parametrize("retries", [1, 0])
def test_a_dead_ray_worker_is_retried_then_recorded(ray_cluster, tmp_path, retries):
    from harness.progress import Bars
    from harness.zoo import heldout_text

    ray_cluster.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    text = tmp_path / "text.txt"
    text.write_text(heldout_text())
    grid = sweeps.Grid(
        models=["deltanet-tiny"],
        methods=["random"],
        ratios=[0.5],
        suites=["ppl"],
        suite_params={"ppl": {"limit": 256, "text_file": str(text)}},
    )
    store = ResultStore(tmp_path / "r.sqlite")
    report = sweeps.SweepReport()
    driver = sweeps._Driver(store, report, Bars(None).task("sweep", 1))
    tasks = sweeps.expand(grid)
    sweeps._run_ray(tasks, grid, driver, None, max_retries=retries, worker=dies_once if retries else always_dies)
    if retries:
        assert text.with_suffix(".died").exists()  # the first attempt's worker process did die
        assert report.computed == len(tasks[0].keys) and report.failed == []
    else:
        assert report.computed == 0 and len(report.failed) == len(tasks[0].keys)
        assert all("Worker" in error or "worker" in error for _, error in report.failed)


def test_sweep_files_and_flags(tmp_path):
    (tmp_path / "s.yaml").write_text(
        "models: [deltanet-tiny]\nmethods: [drrqr, {name: random, params: {seed: 1}}]\nratios: [0.25, 0.5]\n"
        "suites: [ppl]\nsuite_params: {ppl: {limit: 512}}\nseeds: [0, 1]\n"
    )
    (tmp_path / "s.toml").write_text(
        'models = ["deltanet-tiny"]\nratios = [0.25, 0.5]\nsuites = ["ppl"]\nseeds = [0, 1]\n'
        'methods = ["drrqr", {name = "random", params = {seed = 1}}]\n[suite_params.ppl]\nlimit = 512\n'
    )
    a, b = sweeps.Grid.load(tmp_path / "s.yaml"), sweeps.Grid.load(tmp_path / "s.toml")
    assert a == b and a.methods[1] == sweeps.MethodSpec("random", {"seed": 1})
    tasks = sweeps.expand(a)
    assert len(tasks) == 2 * 2 * 2 and sum(t.dense for t in tasks) == 2  # dense once per (model, seed)
    assert sweeps.MethodSpec.parse("drrqr+leank") == sweeps.MethodSpec("drrqr", attn="leank")
    (tmp_path / "abc.yaml").write_text("models: [deltanet-tiny]\nmethods: [random]\nratios: [abc]\n")
    with pytest.raises(HarnessError, match="ratios must be numbers such as 0.5; got 'abc'"):
        sweeps.Grid.load(tmp_path / "abc.yaml")
    (tmp_path / "bad.yaml").write_text("modles: [x]\n")
    with pytest.raises(HarnessError, match="unknown key 'modles'"):
        sweeps.Grid.load(tmp_path / "bad.yaml")
    with pytest.raises(HarnessError, match="at least one method"):
        sweeps.Grid(models=["deltanet-tiny"])
    with pytest.raises(HarnessError, match="unknown executor"):
        sweeps.sweep(a, store=tmp_path / "r.sqlite", executor="slurm")

    from typer.testing import CliRunner

    from harness.cli import app

    result = CliRunner().invoke(
        app, ["sweep", str(tmp_path / "s.yaml"), "--ratios", "0.5", "--dry-run", "--store", str(tmp_path / "r.sqlite")]
    )
    assert result.exit_code == 0, result.output
    assert "12 cells: 0 done, 0 failed, 12 missing" in result.output  # 2 seeds x (dense 2 + 2 methods x 2 cells)
