"""The run pipeline: load -> calibrate -> select -> apply -> evaluate -> store.

`run(...)` is the Python twin of `harness run`: the CLI only parses flags into this call.
Every (model, method, ratio, suite) cell has a run key; a cell already complete in the store
is reused, not recomputed. Each cell is marked running before its work and complete (with all
its metrics, in one transaction) after it; an exception or Ctrl-C marks the cell failed, and
cells finished before it stay in the store.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from harness import params as params_mod
from harness import provenance, registry
from harness.calibration import CalibrationSpec
from harness.compress import check_ratios, plan
from harness.errors import HarnessError
from harness.progress import Bars, bars
from harness.results import RunKey
from harness.selection import ChannelSelection
from harness.store import COMPLETE, DEFAULT_STORE, ResultStore
from harness.suite import Metric, Suite, SuiteContext

COMPRESSION = "compression"  # the built-in cell that records what a selection keeps (bytes, ratio)


@dataclass(frozen=True)
class RunCells:
    """Everything a run key holds but the suite, ratio and stage: the cells of one run of one
    method on one model. `harness run` and `harness sweep` both make their keys here, so a sweep
    finds (and skips) exactly the cells a run stored."""

    model: str  # as the user named it
    digest: str  # the weights
    family: str
    method: str
    method_params: dict[str, Any]
    seed: int
    calibration: dict[str, Any]  # {} for a method that needs no calibration data
    lora: dict[str, Any] | None = None  # LoRA's key when recovery is on

    def key(self, suite: str, suite_args: dict, ratio: float, dense: bool = False, recovery: str = "none") -> RunKey:
        return RunKey(
            model=self.model,
            model_digest=self.digest,
            family=self.family,
            method="dense" if dense else self.method,
            method_params={} if dense else self.method_params,
            ratio=0.0 if dense else float(ratio),
            suite=suite,
            suite_params=suite_args,
            seed=self.seed,
            calibration={} if dense else self.calibration,
            recovery=recovery,
            recovery_params=self.lora if recovery == "lora" and self.lora is not None else {},
        )

    def cells(
        self, suites: Sequence[Suite], ratio: float, dense: bool = False, recovery: str = "none"
    ) -> list[tuple[RunKey, Suite | None]]:
        """The compression cell (suite None) and one cell per suite."""
        return [
            (self.key(COMPRESSION, {}, ratio, dense, recovery), None),
            *((self.key(s.name, params_mod.as_dict(s), ratio, dense, recovery), s) for s in suites),
        ]

    @property
    def stages(self) -> list[str]:
        """What happens after pruning: nothing, then (with LoRA) recovery; each stage has its own cells."""
        return ["none"] + (["lora"] if self.lora is not None else [])


@dataclass
class RunReport:
    rows: list[dict[str, Any]] = field(default_factory=list)
    computed: int = 0  # cells computed by this call
    reused: int = 0  # cells found complete in the store
    saved: list[str] = field(default_factory=list)  # folders written by save
    failed: list[str] = field(default_factory=list)  # "<cell>: <reason>" of cells stored as failed


def non_finite(suite, metrics: list[Metric]) -> list[str]:
    """The suite's headline metrics that came out NaN or infinite (a model whose outputs are not
    finite: such a cell is a failure, not a result)."""
    heads = {h.metric for h in getattr(suite, "headlines", ())}
    return [f"{m.name}={m.value}" for m in metrics if m.name in heads and not math.isfinite(float(m.value))]


def suites_for(names: Sequence[str], suite_params: dict[str, dict[str, Any]]) -> list[Suite]:
    wanted: list[str] = []
    for name in names:
        if name == "all":
            wanted += [e.name for e in registry.entries(registry.SUITES) if e.ok]
        else:
            wanted.append(name)
    unknown_params = set(suite_params) - set(wanted)
    if unknown_params:
        raise HarnessError(f"parameters given for suite {sorted(unknown_params)[0]!r}, which this run does not include")
    suites = []
    for name in dict.fromkeys(wanted):  # ordered, unique
        cls = registry.get_suite(name)
        suites.append(params_mod.build(cls, suite_params.get(name), what=f"suite {name}"))
    return suites


@dataclass
class Cells:
    """The cells of one `run`: their keys, the ones the store has (reused unless `force`), and the
    computing and storing of the others, each marked running, then complete or failed."""

    store: ResultStore
    run_cells: RunCells
    suites: list[Suite]
    loaded: Any  # harness.loader.LoadedModel
    adapter: Any  # its FamilyAdapter
    seed: int
    force: bool
    prov: dict[str, Any]
    report: RunReport = field(default_factory=RunReport)

    def keys(self, ratio: float, dense: bool, recovery: str = "none") -> list[tuple[RunKey, Suite | None]]:
        return self.run_cells.cells(self.suites, ratio, dense, recovery)

    def complete(self, ratio: float, stages: Sequence[str]) -> bool:
        """Whether every compressed cell of `ratio` in `stages` is complete in the store (never with `force`)."""
        return not self.force and all(
            self.store.status(k) == COMPLETE for r in stages for k, _ in self.keys(ratio, False, r)
        )

    def record(self, k: RunKey, metrics: list[Metric], cached: bool) -> None:
        for m in metrics:
            self.report.rows.append(
                {
                    "model": k.model,
                    "family": k.family,
                    "method": k.method,
                    "ratio": k.ratio,
                    "recovery": k.recovery,
                    "suite": k.suite,
                    "metric": m.name,
                    "value": m.value,
                    "unit": m.unit,
                    "cached": cached,
                }
            )

    def reuse(self, k: RunKey) -> None:
        """Report a cell the store has complete."""
        self.record(k, self.store.metrics(k), True)
        self.report.reused += 1

    def evaluate(
        self, model, selection: ChannelSelection, ratio: float, dense: bool, bar: Bars, recovery: str = "none"
    ) -> None:
        for k, suite in self.keys(ratio, dense, recovery):
            if not self.force and self.store.status(k) == COMPLETE:
                self.reuse(k)
            else:
                self.compute(k, suite, model, selection, dense, bar)

    def compute(
        self, k: RunKey, suite: Suite | None, model, selection: ChannelSelection, dense: bool, bar: Bars
    ) -> None:
        """One cell: the compression cell (suite None) or a suite's, stored as complete or failed."""
        self.store.begin(k, kept_ratio=selection.kept_ratio, selection_digest=selection.digest)
        art = self.store.artifacts_dir(k)
        selection.save(art / "selection.json")
        started = time.perf_counter()
        try:
            if suite is None:
                metrics = self.adapter.bytes_metrics(model, selection)
            else:
                ctx = SuiteContext(
                    self.loaded.family,
                    self.loaded.device,
                    self.seed,
                    art,
                    bar.task,
                    reference=None if dense else self.loaded.model,
                )
                metrics = suite.run(model, self.loaded.tokenizer, ctx)
        except BaseException as exc:  # Ctrl-C too: the cell is marked, finished cells stay
            self.store.fail(k, f"{type(exc).__name__}: {exc}")
            raise
        bad = non_finite(suite, metrics) if suite is not None else []
        if bad:
            reason = f"non-finite {', '.join(bad)}: the model's outputs are not finite (NaN or infinite weights?)"
            self.store.fail(k, reason)
            self.report.failed.append(f"{k.method} {k.ratio} {k.suite}: {reason}")
            return
        self.store.finish(
            k,
            metrics,
            prov={**self.prov, "duration_s": time.perf_counter() - started},
            duration_s=time.perf_counter() - started,
        )
        self.record(k, metrics, False)
        self.report.computed += 1


