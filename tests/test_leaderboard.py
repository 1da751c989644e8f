"""The leaderboard app (streamlit's AppTest) and its data layer, over a store filled by real tiny
runs (the session fixture `leaderboard_store` in conftest.py)."""

from __future__ import annotations

import json

import pytest

from harness.leaderboard import APP, data
from harness.leaderboard.safe import plain


def app(store, monkeypatch):
    from streamlit.testing.v1 import AppTest

    monkeypatch.setenv("HARNESS_STORE", str(store))
    at = AppTest.from_file(str(APP), default_timeout=120).run()
    assert not at.exception
    return at


def charts(at):
    return [json.loads(c.proto.spec) for c in at.get("vega_lite_chart")]


def chart_rows(at, index):
    """The rows a chart was sent (Arrow IPC in the element's datasets)."""
    import pyarrow as pa

    (dataset,) = at.get("vega_lite_chart")[index].proto.datasets
    return pa.ipc.open_stream(dataset.data.data).read_pandas().to_dict("records")


def tab(at, label):
    return next(t for t in at.tabs if t.label == label)


def test_table_has_one_row_per_cell_and_filters_change_it(leaderboard_store, evil_name, monkeypatch):
    at = app(leaderboard_store, monkeypatch)
    table = at.dataframe[0].value
    assert list(table["method"]) == ["dense", evil_name, "drrqr", "random"]
    assert set(table["family"]) == {"deltanet"}
    by_method = table.set_index("method")
    assert by_method.loc["drrqr", "compression.kept_ratio"] == 0.5
    assert by_method.loc[evil_name, "ppl.ppl"] == 99.0
    assert by_method.loc["dense", "ppl.ppl"] < by_method.loc["random", "ppl.ppl"]
    # the values are the store's: the same as `harness export` gives
    from harness.export import results_frame

    exported = results_frame(leaderboard_store).set_index("method")
    assert by_method.loc["drrqr", "ppl.ppl"] == exported.loc["drrqr", "ppl.ppl"]

    at.sidebar.multiselect(key="method").set_value(["drrqr"]).run()
    assert list(at.dataframe[0].value["method"]) == ["drrqr"]
    at.sidebar.multiselect(key="suite").set_value(["ppl"]).run()
    columns = [c for c in at.dataframe[0].value.columns if "." in c]
    assert columns and all(c.startswith("ppl.") for c in columns)
    at.checkbox(key="deltas").check().run()
    deltas = at.dataframe[0].value
    assert "ppl.ppl Δ" in deltas.columns and deltas["ppl.ppl Δ"].iloc[0] > 0
    at.sidebar.multiselect(key="family").set_value(["deltanet"]).run()
    assert list(at.dataframe[0].value["method"]) == ["drrqr"]


def test_pareto_draws_one_line_per_method(leaderboard_store, monkeypatch):
    at = app(leaderboard_store, monkeypatch)
    at.selectbox(key="pareto_x").set_value("compression.kept_ratio")
    at.selectbox(key="pareto_y").set_value("ppl.ppl").run()
    index, spec = next(
        (i, s) for i, s in enumerate(charts(at)) if s.get("encoding", {}).get("y", {}).get("title") == "ppl.ppl"
    )
    assert spec["encoding"]["x"]["title"] == "compression.kept_ratio"
    assert spec["encoding"]["color"]["field"] == "method"
    assert "." not in spec["encoding"]["x"]["field"] + spec["encoding"]["y"]["field"]  # "." = nested in Vega-Lite
    rows = chart_rows(at, index)
    # one line per method from the dense point (kept ratio 1) to its ratio; dense on its own
    assert sorted((r["method"], r["x"]) for r in rows) == [
        ("dense", 1.0),
        ("drrqr", 0.5),
        ("drrqr", 1.0),
        ("random", 0.5),
        ("random", 1.0),
    ]


def test_state_rank_heatmaps_and_curves_hold_the_stored_values(leaderboard_store, monkeypatch):
    board = data.load(leaderboard_store)
    cells = data.cells(board, suite="state-rank")
    assert set(cells["method"]) == {"dense", "drrqr", "random"}
    keys = list(cells["run_key"])
    assert "u_final" in data.head_quantities(board, keys)
    grid = data.head_grid(board, keys, "u_final")
    assert len(grid) == 3 * 4 * 4  # cells x layers x heads of deltanet-tiny
    stored = {(r["run_key"], r["metric"]): r["value"] for r in board.store.results(keys, "u_final/")}
    for row in grid.itertuples():
        assert row.value == stored[(row.run_key, f"u_final/L{row.layer}H{row.head}")]
    curves = data.utilization_curves(board, keys)
    assert set(curves["run_key"]) == set(keys) and curves["position"].max() == 64

    at = app(leaderboard_store, monkeypatch)
    rank = tab(at, "state rank")
    assert rank.selectbox(key="rank_quantity").value == "u_final"  # utilization first
    kinds = [s.get("mark", {}).get("type") if isinstance(s.get("mark"), dict) else s.get("mark") for s in charts(at)]
    assert any(s.get("facet") for s in charts(at))  # the per-cell heatmaps
    assert "line" in kinds  # the utilization curves (and the pareto lines)
    assert len(rank.get("image")) >= 1  # the suite's PNG plots


