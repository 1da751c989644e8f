"""`harness sweep`: a grid of models x methods x ratios x suites x seeds (x recovery), resumable,
run on this machine or on a Ray cluster, with the driver as the store's single writer.

The grid expands to tasks, one per (model, method, seed, ratio): a task is one
`harness.pipeline.run` at that ratio with every suite of the grid (and LoRA recovery when asked),
so all its cells share one compression. Cells have the run keys `harness run` gives them
(`pipeline.RunCells`), computed from the models' files without loading them: cells complete in
the store are skipped, whoever computed them.

A task runs in a scratch store (in its worker's temporary folder), seeded with the task's cells
that are already complete so nothing is computed twice; its new cells (metrics, status, error,
artifact files) come back to the driver, which alone writes the store, a task at a time as
tasks finish. A task that raises records its failed cell (or, if it failed before any cell, all
its cells) with the error, and the sweep goes on; a Ray worker that dies is retried
`max_retries` times. Ctrl-C or a killed driver leaves every finished task's cells in the store;
the same sweep run again computes only what is missing.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence

from harness.errors import HarnessError
from harness.results import RunKey
from harness.store import DEFAULT_STORE

EXECUTORS = ("local", "ray")


@dataclass(frozen=True)
class MethodSpec:
    """One method of the grid: a name with parameters, or a hybrid pair "linear+attention"."""

    name: str
    params: dict[str, Any] = field(default_factory=dict)
    attn: str | None = None
    attn_params: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def parse(cls, item: str | dict) -> "MethodSpec":
        if isinstance(item, str):
            name, _, attn = item.partition("+")
            return cls(name.strip(), attn=attn.strip() or None)
        from harness.params import shown

        if not isinstance(item, dict) or not isinstance(item.get("name"), str) or not item["name"].strip():
            raise HarnessError(
                f"a sweep method is a name or a table with 'name' (and params, attn, attn_params), got {shown(item)}"
            )
        unknown = set(item) - {"name", "params", "attn", "attn_params"}
        if unknown:
            raise HarnessError(
                f"unknown key {sorted(map(str, unknown))[0]!r} in sweep method {item['name']!r}; "
                "use params, attn, attn_params"
            )
        for key in ("params", "attn_params"):
            if not isinstance(item.get(key) or {}, dict):
                raise HarnessError(f"{key} of sweep method {item['name']!r} must be a table, got {shown(item[key])}")
        if item.get("attn") is not None and not isinstance(item["attn"], str):
            raise HarnessError(
                f"attn of sweep method {item['name']!r} must be a method name, got {shown(item['attn'])}"
            )
        name, _, attn = item["name"].partition("+")
        return cls(
            name, dict(item.get("params") or {}), item.get("attn") or attn or None, dict(item.get("attn_params") or {})
        )

    @property
    def label(self) -> str:
        return self.name if self.attn is None else f"{self.name}+{self.attn}"


def _default_model() -> str:
    from harness.loader import DEFAULT_MODEL  # imported when needed: it loads torch

    return DEFAULT_MODEL


@dataclass
class Grid:
    """What a sweep covers; `Grid.load(path)` reads it from a YAML or TOML file with these keys."""

    models: list[str] = field(default_factory=lambda: [_default_model()])
    methods: list[MethodSpec] = field(default_factory=list)
    ratios: list[float] = field(default_factory=lambda: [0.5])
    suites: list[str] = field(default_factory=lambda: ["all"])
    suite_params: dict[str, dict[str, Any]] = field(default_factory=dict)
    seeds: list[int] = field(default_factory=lambda: [0])
    recovery: list[str] = field(default_factory=lambda: ["none"])  # "none", and "lora" for LoRA recovery too
    lora: dict[str, Any] = field(default_factory=dict)  # harness.recovery.LoraSpec fields
    calibration: dict[str, Any] = field(default_factory=dict)  # harness.calibration.CalibrationSpec fields but seed
    device: str = "auto"
    dtype: str = "float32"
    threads: int | None = 1  # torch CPU threads per task: values then do not depend on where a task ran

    def __post_init__(self) -> None:
        self._check_types()
        self.methods = [m if isinstance(m, MethodSpec) else MethodSpec.parse(m) for m in self.methods]
        if not self.methods:
            raise HarnessError("a sweep needs at least one method (--methods or 'methods' in the sweep file)")
        if not self.models or not self.ratios or not self.suites or not self.seeds:
            raise HarnessError("a sweep needs at least one model, ratio, suite and seed")
        bad = set(self.recovery) - {"none", "lora"}
        if bad or not self.recovery:
            raise HarnessError(f"recovery must be a list of none and/or lora, got {self.recovery!r}")
        self.ratios = [_number(r, float, "ratios", "0.5") for r in self.ratios]
        self.seeds = [_number(s, int, "seeds", "0") for s in self.seeds]

    def _check_types(self) -> None:
        """What a sweep file can hold, key by key (a scalar where a list is expected is one item)."""
        from harness.params import shown

        for key in ("models", "methods", "ratios", "suites", "seeds", "recovery"):
            value = getattr(self, key)
            if isinstance(value, (str, int, float, dict)) and not isinstance(value, bool):
                value = [value]
            if not isinstance(value, (list, tuple)):
                raise HarnessError(f"{key} must be a list, got {shown(value)}")
            setattr(self, key, list(value))
        for key in ("models", "suites", "recovery"):
            for item in getattr(self, key):
                if not isinstance(item, str) or not item.strip():
                    raise HarnessError(f"{key} must list names, got {shown(item)}")
        for key in ("suite_params", "lora", "calibration"):
            if not isinstance(getattr(self, key), dict):
                raise HarnessError(f"{key} must be a table of keys, got {shown(getattr(self, key))}")
        for suite, params in self.suite_params.items():
            if not isinstance(params, dict):
                raise HarnessError(f"suite_params.{suite} must be a table of parameters, got {shown(params)}")
        for key in ("device", "dtype"):
            if not isinstance(getattr(self, key), str):
                raise HarnessError(f"{key} must be a name, got {shown(getattr(self, key))}")
        if self.threads is not None and (isinstance(self.threads, bool) or not isinstance(self.threads, int)):
            raise HarnessError(f"threads must be an integer, got {shown(self.threads)}")

    @classmethod
    def load(cls, path: str | Path, **overrides) -> "Grid":
        """A sweep file (.yaml/.yml or .toml); keyword overrides replace its keys."""
        path = Path(path)
        if path.suffix not in (".toml", ".yaml", ".yml"):
            raise HarnessError(f"sweep file {path} must end in .yaml, .yml or .toml")
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise HarnessError(f"cannot read sweep file {path}: {exc.strerror}") from None
        except UnicodeDecodeError:
            raise HarnessError(f"sweep file {path} is not UTF-8 text") from None
        try:
            if path.suffix == ".toml":
                import tomllib

                data = tomllib.loads(text)
            elif path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text) or {}
            else:
                raise HarnessError(f"sweep file {path} must end in .yaml, .yml or .toml")
        except HarnessError:
            raise
        except Exception as exc:  # tomllib.TOMLDecodeError, yaml.YAMLError
            raise HarnessError(
                f"sweep file {path} is not valid {path.suffix[1:].upper()}: {str(exc).splitlines()[0]}"
            ) from None
        if not isinstance(data, dict):
            raise HarnessError(f"sweep file {path} must hold a table of keys (models, methods, ratios, suites, ...)")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(data) - known
        if unknown:
            raise HarnessError(
                f"unknown key {sorted(map(str, unknown))[0]!r} in sweep file {path}; known: {', '.join(sorted(known))}"
            )
        return cls(**{**data, **{k: v for k, v in overrides.items() if v is not None}})


@dataclass
class Task:
    """One pipeline run: a (model, method, seed, ratio) and every suite of the grid."""

    model: str
    method: MethodSpec
    seed: int
    ratio: float
    dense: bool  # also the dense model's cells (the first task of each model and seed that needs them)
    keys: list[RunKey]  # every cell it stores
    labels: dict[str, str]  # run key -> a readable cell name
    error: str | None = None  # a task that cannot even be keyed (bad parameter): its cells fail as they are

    @property
    def label(self) -> str:
        return f"{self.model} · {self.method.label} {self.ratio:g} · seed {self.seed}"


@dataclass
class SweepReport:
    total: int = 0  # cells in the grid
    done_before: int = 0  # complete in the store when the sweep started
    computed: int = 0  # cells this sweep completed
    failed: list[tuple[str, str]] = field(default_factory=list)  # (cell, error) recorded failed by this sweep
    status: dict[str, str] = field(default_factory=dict)  # run key -> done / failed / missing (dry run and after)
    labels: dict[str, str] = field(default_factory=dict)  # run key -> readable cell name


def _number(value, kind, key: str, example: str):
    """A sweep file's number (`ratios: [abc]` is a one-line error, not a traceback)."""
    from harness.params import shown

    try:
        if isinstance(value, bool):
            raise ValueError
        return kind(value)
    except (TypeError, ValueError):
        raise HarnessError(f"{key} must be numbers such as {example}; got {shown(value)}") from None


