"""The leaderboard table: one row per (model, method, ratio, recovery), one column per metric."""

from __future__ import annotations

import streamlit as st

from harness.leaderboard import data


def render(board: data.Board, view, shown: list[str]) -> None:
    st.subheader("One row per (model, method, ratio, recovery); dense is the reference row")
    if board.table.empty:
        st.info("the store has no complete cells yet: run `harness run ...` first")
        return
    show_deltas = st.checkbox(
        "deltas vs dense",
        value=False,
        key="deltas",
        help="each metric minus the dense model's value (dense rows of the whole store)",
    )
    keys = ["model", "family", "method", "ratio", "recovery"]
    # deltas against the dense rows of the whole store, so that a filter hiding dense keeps them
    frame = data.with_deltas(board.table, shown).loc[view.index] if show_deltas else view[[*keys, *shown]]
    st.dataframe(frame, hide_index=True, width="stretch")
    st.caption(
        "click a column header to sort; breakdown metrics (per layer, head, task) are in `harness show --detail`"
    )
    unfinished = board.runs[board.runs["status"] != "complete"] if not board.runs.empty else board.runs
    if len(unfinished):
        st.warning(f"{len(unfinished)} cell(s) failed or did not finish: see the run detail tab")
