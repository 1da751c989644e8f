"""The results summary `harness run` and `harness show` print: headline metrics per suite with
units, which way is better and the change against dense, readable in a 100-column terminal."""

from __future__ import annotations

import io

from rich.console import Console
from typer.testing import CliRunner

from harness.cli import app
from harness.report import LEGEND, show_change, show_value, summary_tables


def rows(model="deltanet-tiny"):
    cell = dict(model=model, recovery="none")
    out = []
    for method, ratio, values in (
        (
            "dense",
            0.0,
            {
                ("compression", "state_bytes"): 65536,
                ("ppl", "ppl"): 54.72,
                ("ruler", "avg"): 40.0,
                ("mqar", "acc"): 0.5,
            },
        ),
        (
            "drrqr",
            0.5,
            {
                ("compression", "state_bytes"): 32768,
                ("ppl", "ppl"): 56.58,
                ("ruler", "avg"): 30.0,
                ("mqar", "acc"): 0.25,
                ("ppl", "nll"): 4.03,
                ("mqar", "acc/kv8"): 0.1,
            },
        ),
    ):
        for (suite, metric), value in values.items():
            out.append({**cell, "method": method, "ratio": ratio, "suite": suite, "metric": metric, "value": value})
    return out


def render(tables, width=100) -> str:
    buffer = io.StringIO()
    console = Console(file=buffer, width=width, force_terminal=False, color_system=None)
    for table in tables:
        console.print(table)
    return buffer.getvalue()


def test_summary_shows_headlines_with_direction_units_and_changes():
    (table,) = summary_tables(rows())
    text = render([table])
    assert "…" not in text  # nothing cut at 100 columns
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if line.count("│") >= 3}
    assert set(lines) >= {"state bytes ↓", "perplexity ↓", "RULER ↑", "MQAR recall ↑"} and "metric" in text
    assert "65.5 kB" in lines["state bytes ↓"] and "32.8 kB (-50.0%)" in lines["state bytes ↓"]
    assert "56.58 (+3.4%)" in lines["perplexity ↓"]
    assert "30.0% (-10.0 pts)" in lines["RULER ↑"] and "25.0% (-25.0 pts)" in lines["MQAR recall ↑"]
    assert "nll" not in text and "kv8" not in text  # not headlines, not breakdowns
    assert text.index("state bytes") < text.index("perplexity") < text.index("RULER") < text.index("MQAR")
    assert "dense: the uncompressed model" in LEGEND and "higher is better" in LEGEND


def test_value_and_change_formats():
    assert show_value(1.69e9, "bytes") == "1.69 GB" and show_value(512, "bytes") == "512 B"
    assert show_value(0.25, "fraction") == "25.0%" and show_value(40, "percent") == "40.0%"
    assert show_value(float("nan"), "") == "nan" and show_value(None, "") == ""
    assert show_change(0.3, 0.5, "fraction") == "-20.0 pts" and show_change(12, 10, "") == "+20.0%"
    assert show_change(1, 0, "") == "" and show_change(None, 1, "") == ""


def test_one_table_per_model_and_names_are_text():
    tables = summary_tables(rows() + rows("<b>evil</b>"))
    assert len(tables) == 2
    assert "<b>evil</b>" in render(tables)  # shown as text, not read as markup


def test_show_prints_the_summary_and_the_full_table_with_detail(tmp_path):
    from harness.results import RunKey
    from harness.store import ResultStore
    from harness.suite import Metric

    store = tmp_path / "r.sqlite"
    for method, ratio, ppl in (("dense", 0.0, 54.72), ("drrqr", 0.5, 56.58)):
        key = RunKey(
            model="deltanet-tiny",
            model_digest="d",
            family="deltanet",
            method=method,
            method_params={},
            ratio=ratio,
            suite="ppl",
            suite_params={},
            seed=0,
        )
        ResultStore(store).begin(key)
        ResultStore(store).finish(
            key, [Metric("ppl", ppl), Metric("nll", 4.0), Metric("ppl/L0", 1.0)], prov={}, duration_s=0.0
        )
    summary = CliRunner().invoke(app, ["show", "--store", str(store)], terminal_width=100)
    assert summary.exit_code == 0, summary.output
    assert "perplexity ↓" in summary.output and "56.58 (+3.4%)" in summary.output and "ppl.nll" not in summary.output
    assert "…" not in summary.output and "dense: the uncompressed model" in summary.output
    detail = CliRunner().invoke(app, ["show", "--store", str(store), "--detail"], terminal_width=400)
    assert detail.exit_code == 0 and "ppl.nll" in detail.output and "ppl.ppl/L0" in detail.output
