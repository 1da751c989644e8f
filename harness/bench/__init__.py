"""`harness bench`: the GPU speed tables of docs/benchmarks.md, in one command.

Each table is a function `run(**options) -> Table` in a module of this package, registered in
`TABLES` under the name `--only` uses. The contract:

- Options are keywords, all optional; a table function declares only those it uses and
  `run_table` passes only those (so `def run(mask_path=None, quick=False)` is a valid table):
    quick: bool       small sizes (a one-minute smoke test on a GPU; on CPU, tiny zoo models)
    mask_path: str    the LeanK mask (.pth) for Llama-3.1-8B rows, or None: a synthetic mask
    bars: Bars        harness.progress bars; `bars.task(label, total)` returns a bar to advance
- It returns a `Table`: rows are plain dicts of JSON values (numbers unformatted; the report
  formats them with `formats`); `columns` lists the keys the markdown shows, in order, under
  the headers in `labels` (rows may hold more keys: all go to the JSON); `notes` are sentences
  printed under the title (shapes, method, what is resident, caveats). Timings are measured,
  never asserted: targets go in notes ("met in 7 of 8 rows").
- Every table runs in the same process, one after another: free what it allocated (on a GPU,
  `torch.cuda.empty_cache()`) before returning. `mask_path` is None or a file that loads
  (`harness bench` checked it before the first table).
- A table that needs CUDA is listed in `GPU_ONLY`; without a GPU the command skips it (with
  `--quick`) or stops with a one-line error. A table that cannot run for another reason returns
  `Table(..., skipped="why")` rather than raising.
"""

from __future__ import annotations

import importlib
import inspect
import logging
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["GPU_ONLY", "TABLES", "TITLES", "Table", "log", "run_table"]

log = logging.getLogger("harness.bench")


@dataclass
class Table:
    title: str
    columns: list[str]
    rows: list[dict[str, Any]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    formats: dict[str, str] = field(default_factory=dict)  # column -> format spec, e.g. "{:.1f}"
    labels: dict[str, str] = field(default_factory=dict)  # column -> header shown (default: the key)
    skipped: str | None = None  # why the table has no rows (no GPU, ...)
    name: str = ""  # its key in TABLES (set by run_table)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --only name -> "module:function"; the command runs them in this order
TABLES: dict[str, str] = {
    "pruned": "harness.bench.pruned_decode:run",
    "linear": "harness.bench.linear_decode:run_decode",
    "prefill": "harness.bench.linear_decode:run_prefill",
    "e2e-llama": "harness.bench.end_to_end:run_llama",
    "capacity": "harness.bench.capacity:run",
    "e2e-deltanet": "harness.bench.end_to_end:run_deltanet",
    "e2e-gated-deltanet": "harness.bench.end_to_end:run_gated_deltanet",
    "e2e-qwen35": "harness.bench.end_to_end:run_qwen35",
}
TITLES = {  # for tables that were skipped (a table that runs gives its own title)
    "pruned": "Softmax attention: decode over the pruned K cache",
    "linear": "Linear attention: one-token decode at pruned d_k",
    "prefill": "Linear attention: prefill chunk kernels at pruned d_k",
    "e2e-llama": "End to end: dense vs LeanK-masked Llama-3.1-8B config, same run",
    "capacity": "Largest batch that fits: Llama-3.1-8B config through the static decode loop",
    "e2e-deltanet": "End to end: dense vs 50%-pruned DeltaNet-1.3B config, same run",
    "e2e-gated-deltanet": "End to end: dense vs 50%-pruned Gated DeltaNet-1.3B config, same run",
    "e2e-qwen35": "End to end: dense vs 50%-pruned Qwen3.5-0.8B geometry (hybrid), same run",
}
GPU_ONLY = frozenset({"pruned", "linear", "prefill", "capacity"})  # op-level Triton timings: nothing to run on CPU


def table_function(name: str):
    module, _, function = TABLES[name].partition(":")
    return getattr(importlib.import_module(module), function)


def run_table(name: str, **options) -> Table:
    """Run one registered table with the options its function accepts."""
    fn = table_function(name)
    accepted = inspect.signature(fn).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in accepted.values())
    table = fn(**{k: v for k, v in options.items() if takes_any or k in accepted})
    table.name = name
    return table