def _cell_label(key: RunKey) -> str:
    recovery = "" if key.recovery == "none" else f" +{key.recovery}"
    return f"{key.model} · {key.method} {key.ratio:g}{recovery} · {key.suite} · seed {key.seed}"


def expand(grid: Grid) -> list[Task]:
    """The grid's tasks with their cells' run keys (models are identified from their files, not loaded)."""
    from harness.calibration import CalibrationSpec
    from harness.compress import assign, check_ratios, identity, run_ratios
    from harness.registry import build_method
    from harness.loader import identify
    from harness.method import CALIBRATED
    from harness.pipeline import RunCells, suites_for
    from harness.recovery import LoraSpec

    check_ratios(grid.ratios)
    all_suites = suites_for(grid.suites, grid.suite_params)
    tasks: list[Task] = []
    dense_owner: set[tuple[str, int]] = set()
    for model in grid.models:
        _source, digest, family = identify(model)
        suites = [s for s in all_suites if s.applies_to(family)]
        if not suites:
            raise HarnessError(f"none of the suites {', '.join(grid.suites)} applies to {model} ({family})")
        for seed in grid.seeds:
            lora = LoraSpec(**{**grid.lora, "seed": seed}).key() if "lora" in grid.recovery else None
            dense_cells = RunCells(model, digest, family, "dense", {}, seed, {}, None)
            for spec in grid.methods:
                error, ratios = None, grid.ratios
                try:
                    selector = build_method(spec.name, spec.params, seed)
                    attn = build_method(spec.attn, spec.attn_params, seed) if spec.attn else None
                    assigned = assign(model, family, spec.name, selector, spec.attn, attn)
                    name, params = identity(assigned)
                    calibrated = any(sel.needs & CALIBRATED for _, sel in assigned)
                    calibration = CalibrationSpec(**{**grid.calibration, "seed": seed}).key() if calibrated else {}
                    ratios = run_ratios(assigned, grid.ratios)
                except HarnessError as exc:  # recorded as failed cells under the parameters as given
                    error = str(exc)
                    name, calibration = spec.label, {}
                    params = (
                        dict(spec.params) if spec.attn is None else {"linear": spec.params, "softmax": spec.attn_params}
                    )
                run = RunCells(model, digest, family, name, params, seed, calibration, lora)
                for ratio in ratios:
                    keys = [k for stage in run.stages for k, _ in run.cells(suites, ratio, recovery=stage)]
                    dense = (model, seed) not in dense_owner and error is None
                    if dense:
                        dense_owner.add((model, seed))
                        keys = [k for k, _ in dense_cells.cells(suites, 0.0, dense=True)] + keys
                    tasks.append(
                        Task(model, spec, seed, ratio, dense, keys, {k.digest: _cell_label(k) for k in keys}, error)
                    )
    return tasks


