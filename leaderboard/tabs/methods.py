"""Method cards from the registry: built-ins and plugins alike, broken plugins with their error."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from harness.leaderboard import data
from harness.leaderboard.safe import plain


def render() -> None:
    for card in data.method_cards():
        with st.container(border=True):
            st.subheader(plain(card["name"]))
            origin = "built in" if card["package"] == "kc-harness" else f"plugin from package {card['package']}"
            st.text(f"{origin} · {card['target']} · {card['status']}")
            if card["families"]:
                st.text("families: " + ", ".join(card["families"]))
            if card["reference"]:
                st.text(f"reference: {card['reference']}")
            if card["summary"]:
                st.text(card["summary"])
            if card["parameters"]:
                params = pd.DataFrame(card["parameters"], columns=["parameter", "type", "default"])
                st.dataframe(params.astype(str), hide_index=True)
