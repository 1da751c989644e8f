"""state-rank views: per (layer, head) heatmaps of a chosen quantity, and utilization curves
along the sequence, for the state-rank cells under the current filters; the suite's PNG plots."""

from __future__ import annotations

import altair as alt
import streamlit as st

from harness.leaderboard import data
from harness.leaderboard.safe import plain


def render(board: data.Board, chosen: dict) -> None:
    runs = data.cells(board, suite="state-rank")
    runs, _ = data.filtered(runs, [], **chosen) if not runs.empty else (runs, [])
    if runs.empty:
        st.info("no state-rank cells under the current filters: run `harness run ... --suite state-rank`")
        return
    labels = dict(zip(runs["run_key"], runs["label"]))
    picked = st.multiselect("cells", list(labels), default=list(labels)[:4], format_func=labels.get, key="rank_cells")
    if not picked:
        return
    quantities = data.head_quantities(board, picked)
    if quantities:
        quantity = st.selectbox("per-head quantity", quantities, key="rank_quantity")
        grid = data.head_grid(board, picked, quantity).assign(cell=lambda f: f["run_key"].map(labels))
        heatmap = (
            alt.Chart(grid)
            .mark_rect()
            .encode(
                x=alt.X("head:O"),
                y=alt.Y("layer:O"),
                color=alt.Color("value:Q", title=quantity),
                tooltip=["cell", "layer", "head", "value"],
            )
            .properties(width=220, height=160)
            .facet(facet=alt.Facet("cell:N", title=None), columns=3)
        )
        st.altair_chart(heatmap)
    curves = data.utilization_curves(board, picked).assign(cell=lambda f: f["run_key"].map(labels))
    if not curves.empty:
        st.markdown("**Mean utilization along the sequence** (over layers and heads)")
        line = (
            alt.Chart(curves)
            .mark_line(point=True)
            .encode(
                x=alt.X("position:Q", title="token position"),
                y=alt.Y("utilization:Q"),
                color=alt.Color("cell:N", title=None),
                tooltip=["cell", "position", "utilization"],
            )
        )
        st.altair_chart(line, width="stretch")
    with st.expander("plots saved by the suite"):
        for key in picked:
            for path in data.artifacts(board, key):
                if path.suffix == ".png":
                    st.image(str(path), caption=plain(f"{labels[key]}: {path.name}"))