def _job(task: Task, grid: Grid, done: list[dict], progress) -> dict[str, Any]:
    """What a worker needs to run a task (plain data: it travels to Ray workers)."""
    return {
        "model": task.model,
        "method": asdict(task.method),
        "seed": task.seed,
        "ratio": task.ratio,
        "dense": task.dense,
        "suites": grid.suites,
        "suite_params": grid.suite_params,
        "calibration": grid.calibration,
        "lora": grid.lora if "lora" in grid.recovery else None,
        "device": grid.device,
        "dtype": grid.dtype,
        "threads": grid.threads,
        "done": done,
        "progress": progress,
    }


def execute(job: dict[str, Any]) -> dict[str, Any]:
    """Run one task in a scratch store; return its new cells as records and the error, if any.
    A module-level function of plain data in and out: Ray ships it to its workers as is."""
    from harness.calibration import CalibrationSpec
    from harness.pipeline import run
    from harness.recovery import LoraSpec
    from harness.store import ResultStore
    from harness.zoo.train import fixed_threads

    method = job["method"]
    error = None
    with tempfile.TemporaryDirectory(prefix="harness-cell-") as tmp:
        scratch = ResultStore(Path(tmp) / "cells.sqlite")
        scratch.put(job["done"])
        try:
            with fixed_threads(job["threads"]):
                run(
                    model=job["model"],
                    method=method["name"],
                    ratios=[job["ratio"]],
                    suites=job["suites"],
                    method_params=method["params"],
                    suite_params=job["suite_params"],
                    seed=job["seed"],
                    calibration=CalibrationSpec(**{**job["calibration"], "seed": job["seed"]}),
                    store=scratch.path,
                    device=job["device"],
                    dtype=job["dtype"],
                    dense=job["dense"],
                    progress=job["progress"] or False,
                    lora=LoraSpec(**{**job["lora"], "seed": job["seed"]}) if job["lora"] is not None else None,
                    attn_method=method["attn"],
                    attn_method_params=method["attn_params"],
                )
        except Exception as exc:  # the failed cell is in the scratch store; the sweep goes on
            error = f"{type(exc).__name__}: {exc}".splitlines()[0]
        seeded = {r["run"]["run_key"] for r in job["done"]}
        records = [r for r in scratch.records() if r["run"]["run_key"] not in seeded]
    return {"records": records, "error": error}


