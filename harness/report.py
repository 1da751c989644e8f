"""Results as tables.

- `summary_tables` (what `harness run` and `harness show` print): per model, the few headline
  metrics each suite declares (`Suite.headlines`) as rows, one column per variant (dense first,
  then each method, ratio and recovery), each compressed value with its change against dense,
  units, and which way is better.
- `rich_table` (`--detail`, and the shape `harness export` writes): one row per (model, method,
  ratio), one column per suite metric. Metric names with a "/" are breakdowns (per layer and head,
  per task and length: `key_u/L0H1`, `niah_single/256`); the store keeps them all, and the table
  shows them only when asked.
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from rich.table import Table
from rich.text import Text

from harness.suite import Headline

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
    ordered = sorted(
        wide.values(),
        key=lambda r: (
            r["model"],
            r["method"] != "dense",
            r["method"],
            r["ratio"],
            r["recovery"] != "none",
            r["recovery"],
        ),
    )
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


COMPRESSION = "compression"  # the pipeline's own cell: what a selection keeps
COMPRESSION_HEADLINES = (
    Headline("kept_ratio", "key channels kept", "", "fraction"),
    Headline("state_bytes", "state bytes", "lower", "bytes"),
    Headline("kv_bytes", "KV cache bytes", "lower", "bytes"),
    Headline("bytes", "state + KV bytes", "lower", "bytes"),
)
SUITE_ORDER = ("ppl", "lm-eval", "ruler", "longbench", "mqar", "state-rank", "speed")
ARROWS = {"higher": "↑", "lower": "↓", "": ""}
LEGEND = (
    "dense: the uncompressed model. ↑ higher is better, ↓ lower is better; (±) change against dense. "
    "`--detail` shows every metric, `harness export` writes them to a file."
)


def suite_headlines(suite: str) -> tuple[Headline, ...]:
    """The headlines of a suite by its registered name (none for an unknown or broken one)."""
    if suite == COMPRESSION:
        return COMPRESSION_HEADLINES
    from harness import registry

    try:
        return tuple(getattr(registry.get_suite(suite), "headlines", ()))
    except Exception:  # noqa: BLE001 - a plugin that fails to import shows in the detailed table only
        return ()


def show_value(value: float, kind: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "nan" if value is not None else ""
    if kind == "bytes":
        for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
            if abs(value) >= size:
                return f"{value / size:.3g} {unit}"
        return f"{value:.0f} B"
    if kind == "fraction":
        return f"{100 * value:.1f}%"
    if kind == "percent":
        return f"{value:.1f}%"
    return _fmt(value)


def show_change(value: float, dense: float, kind: str) -> str:
    """A compressed value's change against dense: points for percentages, relative otherwise."""
    if value is None or dense is None or any(isinstance(x, float) and math.isnan(x) for x in (value, dense)):
        return ""
    if kind in ("fraction", "percent"):
        points = (value - dense) * (100 if kind == "fraction" else 1)
        return f"{points:+.1f} pts"
    if dense == 0:
        return ""
    return f"{100 * (value - dense) / abs(dense):+.1f}%"


def _variant(row: dict[str, Any]) -> str:
    if row["method"] == "dense":
        return "dense"
    ratio = _fmt(row["ratio"])
    return f"{row['method']} {ratio}" + ("" if row.get("recovery", "none") == "none" else f" +{row['recovery']}")


def summary_tables(rows: Iterable[dict[str, Any]]) -> list[Table]:
    """Per model, the headline metrics (rows) of every variant (columns), with changes against dense
    (`LEGEND` says how to read them)."""
    values: dict[str, dict[str, dict[tuple[str, str], float]]] = {}  # model -> variant -> (suite, metric) -> value
    variants: dict[str, dict[str, tuple]] = {}
    for row in rows:
        if row.get("metric") is None or is_breakdown(row["metric"]):
            continue
        name = _variant(row)
        values.setdefault(row["model"], {}).setdefault(name, {})[(row["suite"], row["metric"])] = row["value"]
        recovery = row.get("recovery", "none")
        variants.setdefault(row["model"], {})[name] = (
            row["method"] != "dense",
            row["method"],
            row["ratio"],
            recovery != "none",
            recovery,
        )
    suites = {suite for per_model in values.values() for v in per_model.values() for suite, _ in v}
    order = [COMPRESSION, *SUITE_ORDER, *sorted(suites - {COMPRESSION, *SUITE_ORDER})]
    tables = []
    for model in sorted(values):
        names = sorted(variants[model], key=lambda n: variants[model][n])
        cells = values[model]
        table = Table(title=Text(model), show_lines=False)
        table.add_column("metric")
        for name in names:
            table.add_column(Text(name), justify="right")
        for suite in (s for s in order if s in suites):
            for head in suite_headlines(suite):
                key = (suite, head.metric)
                if not any(key in cells[n] for n in names):
                    continue
                dense = cells.get("dense", {}).get(key)
                shown = []
                for name in names:
                    value = cells[name].get(key)
                    text = show_value(value, head.kind)
                    if name != "dense" and head.better and text:
                        change = show_change(value, dense, head.kind)
                        text += f" ({change})" if change else ""
                    shown.append(Text(text))
                label = f"{head.label} {ARROWS[head.better]}".strip()
                table.add_row(Text(label), *shown)
        tables.append(table)
    return tables
