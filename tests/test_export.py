"""`harness export`: the results table in four formats; the CSV reads back as the table."""

from __future__ import annotations

import pandas as pd
import pytest
from typer.testing import CliRunner

from harness.cli import app
from harness.errors import HarnessError
from harness.export import export, results_frame
from harness.results import RunKey
from harness.store import ResultStore
from harness.suite import Metric


@pytest.fixture
def store(tmp_path):
    path = tmp_path / "r.sqlite"
    results = ResultStore(path)
    for method, ratio, ppl in (
        ("dense", 0.0, 50.0),
        ("drrqr", 0.5, 52.25),
        (r"<script>\input{x}_</script>", 0.5, 60.0),
    ):
        key = RunKey(
            model="m",
            model_digest="d",
            family="deltanet",
            method=method,
            method_params={},
            ratio=ratio,
            suite="ppl",
            suite_params={},
            seed=0,
        )
        results.begin(key)
        results.finish(key, [Metric("ppl", ppl), Metric("u/L0H0", 0.5)], prov={}, duration_s=1.0)
    failed = RunKey(
        model="m",
        model_digest="d",
        family="deltanet",
        method="random",
        method_params={},
        ratio=0.5,
        suite="ppl",
        suite_params={},
        seed=0,
    )
    results.begin(failed)
    results.fail(failed, "boom")
    return path


def test_csv_round_trips_to_the_table(store, tmp_path):
    export(store, "csv", tmp_path / "t.csv")
    table = results_frame(store)
    assert list(table.columns) == ["model", "method", "ratio", "recovery", "ppl.ppl"]  # no breakdowns, no failed cell
    assert list(table["method"]) == ["dense", r"<script>\input{x}_</script>", "drrqr"]
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "t.csv"), table)
    assert "ppl.u/L0H0" in results_frame(store, detail=True).columns


def test_parquet_markdown_latex(store, tmp_path):
    export(store, "parquet", tmp_path / "t.parquet")
    pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "t.parquet"), results_frame(store))
    markdown = export(store, "markdown")
    assert "| drrqr" in markdown and "52.25" in markdown
    latex = export(store, "latex")
    assert r"\begin{tabular}" in latex  # untrusted names are escaped, never LaTeX commands
    assert r"\textbackslash input\{x\}\_" in latex and r"\input{x}" not in latex
    with pytest.raises(HarnessError, match="parquet is binary"):
        export(store, "parquet")
    with pytest.raises(HarnessError, match="unknown export format 'xlsx'"):
        export(store, "xlsx")


def test_cli(store, tmp_path):
    result = CliRunner().invoke(app, ["export", "--store", str(store), "--format", "markdown", "--method", "drrqr"])
    assert result.exit_code == 0 and "52.25" in result.output and "dense" not in result.output
    missing = CliRunner().invoke(app, ["export", "--store", str(tmp_path / "none.sqlite")])
    assert missing.exit_code == 2 and "no results store" in missing.output
