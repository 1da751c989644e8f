"""Quality against bytes kept (or speedup): one line per method across ratios, dense as a point."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from harness.leaderboard import data


def render(view, shown: list[str]) -> None:
    if view.empty:
        st.info("no rows under the current filters")
        return
    size, quality = data.pareto_axes(view, shown)
    if not size or not quality:
        st.info(
            "needs a size metric (bytes, kept ratio, reduction, speedup) and a quality metric among the shown suites"
        )
        return
    left, middle, right = st.columns(3)
    model = left.selectbox("model", sorted(view["model"].unique()), key="pareto_model")
    size, quality = data.pareto_defaults(view[view["model"] == model], size, quality)
    if not size or not quality:
        st.info("this model has no size and quality metrics to plot: choose another model")
        return
    x = middle.selectbox("x: size or speed", size, key="pareto_x")
    y = right.selectbox("y: quality", quality, key="pareto_y")
    rows = view[view["model"] == model][["method", "ratio", "recovery", x, y]].dropna()
    # every method's line starts at the dense model (ratio 0), which also stands as its own point
    dense = rows[rows["method"] == "dense"]
    rows = pd.concat([rows, *(dense.assign(method=m) for m in rows["method"].unique() if m != "dense")])
    # plain column names: Vega-Lite reads a "." in a field name as a nested field
    points = rows.rename(columns={x: "x", y: "y"})
    chart = (
        alt.Chart(points)
        .mark_line(point=True)
        .encode(
            x=alt.X("x", type="quantitative", title=x, scale=alt.Scale(zero=False)),
            y=alt.Y("y", type="quantitative", title=y, scale=alt.Scale(zero=False)),
            color=alt.Color("method", type="nominal"),
            detail="recovery:N",
            order="ratio:Q",
            tooltip=["method", "ratio", "recovery", alt.Tooltip("x", title=x), alt.Tooltip("y", title=y)],
        )
    )
    st.altair_chart(chart, width="stretch")
