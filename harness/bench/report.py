"""Render bench Tables as markdown (docs/benchmarks.md's format) and JSON, under a header that says
where and how they were measured: device, library versions, commit, date, the exact command."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from harness.bench import Table


def header(command: str) -> dict[str, Any]:
    import torch

    from harness.provenance import device_name, git_commit, now, versions

    v = versions()
    return {
        "device": device_name("cuda" if torch.cuda.is_available() else "cpu"),
        "torch": v["torch"],
        "triton": v["triton"],
        "fla": v["flash-linear-attention"],
        "transformers": v["transformers"],
        "python": v["python"],
        "git_commit": git_commit(),
        "date": now(),
        "command": command,
    }


def cell(value: Any, spec: str | None = None) -> str:
    """One markdown cell: formatted, on one line, with `|` escaped (it would end the cell)."""
    if value is None:
        text = ""
    elif spec is not None and isinstance(value, (int, float)) and not isinstance(value, bool):
        text = spec.format(value)
    elif isinstance(value, float):
        text = f"{value:.4g}"
    else:
        text = str(value)
    return " ".join(text.split()).replace("|", "\\|")


def table_markdown(table: Table) -> str:
    lines = [f"## {table.title}", ""]
    if table.skipped:
        return "\n".join(lines + [f"Skipped: {table.skipped}", ""])
    lines += [note for n in table.notes for note in (n, "")]
    lines.append("| " + " | ".join(cell(table.labels.get(c, c)) for c in table.columns) + " |")
    lines.append("|" + "---|" * len(table.columns))
    for row in table.rows:
        lines.append("| " + " | ".join(cell(row.get(c), table.formats.get(c)) for c in table.columns) + " |")
    return "\n".join(lines + [""])


def markdown(tables: list[Table], head: dict[str, Any]) -> str:
    versions = ", ".join(f"{k} {head[k]}" for k in ("torch", "triton", "fla", "transformers") if head.get(k))
    lines = [
        "# Benchmarks",
        "",
        f"Device: {head['device']}; {versions}; commit {head.get('git_commit') or 'unknown'}; {head['date']}.",
        "",
        f"Command: `{head['command']}`",
        "",
    ]
    return "\n".join(lines + [table_markdown(t) for t in tables])


def write(out: Path, tables: list[Table], command: str) -> str:
    """DIR/benchmarks.json (every row, every key) and DIR/benchmarks.md; returns the markdown."""
    head = header(command)
    out.mkdir(parents=True, exist_ok=True)
    text = markdown(tables, head)
    (out / "benchmarks.md").write_text(text, encoding="utf-8")
    payload = {"header": head, "tables": [t.to_dict() for t in tables]}
    (out / "benchmarks.json").write_text(json.dumps(payload, indent=1, default=str), encoding="utf-8")
    return text
