"""One cell in full: status, metrics, parameters and provenance, the kept channels per head, and
its artifact files (to download)."""

from __future__ import annotations

import altair as alt
import pandas as pd
import streamlit as st

from harness.leaderboard import data
from harness.leaderboard.safe import plain

DOWNLOAD_LIMIT = 64 * 2**20  # larger artifacts are listed by path only


def render(board: data.Board) -> None:
    runs = data.cells(board, status=None)
    if runs.empty:
        st.info("the store holds no cells yet")
        return
    labels = {k: f"{lab} ({status})" for k, lab, status in zip(runs["run_key"], runs["label"], runs["status"])}
    key = st.selectbox("cell", list(labels), format_func=labels.get, key="detail_cell")
    run = runs[runs["run_key"] == key].iloc[0]
    if run["status"] == "failed":
        st.error("this cell failed:")
        st.code(str(run["error"]), language=None)
    elif run["status"] != "complete":
        st.warning("this cell did not finish (still running, or its run was killed)")
    metrics = pd.DataFrame(board.store.results([key]), columns=["metric", "value", "unit", "details"])
    st.dataframe(metrics[["metric", "value", "unit"]], hide_index=True, width="stretch")
    st.markdown("**Parameters and provenance**")
    st.json(data.provenance(run), expanded=1)
    selection = data.selection_grid(board, key)
    if selection is not None:
        st.markdown("**Kept key channels per head**")
        st.altair_chart(
            alt.Chart(selection)
            .mark_rect()
            .encode(
                x="head:O",
                y="layer:O",
                color=alt.Color("kept:Q", title="kept channels"),
                tooltip=["layer", "head", "kept", "of"],
            )
            .properties(height=160)
        )
        st.dataframe(selection, hide_index=True, width="stretch")
    st.markdown("**Artifacts**")
    files = data.artifacts(board, key)
    if not files:
        st.text("none")
    root = board.store.artifacts_dir(key, create=False)
    for i, path in enumerate(files):
        name = str(path.relative_to(root))
        size = path.stat().st_size
        if size > DOWNLOAD_LIMIT:
            st.text(f"{path} ({size / 2**20:.0f} MiB)")
            continue
        st.download_button(
            plain(f"{name} ({size:,} bytes)"), path.read_bytes(), file_name=path.name, key=f"artifact-{i}"
        )