def test_run_detail_shows_provenance_selection_and_artifacts(leaderboard_store, monkeypatch):
    at = app(leaderboard_store, monkeypatch)
    board = data.load(leaderboard_store)
    drrqr = board.runs[(board.runs["method"] == "drrqr") & (board.runs["suite"] == "ppl")].iloc[0]
    at.selectbox(key="detail_cell").set_value(drrqr["run_key"]).run()
    detail = tab(at, "run detail")
    shown = json.loads(detail.json[0].proto.body)
    assert shown["method"] == "drrqr" and shown["ratio"] == 0.5 and shown["status"] == "complete"
    assert shown["seed"] == 0 and shown["duration_s"] > 0
    assert shown["provenance"]["versions"]["torch"] and "device" in shown["provenance"]
    assert shown["method_params"] == json.loads(drrqr["method_params"])
    selection = detail.dataframe[1].value
    assert list(selection.columns[:4]) == ["layer", "head", "kept", "of"]
    assert (selection["kept"] == selection["of"] // 2).all() and len(selection) == 4 * 4  # layers x heads
    labels = [b.proto.label for b in detail.get("download_button")]
    assert any(plain("selection.json") in label for label in labels)


def test_method_cards_list_the_registry(leaderboard_store, monkeypatch):
    from harness import registry

    at = app(leaderboard_store, monkeypatch)
    cards = tab(at, "methods")
    names = [s.value for s in cards.subheader]
    assert names == [plain(n) for n in registry.names(registry.METHODS)]
    assert any("Nazari" in t.value for t in cards.text)  # drrqr's paper


def test_untrusted_strings_are_shown_as_text(leaderboard_store, evil_name, monkeypatch):
    at = app(leaderboard_store, monkeypatch)
    assert evil_name in list(at.dataframe[0].value["method"])  # a data cell, never markup
    for element in (*at.markdown, *at.caption, *at.error, *at.subheader):
        assert evil_name not in element.value
    assert plain(evil_name) == r"\<script\>alert\(1\)\<\/script\>"
    board = data.load(leaderboard_store)
    evil = board.runs[board.runs["method"] == evil_name].iloc[0]
    at.selectbox(key="detail_cell").set_value(evil["run_key"]).run()
    shown = json.loads(tab(at, "run detail").json[0].proto.body)
    assert shown["method"] == evil_name and shown["provenance"] == {"note": evil_name}  # JSON data, not HTML


def test_missing_or_foreign_store_is_an_error_on_the_page(tmp_path, monkeypatch):
    at = app(tmp_path / "none.sqlite", monkeypatch)
    assert "no results store" in at.error[0].value.replace("\\", "")
    assert not (tmp_path / "none.sqlite").exists()  # the app never creates a store
    other = tmp_path / "other.sqlite"
    other.write_bytes(b"not sqlite at all" * 100)
    at = app(other, monkeypatch)
    assert "not a usable SQLite file" in at.error[0].value.replace("\\", "")


def test_the_app_only_reads(leaderboard_store, monkeypatch):
    before = leaderboard_store.read_bytes()
    app(leaderboard_store, monkeypatch)
    assert leaderboard_store.read_bytes() == before
    with pytest.raises(Exception, match="readonly"):
        data.load(leaderboard_store).store._connect().execute("DELETE FROM runs")


def test_first_screen_leads_with_headlines_that_have_values(leaderboard_store, monkeypatch):
    """The first metric columns are the headlines (what a cell keeps, then quality), columns empty
    for every shown row are left out, and the Pareto tab opens on axes with points."""
    at = app(leaderboard_store, monkeypatch)
    table = at.dataframe[0].value
    metrics = [c for c in table.columns if "." in c]
    assert metrics[:3] == ["compression.kept_ratio", "compression.state_bytes", "ppl.ppl"]
    assert all(table[c].notna().any() for c in metrics)
    assert table[metrics[0]].notna().sum() >= 3  # dense, drrqr, random
    at.sidebar.multiselect(key="method").set_value(["drrqr"]).run()
    shown = [c for c in at.dataframe[0].value.columns if "." in c]
    assert all(at.dataframe[0].value[c].notna().all() for c in shown)  # the hand-written cell's gaps are gone
    at = app(leaderboard_store, monkeypatch)  # defaults, untouched
    assert at.selectbox(key="pareto_x").value == "compression.kept_ratio"
    assert at.selectbox(key="pareto_y").value == "ppl.ppl"
    (rows,) = [
        chart_rows(at, i)
        for i, s in enumerate(charts(at))
        if s.get("encoding", {}).get("y", {}).get("title") == "ppl.ppl"
    ]
    assert len(rows) == 5 and all(r["x"] is not None and r["y"] is not None for r in rows)


def test_ordered_metrics_and_pareto_defaults():
    import pandas as pd

    view = pd.DataFrame(
        {
            "model": ["m", "m"],
            "speed.decode_ms_per_token": [2.0, 1.0],
            "ppl.nll": [3.0, 3.5],
            "zz.other": [None, None],
            "ppl.ppl": [20.0, 30.0],
            "compression.kv_bytes": [10, 5],
            "compression.attention_kept_ratio": [None, None],
        }
    )
    metrics = [c for c in view.columns if "." in c]
    assert data.ordered_metrics(view, metrics) == [
        "compression.kv_bytes",
        "ppl.ppl",
        "speed.decode_ms_per_token",
        "ppl.nll",
    ]
    size, quality = data.pareto_axes(view, data.ordered_metrics(view, metrics))
    x, y = data.pareto_defaults(view, size, quality)
    assert x[0] == "compression.kv_bytes" and y[0] == "ppl.ppl"
