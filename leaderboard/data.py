"""Table helpers for the leaderboard (pure pandas, testable without Streamlit)."""

from __future__ import annotations

import pandas as pd


def with_deltas(table: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Each metric next to its difference from the dense row of the same model (NaN without one)."""
    keys = ["model", "method", "ratio", "recovery"]
    dense = table[table["method"] == "dense"].drop_duplicates("model").set_index("model")
    out = table[keys].copy()
    for column in metrics:
        out[column] = table[column]
        if pd.api.types.is_numeric_dtype(table[column]):
            reference = table["model"].map(dense[column]) if column in dense else float("nan")
            out[f"{column} Δ"] = table[column] - reference
    return out
