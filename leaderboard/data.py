"""What the leaderboard shows, as pandas frames read from the store (no Streamlit here, so every
view's data is testable on its own). The store is opened read only."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from harness.report import _ORDER
from harness.store import COMPLETE, ResultStore

# x axes of the Pareto view: what a compression saves or buys (the speed suite's speedups too)
SIZE_WORDS = ("bytes", "kept", "reduction", "speedup", "tokens_per_s")
# state-rank rows: per head "<quantity>/L<layer>H<head>", and one summary row carrying the curve
CURVE_METRICS = ("u_final_mean", "key_u_mean")


@dataclass
class Board:
    """One read of the store: its cells and the wide leaderboard table."""

    store: ResultStore
    runs: pd.DataFrame  # one row per cell, any status
    table: pd.DataFrame  # complete cells: one row per (model, family, method, ratio, recovery)

    @property
    def metrics(self) -> list[str]:
        return [c for c in self.table.columns if c not in (*_ORDER, "family")]


def load(path: str | Path) -> Board:
    """Read the store at `path` (a missing store is a one-line HarnessError)."""
    from harness.export import results_frame

    store = ResultStore(path, read_only=True)
    runs = pd.DataFrame(store.runs())
    table = results_frame(path)
    if not table.empty:
        families = runs.drop_duplicates("model").set_index("model")["family"]
        table.insert(1, "family", table["model"].map(families))
    return Board(store, runs, table)


def suite_of(column: str) -> str:
    return column.split(".", 1)[0]


def filtered(table: pd.DataFrame, metrics: list[str], *, suites=(), **chosen) -> tuple[pd.DataFrame, list[str]]:
    """Rows whose columns take one of the chosen values (an empty choice keeps all), and the metric
    columns of the chosen suites."""
    view = table
    for column, values in chosen.items():
        if values:
            view = view[view[column].isin(values)]
    return view, [c for c in metrics if not suites or suite_of(c) in suites]


def with_deltas(table: pd.DataFrame, metrics: list[str]) -> pd.DataFrame:
    """Each metric next to its difference from the dense row of the same model (NaN without one)."""
    keys = [c for c in (*_ORDER[:1], "family", *_ORDER[1:]) if c in table.columns]
    dense = table[table["method"] == "dense"].drop_duplicates("model").set_index("model")
    out = table[keys].copy()
    for column in metrics:
        out[column] = table[column]
        if pd.api.types.is_numeric_dtype(table[column]):
            reference = table["model"].map(dense[column]) if column in dense else float("nan")
            out[f"{column} Δ"] = table[column] - reference
    return out


def headline_columns() -> list[str]:
    """`suite.metric` of every headline (the results summary's rows), most important first."""
    from harness.report import COMPRESSION, SUITE_ORDER, suite_headlines

    return [f"{suite}.{h.metric}" for suite in (COMPRESSION, *SUITE_ORDER) for h in suite_headlines(suite)]


def ordered_metrics(view: pd.DataFrame, metrics: list[str]) -> list[str]:
    """The metric columns worth a column for the rows shown: those with at least one value, the
    headlines first (what a cell compresses, then quality, then speed), then the rest by suite."""
    from harness.report import COMPRESSION, SUITE_ORDER

    present = [c for c in metrics if c in view and view[c].notna().any()]
    heads = [c for c in headline_columns() if c in present]
    rank = {suite: i for i, suite in enumerate((COMPRESSION, *SUITE_ORDER))}
    rest = sorted((c for c in present if c not in heads), key=lambda c: (rank.get(suite_of(c), len(rank)), c))
    return heads + rest


def pareto_defaults(rows: pd.DataFrame, size: list[str], quality: list[str]) -> tuple[list[str], list[str]]:
    """The x and y choices for one model's rows: only columns with values for it, headlines first
    (so the chart opens on axes that have points)."""
    heads = headline_columns()

    def usable(columns):
        have = [c for c in columns if c in rows and rows[c].notna().sum() >= 1]
        return sorted(have, key=lambda c: (heads.index(c) if c in heads else len(heads), c))

    return usable(size), usable(quality)


def pareto_axes(view: pd.DataFrame, metrics: list[str]) -> tuple[list[str], list[str]]:
    """(size-or-speed columns for x, quality columns for y) among the numeric metrics shown."""
    numeric = [c for c in metrics if pd.api.types.is_numeric_dtype(view[c]) and view[c].notna().any()]
    size = [c for c in numeric if any(w in c.split(".", 1)[1] for w in SIZE_WORDS)]
    return size, [c for c in numeric if c not in size]


def label(run: pd.Series | dict, suite: bool = True) -> str:
    """A cell's name in pickers: model · method ratio [+recovery] [· suite]."""
    recovery = "" if run["recovery"] == "none" else f" +{run['recovery']}"
    return f"{run['model']} · {run['method']} {run['ratio']:g}{recovery}" + (f" · {run['suite']}" if suite else "")


def cells(board: Board, suite: str | None = None, status: str | None = COMPLETE) -> pd.DataFrame:
    runs = board.runs
    if runs.empty:
        return runs
    if suite is not None:
        runs = runs[runs["suite"] == suite]
    if status is not None:
        runs = runs[runs["status"] == status]
    return runs.assign(label=[label(r, suite is None) for _, r in runs.iterrows()])


def head_grid(board: Board, run_keys: list[str], quantity: str) -> pd.DataFrame:
    """Per-head state-rank rows of these cells: columns run_key, layer, head, value."""
    rows = [
        r
        for r in board.store.results(run_keys, f"{quantity}/")
        if r["details"].get("scope") == "head" and r["value"] is not None
    ]
    return pd.DataFrame(
        [
            {
                "run_key": r["run_key"],
                "layer": int(r["details"]["layer"]),
                "head": int(r["details"]["head"]),
                "value": r["value"],
            }
            for r in rows
        ],
        columns=["run_key", "layer", "head", "value"],
    )


def head_quantities(board: Board, run_keys: list[str]) -> list[str]:
    """The per-head quantities these cells hold, utilization first."""
    names = {r["metric"].split("/", 1)[0] for r in board.store.results(run_keys) if "/L" in r["metric"]}
    return sorted(names, key=lambda n: (n not in ("u_final", "key_u"), n))


def utilization_curves(board: Board, run_keys: list[str]) -> pd.DataFrame:
    """Mean utilization vs position, one curve per cell: columns run_key, position, utilization."""
    out = []
    for metric in CURVE_METRICS:
        for r in board.store.results(run_keys, metric):
            if r["metric"] != metric:
                continue
            positions, curve = r["details"].get("positions", []), r["details"].get("utilization_vs_position", [])
            out += [
                {"run_key": r["run_key"], "position": int(p), "utilization": float(u)} for p, u in zip(positions, curve)
            ]
    return pd.DataFrame(out, columns=["run_key", "position", "utilization"])


def artifacts(board: Board, run_key: str) -> list[Path]:
    """The files in a cell's artifact folder (the folder beside the store, named by the run key)."""
    folder = board.store.artifacts_dir(run_key, create=False)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def selection_grid(board: Board, run_key: str) -> pd.DataFrame | None:
    """Kept key channels per (layer, head) from the cell's selection.json: columns layer, head,
    kept, of, channels. None without a selection (dense cells, or an unreadable file)."""
    path = board.store.artifacts_dir(run_key, create=False) / "selection.json"
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        rows = [
            {
                "layer": int(i),
                "head": h,
                "kept": len(kept),
                "of": int(layer["head_dim"]),
                "channels": ", ".join(str(int(c)) for c in kept),
            }
            for i, layer in data["layers"].items()
            for h, kept in enumerate(layer["kept"])
        ]
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    return pd.DataFrame(rows, columns=["layer", "head", "kept", "of", "channels"]).sort_values(["layer", "head"])


def provenance(run: pd.Series) -> dict[str, Any]:
    """A cell's parameters and provenance, JSON columns parsed (unparseable text kept as text)."""

    def parsed(text):
        try:
            return json.loads(text) if isinstance(text, str) else text
        except ValueError:
            return text

    def clean(value):
        value = value.item() if hasattr(value, "item") else value  # numpy scalars from pandas
        return None if isinstance(value, float) and value != value else value  # NaN is not JSON

    fields = (
        "model",
        "model_digest",
        "family",
        "method",
        "ratio",
        "recovery",
        "suite",
        "seed",
        "status",
        "kept_ratio",
        "selection_digest",
        "started",
        "finished",
        "duration_s",
        "run_key",
    )
    return {
        **{f: clean(run.get(f)) for f in fields},
        **{
            f: parsed(run.get(f))
            for f in ("method_params", "recovery_params", "suite_params", "calibration", "provenance")
        },
    }


def method_cards() -> list[dict[str, Any]]:
    """Every registered method (plugins included, broken ones with their error), as registry cards."""
    from harness import registry

    return [registry.describe(e) for e in registry.entries(registry.METHODS)]
