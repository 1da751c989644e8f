"""The leaderboard: a Streamlit app over the results store (read only).

`harness leaderboard` starts it; the store path comes from the environment variable
HARNESS_STORE (set by the command). Every string from the store is untrusted: it is shown
through Streamlit's dataframe and text elements, never as HTML or markdown.
"""

from __future__ import annotations

import os

import pandas as pd
import streamlit as st

from harness.leaderboard.data import with_deltas

STORE = os.environ.get("HARNESS_STORE", "harness-results/results.sqlite")

st.set_page_config(page_title="key-channel compression leaderboard", layout="wide")
st.title("Key-channel compression leaderboard")
st.caption(f"results store: {STORE}")

try:
    from harness.export import results_frame

    table = results_frame(STORE)
except Exception as exc:  # a missing or unreadable store: say so, do not crash
    st.error(f"cannot read the results store: {exc}")
    st.stop()

if table.empty:
    st.info("the store has no complete cells yet: run `harness run ...` first")
    st.stop()

metrics = [c for c in table.columns if "." in c]
with st.sidebar:
    st.header("filters")
    models = st.multiselect("model", sorted(table["model"].unique()), key="model")
    methods = st.multiselect("method", sorted(table["method"].unique()), key="method")
    ratios = st.multiselect("ratio", sorted(table["ratio"].unique()), key="ratio")
    suites = st.multiselect("suite", sorted({c.split(".", 1)[0] for c in metrics}), key="suite")

view = table
for column, chosen in (("model", models), ("method", methods), ("ratio", ratios)):
    if chosen:
        view = view[view[column].isin(chosen)]
shown = [c for c in metrics if not suites or c.split(".", 1)[0] in suites]

tab_table, tab_pareto = st.tabs(["leaderboard", "pareto"])
with tab_table:
    st.subheader("one row per (model, method, ratio, recovery); dense is the reference row")
    show_deltas = st.checkbox("deltas vs dense", value=False, key="deltas")
    # deltas against the dense rows of the whole store, so that a filter hiding dense keeps them
    frame = with_deltas(table, shown).loc[view.index] if show_deltas else view[["model", "method", "ratio", "recovery", *shown]]
    st.dataframe(frame, hide_index=True, use_container_width=True)

with tab_pareto:
    numeric = [c for c in shown if pd.api.types.is_numeric_dtype(view[c])]
    size_columns = [c for c in numeric if c.startswith("compression.") and ("bytes" in c or "kept" in c)]
    quality_columns = [c for c in numeric if not c.startswith("compression.")]
    if not size_columns or not quality_columns:
        st.info("needs a compression metric and a quality metric among the shown suites")
    else:
        import altair as alt

        x = st.selectbox("size (x)", size_columns, key="pareto_x")
        y = st.selectbox("quality (y)", quality_columns, key="pareto_y")
        points = view[["model", "method", "ratio", x, y]].dropna()
        chart = alt.Chart(points).mark_line(point=True).encode(
            x=alt.X(x, type="quantitative"), y=alt.Y(y, type="quantitative"),
            color=alt.Color("method", type="nominal"), detail="model:N",
            tooltip=["model", "method", "ratio", x, y],
        )
        st.altair_chart(chart, use_container_width=True)
