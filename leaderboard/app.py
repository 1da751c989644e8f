"""The leaderboard: a Streamlit app over the results store, read only.

`harness leaderboard` starts it; the store path comes from the environment variable
HARNESS_STORE (set by the command). Tabs: the table, Pareto plots, state-rank views, run
detail, method cards (one module each in `tabs/`). Every string from the store is untrusted: it
is shown through dataframe, JSON and text elements, or escaped by `safe.plain`, never as HTML.
"""

from __future__ import annotations

import os

import streamlit as st

from harness.errors import HarnessError
from harness.store import DEFAULT_STORE
from harness.leaderboard import data
from harness.leaderboard.safe import plain
from harness.leaderboard.tabs import methods, pareto, run_detail, state_rank, table

STORE = os.environ.get("HARNESS_STORE", DEFAULT_STORE)

st.set_page_config(page_title="key-channel compression leaderboard", layout="wide")
st.title("Key-channel compression leaderboard")
st.caption("results store (read only): " + plain(STORE))

try:
    board = data.load(STORE)
except HarnessError as exc:
    st.error(plain(exc))
    board = None
except Exception as exc:  # an unreadable store: say so on the page, do not crash
    st.error(plain(f"cannot read the results store: {type(exc).__name__}: {exc}"))
    board = None

tab_names = ["leaderboard", "pareto", "state rank", "run detail", "methods"]
tab_table, tab_pareto, tab_rank, tab_detail, tab_methods = st.tabs(tab_names)
with tab_methods:
    methods.render()
if board is None:
    st.stop()

chosen: dict[str, list] = {}
with st.sidebar:
    st.header("filters")
    source = board.table if not board.table.empty else board.runs
    for column in ("model", "family", "method", "ratio"):
        options = sorted(source[column].unique()) if column in source else []
        chosen[column] = st.multiselect(column, options, key=column)
    suites = st.multiselect("suite", sorted({data.suite_of(c) for c in board.metrics}), key="suite")

view, shown = (
    data.filtered(board.table, board.metrics, suites=suites, **chosen) if not board.table.empty else (board.table, [])
)
shown = data.ordered_metrics(view, shown)  # headlines first; columns empty for these rows left out
with tab_table:
    table.render(board, view, shown)
with tab_pareto:
    pareto.render(view, shown)
with tab_rank:
    state_rank.render(board, chosen)
with tab_detail:
    run_detail.render(board)
