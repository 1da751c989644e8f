"""The leaderboard app (streamlit's AppTest) over a store filled by a real tiny `harness run`."""

from __future__ import annotations

import pytest

from harness.leaderboard import APP


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from harness.pipeline import run

    path = tmp_path_factory.mktemp("lb") / "r.sqlite"
    for method in ("drrqr", "random"):
        run(method=method, ratios=[0.5], suites=["ppl"], suite_params={"ppl": {"limit": 600}}, store=path,
            progress=False)
    return path


def app(store, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("HARNESS_STORE", str(store))
    return AppTest.from_file(str(APP), default_timeout=60).run()


def test_table_has_one_row_per_cell_and_filters_change_it(store, monkeypatch):
    at = app(store, monkeypatch)
    assert not at.exception
    table = at.dataframe[0].value
    assert list(table["method"]) == ["dense", "drrqr", "random"]
    assert table.set_index("method").loc["drrqr", "compression.kept_ratio"] == 0.5
    assert table.set_index("method").loc["dense", "ppl.ppl"] < table.set_index("method").loc["random", "ppl.ppl"]
    at.sidebar.multiselect(key="method").set_value(["drrqr"]).run()
    assert list(at.dataframe[0].value["method"]) == ["drrqr"]
    at.checkbox(key="deltas").check().run()
    deltas = at.dataframe[0].value
    assert "ppl.ppl Δ" in deltas.columns and deltas["ppl.ppl Δ"].iloc[0] > 0


def test_method_names_are_shown_as_text(tmp_path, monkeypatch):
    from harness.results import RunKey
    from harness.store import ResultStore
    from harness.suite import Metric

    path = tmp_path / "r.sqlite"
    evil = "<script>alert(1)</script>"
    key = RunKey(model="m", model_digest="d", family="deltanet", method=evil, method_params={}, ratio=0.5,
                 suite="ppl", suite_params={}, seed=0)
    ResultStore(path).begin(key)
    ResultStore(path).finish(key, [Metric("ppl", 3.0)], prov={}, duration_s=0.0)
    at = app(path, monkeypatch)
    assert not at.exception
    assert list(at.dataframe[0].value["method"]) == [evil]  # a data cell, never markup
    assert all(evil not in getattr(m, "value", "") for m in at.markdown)


def test_missing_store_is_an_error_on_the_page(tmp_path, monkeypatch):
    at = app(tmp_path / "none.sqlite", monkeypatch)
    assert not at.exception and "no results store" in at.error[0].value