class _Driver:
    """Writes what tasks return into the store (the one writer), and keeps the report."""

    def __init__(self, store, report: SweepReport, bar):
        self.store, self.report, self.bar = store, report, bar

    def missing(self, task: Task) -> list[RunKey]:
        from harness.store import COMPLETE

        return [k for k in task.keys if self.store.status(k) != COMPLETE]

    def finish(self, task: Task, payload: dict[str, Any]) -> None:
        from harness.store import COMPLETE

        records = payload["records"]
        self.store.put(records)
        for record in records:
            run = record["run"]
            if run["status"] == COMPLETE:
                self.report.computed += 1
            else:
                self.report.failed.append((task.labels.get(run["run_key"], run["run_key"]), run["error"] or ""))
        if payload.get("error"):
            self.fail(task, payload["error"], skip={r["run"]["run_key"] for r in records})
        self.bar(len(task.keys))

    def fail(self, task: Task, error: str, skip: Iterable[str] = ()) -> None:
        """Cells of a task that never ran (it failed first, or its worker died): failed with the error."""
        skip = set(skip)
        for key in self.missing(task):
            if key.digest in skip:
                continue
            self.store.begin(key)
            self.store.fail(key, error)
            self.report.failed.append((task.labels[key.digest], error))


def status(grid: Grid, store: str | Path, tasks: list[Task] | None = None) -> SweepReport:
    """Which cells of the grid are done, failed or missing in the store (nothing runs);
    `tasks`: the grid already expanded (expanding hashes every model's weight files)."""
    from harness.store import COMPLETE, ResultStore

    tasks = expand(grid) if tasks is None else tasks
    report = SweepReport()
    reader = ResultStore(store, read_only=True) if Path(store).is_file() else None
    for task in tasks:
        if task.error is not None:  # the method or its parameters are refused: every cell would fail
            report.failed += [(task.labels[key.digest], task.error) for key in task.keys]
        for key in task.keys:
            state = reader.status(key) if reader is not None else None
            report.labels[key.digest] = task.labels[key.digest]
            report.status[key.digest] = "done" if state == COMPLETE else "failed" if state == "failed" else "missing"
    report.total = len(report.status)
    report.done_before = sum(s == "done" for s in report.status.values())
    return report


