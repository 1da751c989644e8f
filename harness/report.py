"""Results as tables: one row per (model, method, ratio), one column per suite metric.

Metric names with a "/" are breakdowns (per layer and head, per task and length: `key_u/L0H1`,
`niah_single/256`); the store keeps them all, and the tables show them only when asked.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from rich.table import Table
from rich.text import Text

_ORDER = ("model", "method", "ratio", "recovery")


def is_breakdown(metric: str) -> bool:
    return "/" in metric


def pivot(rows: Iterable[dict[str, Any]], detail: bool = False) -> tuple[list[str], list[dict[str, Any]]]:
    """Long rows (one per metric) -> (metric columns, wide rows); breakdowns only with `detail`."""
    columns: dict[str, None] = {}
    wide: dict[tuple, dict[str, Any]] = {}
    for row in rows:
        if row.get("metric") is None or (is_breakdown(row["metric"]) and not detail):
            continue
        column = f"{row['suite']}.{row['metric']}"
        columns.setdefault(column)
        ident = tuple(row.get(k, "none") for k in _ORDER)
        wide.setdefault(ident, dict(zip(_ORDER, ident)))[column] = row["value"]
    ordered = sorted(wide.values(), key=lambda r: (r["model"], r["method"] != "dense", r["method"], r["ratio"],
                                                   r["recovery"] != "none", r["recovery"]))
    return sorted(columns), ordered


def _fmt(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = float(value)  # the store returns REAL; fresh metrics may be int: print both alike
        if math.isnan(value):
            return "nan"
        if value.is_integer() and abs(value) < 1e12:
            return str(int(value))
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}" if abs(value) < 10 else f"{value:,.2f}"
    return "" if value is None else str(value)


def rich_table(rows: Iterable[dict[str, Any]], title: str | None = None, detail: bool = False) -> Table:
    columns, wide = pivot(rows, detail)
    table = Table(title=title, show_lines=False)
    for name in _ORDER:
        table.add_column(name, justify="right" if name == "ratio" else "left")
    for name in columns:
        table.add_column(name, justify="right")
    for row in wide:
        # Text, not str: names from results are data, never rich markup
        table.add_row(*(Text(_fmt(row.get(c))) for c in (*_ORDER, *columns)))
    return table