def run(
    model: str | None = None,
    method: str = "drrqr",
    ratios: Sequence[float] = (0.5,),
    suites: Sequence[str] = ("all",),
    *,
    method_params: dict[str, Any] | None = None,
    suite_params: dict[str, dict[str, Any]] | None = None,
    seed: int = 0,
    calibration: CalibrationSpec | None = None,
    store: str | Path = DEFAULT_STORE,
    device: str = "auto",
    dtype: str = "float32",
    trust_remote_code: bool = False,
    dense: bool = True,
    save: str | Path | None = None,
    force: bool = False,
    progress: bool = True,
    lora=None,
    attn_method: str | None = None,
    attn_method_params: dict[str, Any] | None = None,
) -> RunReport:
    """Compress `model` with `method` at each ratio and evaluate `suites`; see `harness run --help`.

    `lora` (a `harness.recovery.LoraSpec`) adds LoRA recovery after pruning: the recovered model is
    evaluated too, as its own cells (recovery="lora"), beside the pruned ones. On a hybrid model,
    `attn_method` compresses the attention layers while `method` compresses the linear ones; the
    cells are stored under method "<method>+<attn_method>" with the parameters of both.
    """
    # everything that needs no model is checked first: bad input fails in milliseconds
    registry.build_method(method, method_params, seed)
    if attn_method is not None:
        registry.build_method(attn_method, attn_method_params, seed)
    check_ratios(ratios)
    suite_objs = suites_for(suites, suite_params or {})
    results = ResultStore(store)
    p = plan(
        model,
        method,
        ratios,
        method_params=method_params,
        seed=seed,
        calibration=calibration,
        device=device,
        dtype=dtype,
        trust_remote_code=trust_remote_code,
        attn_method=attn_method,
        attn_method_params=attn_method_params,
    )
    loaded, adapter, calibration = p.loaded, p.adapter, p.calibration
    suite_objs = [s for s in suite_objs if s.applies_to(loaded.family)]
    if not suite_objs:
        raise HarnessError(f"none of the suites {', '.join(suites)} applies to {loaded.family} models")

    run_cells = RunCells(
        loaded.name,
        loaded.digest,
        loaded.family,
        p.method_name,
        p.method_key(),
        seed,
        calibration.key() if p.calibrated else {},
        lora.key() if lora is not None else None,
    )
    cells = Cells(results, run_cells, suite_objs, loaded, adapter, seed, force, provenance.collect(loaded.device))
    with bars(progress) as bar:
        if dense:
            cells.evaluate(loaded.model, adapter.full_selection(loaded.model), 0.0, True, bar)
        todo = [r for r in p.ratios if save is not None or not cells.complete(r, run_cells.stages)]
        layer_data = p.capture(bar) if todo else None
        for ratio in p.ratios:
            if ratio in todo:
                _compress_and_evaluate(p, cells, layer_data, ratio, bar, save, lora)
            else:
                for k, _ in (c for r in run_cells.stages for c in cells.keys(ratio, False, r)):
                    cells.reuse(k)
    return cells.report


def _compress_and_evaluate(p, cells: Cells, layer_data, ratio: float, bar: Bars, save: str | Path | None, lora) -> None:
    """One ratio of `run`: compress, save if asked, evaluate; then (with `lora`) recover and evaluate
    the recovered model, unless its cells are all in the store already."""
    pruned, selection = p.compress(layer_data, ratio, bar)
    if save is not None:
        cells.report.saved.append(p.save(pruned, selection, save))
    cells.evaluate(pruned, selection, ratio, False, bar)
    if lora is None:
        return
    if save is None and cells.complete(ratio, ["lora"]):
        cells.evaluate(pruned, selection, ratio, False, bar, "lora")  # records the cached cells
        return
    from harness import graph_decode
    from harness.recovery import lora_recover

    graph_decode.release(pruned)  # training must not run on a held decoder's grouped weights
    recovered, _stats = lora_recover(
        pruned,
        p.loaded.tokenizer,
        lora,
        text_file=p.calibration.text_file,
        advance=bar.task(f"lora {ratio:g}", lora.steps),
    )
    if save is not None:
        cells.report.saved.append(p.save(recovered, selection, save, suffix="-lora"))
    cells.evaluate(recovered, selection, ratio, False, bar, "lora")