def sweep(
    grid: Grid | str | Path | None = None,
    *,
    store: str | Path = DEFAULT_STORE,
    executor: str = "local",
    address: str | None = None,
    max_retries: int = 2,
    progress: bool = True,
    **grid_fields,
) -> SweepReport:
    """Run every missing cell of the grid (a Grid, a sweep file, or Grid fields as keywords);
    see `harness sweep --help`. Returns what was done; the cells are in the store."""
    from harness.progress import bars
    from harness.store import ResultStore

    if executor not in EXECUTORS:
        raise HarnessError(f"unknown executor {executor!r}; use one of {', '.join(EXECUTORS)}")
    if grid is None:
        grid = Grid(**grid_fields)
    elif not isinstance(grid, Grid):
        grid = Grid.load(grid, **grid_fields)
    tasks = expand(grid)
    results = ResultStore(store)
    report = status(grid, store, tasks)
    todo = []
    with bars(progress) as display:
        driver = _Driver(results, report, display.task("sweep", sum(len(t.keys) for t in tasks)))
        for task in tasks:
            missing = driver.missing(task)
            if not missing:
                driver.bar(len(task.keys))
            elif task.error is not None:
                driver.fail(task, task.error)
                driver.bar(len(task.keys))
            else:
                todo.append(task)
        if executor == "local":
            _run_local(todo, grid, driver, display if progress else None)
        else:
            _run_ray(todo, grid, driver, address, max_retries)
    report.status = status(grid, store, tasks).status
    return report


def _done_records(driver: _Driver, task: Task) -> list[dict]:
    """The task's cells already complete in the store, to seed its scratch store (reused, not recomputed)."""
    from harness.store import COMPLETE

    return driver.store.records([k.digest for k in task.keys if driver.store.status(k) == COMPLETE])


def _run_local(tasks: Sequence[Task], grid: Grid, driver: _Driver, display) -> None:
    for task in tasks:
        driver.bar.describe(f"sweep: {task.label}")
        payload = execute(_job(task, grid, _done_records(driver, task), display))
        driver.finish(task, payload)


def _run_ray(
    tasks: Sequence[Task], grid: Grid, driver: _Driver, address: str | None, max_retries: int, worker=None
) -> None:
    """Each task a Ray task (`worker`, default `execute`) asking for one CPU, and one GPU when the
    sweep runs on CUDA; results come back to this process, which writes them as they arrive."""
    try:
        import ray
    except ImportError:
        raise HarnessError(
            "the ray executor needs Ray: pip install 'kc-harness[ray]' (or ray) on the driver and every node"
        ) from None
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False)
    gpus = (
        1
        if grid.device.startswith("cuda") or (grid.device == "auto" and ray.cluster_resources().get("GPU", 0) > 0)
        else 0
    )
    remote = ray.remote(worker or execute).options(
        num_cpus=1, num_gpus=gpus, max_retries=max_retries, retry_exceptions=False
    )
    pending = {remote.remote(_job(task, grid, _done_records(driver, task), None)): task for task in tasks}
    driver.bar.describe(f"sweep ({len(pending)} tasks on ray)")
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            task = pending.pop(ready[0])
            try:
                payload = ray.get(ready[0])
            except ray.exceptions.RayError as exc:  # the worker died (after its retries) or the task was lost
                driver.fail(task, f"{type(exc).__name__}: {str(exc).splitlines()[0]}")
                driver.bar(len(task.keys))
                continue
            driver.finish(task, payload)
    except BaseException:
        for ref in pending:
            ray.cancel(ref, force=True)
        raise


def describe(report: SweepReport) -> dict[str, int]:
    counts = {"done": 0, "failed": 0, "missing": 0}
    for state in report.status.values():
        counts[state] += 1
    return counts


__all__ = ["Grid", "MethodSpec", "SweepReport", "Task", "describe", "execute", "expand", "status", "sweep"]
