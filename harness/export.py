"""`harness export`: the results table (as `harness show` prints it) in a file format for papers.

One row per (model, method, ratio, recovery), one column per `suite.metric`, complete cells only;
breakdown metrics (names with "/") only with `detail`. pandas writes the formats.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from harness.errors import HarnessError
from harness.report import _ORDER, pivot

FORMATS = ("csv", "parquet", "markdown", "latex")


def results_frame(store: str | Path, *, detail: bool = False, **where) -> pd.DataFrame:
    """The store's complete cells as a wide table (rows filtered by model/method/suite...)."""
    from harness.store import COMPLETE, ResultStore

    rows = [r for r in ResultStore(store, read_only=True).table(**where) if r["status"] == COMPLETE]
    columns, wide = pivot(rows, detail)
    return pd.DataFrame(wide, columns=[*_ORDER, *columns])


def export(store: str | Path, fmt: str, out: str | Path | None = None, *, detail: bool = False, **where) -> str | None:
    """Write the table to `out` in `fmt`; without `out`, return it as text (not for parquet)."""
    if fmt not in FORMATS:
        raise HarnessError(f"unknown export format {fmt!r}; use one of {', '.join(FORMATS)}")
    frame = results_frame(store, detail=detail, **where)
    if fmt == "parquet":
        if out is None:
            raise HarnessError("parquet is binary: pass --out FILE")
        frame.to_parquet(out, index=False)
        return None
    text = {
        "csv": lambda: frame.to_csv(index=False),
        "markdown": lambda: frame.to_markdown(index=False),
        # escape: method names and parameters are untrusted text, never LaTeX commands
        "latex": lambda: frame.to_latex(index=False, escape=True, float_format="%.4g"),
    }[fmt]()
    if out is None:
        return text
    Path(out).write_text(text, encoding="utf-8")
    return None
