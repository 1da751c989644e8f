"""`harness`: the command line. Each command maps its flags onto one Python call."""

from __future__ import annotations

import functools
import inspect
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from typer.core import TyperGroup
from rich.console import Console
from rich.table import Table
from rich.text import Text

from harness.errors import HarnessError
from harness.store import DEFAULT_STORE

DEFAULT_MODEL = "qwen35-hybrid-retrieval-tiny"  # harness.loader.DEFAULT_MODEL (not imported here: that loads torch)


def _exception_types(name: str) -> tuple[type, ...]:
    """A click exception class as the installed typer raises it: typer >= 0.2x vendors click
    (`typer._click`), older ones use click itself; both are caught."""
    import importlib

    found = []
    for module in ("typer._click.exceptions", "click.exceptions", "typer.exceptions"):
        try:
            kind = getattr(importlib.import_module(module), name, None)
        except ImportError:
            continue
        if isinstance(kind, type):
            found.append(kind)
    return tuple(found)


USAGE_ERRORS, CLICK_ERRORS = _exception_types("UsageError"), _exception_types("ClickException")
NO_ARGS, ABORTS = _exception_types("NoArgsIsHelpError"), _exception_types("Abort")


class _OneLineErrors(TyperGroup):
    """Click's usage errors (a flag's value of the wrong type, an unknown option, a missing
    argument) as one line on stderr with exit 2, like the harness's own errors, instead of a usage
    panel."""

    def main(self, args=None, prog_name=None, complete_var=None, standalone_mode=True, **extra):
        if not standalone_mode:
            return super().main(args, prog_name, complete_var, standalone_mode, **extra)
        try:
            code = super().main(args, prog_name, complete_var, standalone_mode=False, **extra)
        except NO_ARGS:  # `harness` alone: the help, as click shows it
            return super().main(args, prog_name, complete_var, standalone_mode=True, **extra)
        except USAGE_ERRORS as exc:
            ctx = getattr(exc, "ctx", None)
            where = ctx.command_path if ctx is not None else "harness"
            typer.echo(f"error: {' '.join(exc.format_message().split())} (see `{where} --help`)", err=True)
            sys.exit(2)
        except ABORTS:
            typer.echo("Aborted!", err=True)
            sys.exit(1)
        except CLICK_ERRORS as exc:
            typer.echo(f"error: {' '.join(exc.format_message().split())}", err=True)
            sys.exit(exc.exit_code)
        sys.exit(code if isinstance(code, int) else 0)


app = typer.Typer(
    cls=_OneLineErrors,
    help="Key-channel compression of attention: compress a model with a registered method, "
    "evaluate it with registered suites, and keep every result in a local store.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)
zoo_app = typer.Typer(
    help="The embedded default models (tiny, trained offline on CPython's docstrings).", no_args_is_help=True
)
app.add_typer(zoo_app, name="zoo")


def _reader_left() -> None:
    """The reader stopped early (`harness list | head -3`): not an error, exit 0 quietly."""
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # the exit's flush would fail again
    sys.exit(0)


class _Console(Console):
    def on_broken_pipe(self) -> None:
        _reader_left()


# piped output (CI logs, files) gets a wide table instead of rich's 80-column default
out_console = _Console() if sys.stdout.isatty() else _Console(width=200)
STORE_HELP = "results store (SQLite file); artifacts go beside it"


@contextmanager
def user_errors() -> Iterator[None]:
    """Bad input: one line on stderr, exit code 2, no traceback."""
    try:
        yield
    except HarnessError as exc:
        # plain echo, not rich: the message must stay on one line whatever the terminal width
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(2) from None


def _csv(values: List[str]) -> list[str]:
    return [v.strip() for item in values for v in item.split(",") if v.strip()]


def _ratios(values: List[str]) -> list[float]:
    from harness.params import shown

    ratios = []
    for v in _csv(values):
        try:
            ratios.append(float(v))
        except ValueError:
            raise HarnessError(f"--ratio expects numbers such as 0.5 or 0.25,0.5; got {shown(v)}") from None
    if values and not ratios:  # `--ratio ""` would run nothing new and look like success
        raise HarnessError("--ratio is empty: give one or more numbers such as 0.5 or 0.25,0.5")
    return ratios


def _dotted(pairs: List[str], flag: str, what: str) -> dict[str, dict[str, str]]:
    """["ppl.limit=512"] -> {"ppl": {"limit": "512"}}."""
    from harness.params import parse_pairs

    out: dict[str, dict[str, str]] = {}
    for key, value in parse_pairs(pairs, flag=flag).items():
        name, dot, field = key.partition(".")
        if not dot or not field:
            raise HarnessError(f"{flag} expects {what}.key=value, got {key}={value}")
        out.setdefault(name, {})[field] = value
    return out


def _method_params(
    param: List[str], mask: Optional[Path], attn_method: Optional[str] = None, attn_param: List[str] = ()
) -> tuple[dict[str, str], dict[str, str]]:
    """(--method's parameters, --attn-method's); --mask goes to whichever of the two is leank."""
    from harness.params import parse_pairs

    values = parse_pairs(param, flag="--param")
    attn_values = parse_pairs(list(attn_param), flag="--attn-param")
    if attn_values and attn_method is None:
        raise HarnessError("--attn-param needs --attn-method")
    if mask is not None:
        (attn_values if attn_method == "leank" else values)["mask"] = str(mask)
    return values, attn_values


# options shared by `run` and `prune` (typer reads them as metadata, so one object serves both)
METHOD = typer.Option(..., "--method", "-m", help="registered method (see `harness list methods`)")
MODEL = typer.Option(None, "--model", help=f"zoo name, save_pretrained folder, or hub id [default: {DEFAULT_MODEL}]")
RATIO = typer.Option(
    ["0.5"], "--ratio", "-r", help="fraction of key channels removed, in [0, 1); repeat or comma-separate"
)
PARAM = typer.Option([], "--param", "-p", help="method parameter key=value (repeatable), e.g. -p f=2.0")
ATTN_METHOD = typer.Option(
    None,
    "--attn-method",
    help="hybrid models: method for the attention layers (--method then compresses the linear layers)",
)
ATTN_PARAM = typer.Option([], "--attn-param", help="--attn-method parameter key=value (repeatable)")
MASK = typer.Option(
    None,
    "--mask",
    help="a published LeanK mask (.pth) for --method leank: loaded, not trained; its kept fraction sets the ratio",
)
SEED = typer.Option(0, help="seed for calibration sampling and seeded methods")
CALIB_SAMPLES = typer.Option(16, help="calibration sequences")
CALIB_SEQ_LEN = typer.Option(256, help="tokens per calibration sequence")
CALIB_FILE = typer.Option(None, help="UTF-8 text file for calibration [default: the embedded corpus]")
CALIB_DATASET = typer.Option(
    None, help="Hugging Face dataset for calibration: name, name:config, or a save_to_disk folder"
)
CALIB_SPLIT = typer.Option("train", help="split of --calib-dataset")
CALIB_COLUMN = typer.Option("text", help="text column of --calib-dataset")
DEVICE = typer.Option("auto", help="auto, cpu, cuda or cuda:N")
DTYPE = typer.Option("float32", help="float32, bfloat16 or float16")
TRUST = typer.Option(False, help="allow custom model code from the checkpoint (off by default)")
QUIET = typer.Option(False, "--quiet", "-q", help="no progress bars")
# options shared by `show` and `export`
STORE = typer.Option(Path(DEFAULT_STORE), help=STORE_HELP)
ONLY_MODEL = typer.Option(None, help="only this model (as named in the run)")
ONLY_METHOD = typer.Option(None, help="only this method")
ONLY_SUITE = typer.Option(None, help="only this suite")
DETAIL = typer.Option(
    False,
    "--detail",
    help="the full table: every metric, breakdowns (per layer/head, per task/length) "
    "included, instead of the headline summary",
)


class Compression:
    """The options `run` and `prune` share (what to compress, with which method, on which
    calibration data, where), declared once in `_compression_options` and handed to the command
    as this one object."""

    def __init__(self, **values) -> None:
        self.__dict__.update(values)

    def method_params(self) -> tuple[dict[str, str], dict[str, str]]:
        return _method_params(self.param, self.mask, self.attn_method, self.attn_param)

    def plan_args(self) -> dict:
        """The keyword arguments `compress.plan` (and so `pipeline.run` and `compress.prune`) takes."""
        from harness.calibration import CalibrationSpec

        method_params, attn_params = self.method_params()
        return dict(
            method_params=method_params,
            attn_method=self.attn_method,
            attn_method_params=attn_params,
            seed=self.seed,
            device=self.device,
            dtype=self.dtype,
            trust_remote_code=self.trust_remote_code,
            calibration=CalibrationSpec(
                self.calib_samples,
                self.calib_seq_len,
                self.calib_file,
                self.seed,
                self.calib_dataset,
                self.calib_split,
                self.calib_column,
            ),
        )


def _compression_options(
    method: str = METHOD,
    model: Optional[str] = MODEL,
    ratio: List[str] = RATIO,
    param: List[str] = PARAM,
    attn_method: Optional[str] = ATTN_METHOD,
    attn_param: List[str] = ATTN_PARAM,
    mask: Optional[Path] = MASK,
    seed: int = SEED,
    calib_samples: int = CALIB_SAMPLES,
    calib_seq_len: int = CALIB_SEQ_LEN,
    calib_file: Optional[str] = CALIB_FILE,
    calib_dataset: Optional[str] = CALIB_DATASET,
    calib_split: str = CALIB_SPLIT,
    calib_column: str = CALIB_COLUMN,
    device: str = DEVICE,
    dtype: str = DTYPE,
    trust_remote_code: bool = TRUST,
    quiet: bool = QUIET,
) -> None:
    """The signature the options of `Compression` are read from (typer reads parameters)."""


def with_compression_options(command):
    """`command(c: Compression, **its own options)` as a typer command whose options are
    `_compression_options`' followed by its own."""
    shared = inspect.signature(_compression_options, eval_str=True).parameters
    own = [p for name, p in inspect.signature(command, eval_str=True).parameters.items() if name != "c"]

    @functools.wraps(command)
    def wrapper(**values):
        return command(Compression(**{name: values.pop(name) for name in shared}), **values)

    wrapper.__signature__ = inspect.Signature([*shared.values(), *own])
    wrapper.__annotations__ = {p.name: p.annotation for p in [*shared.values(), *own]}
    return wrapper


def print_results(rows, title: str, detail: bool) -> None:
    """The headline summary per model, or with `detail` the full table (every metric, breakdowns)."""
    from harness.report import LEGEND, rich_table, summary_tables

    if detail:
        out_console.print(rich_table(rows, title=title, detail=True))
        return
    out_console.print(Text(title, style="bold"))
    for table in summary_tables(rows):
        out_console.print(table)
    out_console.print(Text(LEGEND))


@app.command()
@with_compression_options
def run(
    c: Compression,
    suite: List[str] = typer.Option(
        ["all"], "--suite", "-s", help="suites to run, comma-separated, or 'all' (those that apply to the model)"
    ),
    suite_param: List[str] = typer.Option(
        [], "--suite-param", help="suite parameter suite.key=value, e.g. --suite-param ppl.limit=4096"
    ),
    store: Path = STORE,
    dense: bool = typer.Option(True, help="also evaluate the uncompressed model (the reference row)"),
    save: Optional[Path] = typer.Option(
        None, help="write each compressed model as a save_pretrained folder under this directory"
    ),
    force: bool = typer.Option(False, help="recompute cells already complete in the store"),
    finetune: str = typer.Option("none", help="recovery after pruning: none, or lora (peft; evaluated as extra rows)"),
    lora_steps: int = typer.Option(200, help="LoRA training steps"),
    lora_rank: int = typer.Option(8, help="LoRA rank"),
    lora_lr: float = typer.Option(1e-3, help="LoRA learning rate"),
    lora_targets: str = typer.Option("q_proj,k_proj,v_proj,o_proj", help="comma-separated module names LoRA adapts"),
    detail: bool = DETAIL,
) -> None:
    """Compress a model and evaluate it; print the headline results (the full table with --detail)."""
    from harness import registry

    with user_errors():  # names first: a typo is refused before torch and the models are imported
        for name in filter(None, (c.method, c.attn_method)):
            for part in name.split("+"):
                registry.require(registry.METHODS, part)
    from harness.pipeline import run as run_pipeline

    with user_errors():
        suite_params = _dotted(suite_param, "--suite-param", "suite")
        if finetune not in ("none", "lora"):
            raise HarnessError(f"--finetune must be none or lora, got {finetune!r}")
        lora = None
        if finetune == "lora":
            from harness.recovery import LoraSpec

            lora = LoraSpec(
                steps=lora_steps, rank=lora_rank, lr=lora_lr, seed=c.seed, targets=tuple(_csv([lora_targets]))
            )
        report = run_pipeline(
            model=c.model,
            method=c.method,
            ratios=_ratios(c.ratio),
            suites=_csv(suite),
            suite_params=suite_params,
            store=store,
            dense=dense,
            save=save,
            force=force,
            progress=not c.quiet,
            lora=lora,
            **c.plan_args(),
        )
    title = c.method if c.attn_method is None else f"{c.method} (linear) + {c.attn_method} (attention)"
    print_results(report.rows, f"{title} on {c.model or DEFAULT_MODEL}", detail)
    out_console.print(f"{report.computed} cells computed, {report.reused} reused from {store}")
    for failure in report.failed:
        typer.echo(f"failed cell: {failure}", err=True)
    if report.failed:  # stored as failed with their reason (`harness show` lists them); the others stand
        raise typer.Exit(1)
    for folder in report.saved:
        out_console.print(Text(f"saved {folder}"))


@app.command()
@with_compression_options
def prune(
    c: Compression,
    out: Path = typer.Option(
        ..., "--out", "-o", help="directory; one save_pretrained folder per ratio is written in it"
    ),
) -> None:
    """Compress a model and write plain checkpoints (loadable with fla/transformers), no evaluation."""
    from harness.compress import prune as prune_model

    with user_errors():
        folders = prune_model(c.model, c.method, _ratios(c.ratio), out, progress=not c.quiet, **c.plan_args())
    for folder in folders:
        out_console.print(Text(f"saved {folder}"))


@app.command()
def sweep(
    spec: Optional[Path] = typer.Argument(
        None, help="sweep file (.yaml, .yml or .toml); the flags below replace its keys"
    ),
    models: List[str] = typer.Option([], "--models", help=f"models, comma-separated [default: {DEFAULT_MODEL}]"),
    methods: List[str] = typer.Option(
        [], "--methods", help="methods, comma-separated; on hybrids a+b = a on the linear, b on the attention layers"
    ),
    ratios: List[str] = typer.Option(
        [], "--ratios", "-r", help="fractions of key channels removed, comma-separated [default: 0.5]"
    ),
    suite: List[str] = typer.Option([], "--suite", "-s", help="suites, comma-separated, or all [default: all]"),
    suite_param: List[str] = typer.Option([], "--suite-param", help="suite parameter suite.key=value (repeatable)"),
    param: List[str] = typer.Option(
        [], "--param", "-p", help="method parameter method.key=value (repeatable), e.g. -p drrqr.f=2.0"
    ),
    seeds: List[str] = typer.Option([], "--seeds", help="seeds, comma-separated [default: 0]"),
    finetune: List[str] = typer.Option([], "--finetune", help="none, lora, or none,lora (LoRA-recovered cells too)"),
    executor: str = typer.Option("local", help="local (this process, a task at a time) or ray"),
    address: Optional[str] = typer.Option(
        None, help="Ray cluster address (auto, ray://head:10001) [default: start a local Ray]"
    ),
    max_retries: int = typer.Option(2, help="ray: how often a task whose worker died is retried"),
    store: Path = STORE,
    device: str = DEVICE,
    dtype: str = DTYPE,
    dry_run: bool = typer.Option(
        False, "--dry-run", help="list the grid's cells as done, failed or missing; run nothing"
    ),
    quiet: bool = QUIET,
) -> None:
    """Run a grid of models x methods x ratios x suites x seeds; skip cells already in the store."""
    from harness import sweeps

    with user_errors():
        overrides: dict = {
            "models": _csv(models) or None,
            "ratios": _ratios(ratios) if ratios else None,
            "suites": _csv(suite) or None,
            "seeds": [int(x) for x in _csv(seeds)] or None,
            "recovery": _csv(finetune) or None,
            "device": device if device != "auto" else None,
            "dtype": dtype if dtype != "float32" else None,
        }
        if suite_param:
            overrides["suite_params"] = _dotted(suite_param, "--suite-param", "suite")
        params = _dotted(param, "--param", "method")
        if methods:
            overrides["methods"] = [
                {
                    "name": m,
                    "params": params.get(m.partition("+")[0], {}),
                    "attn_params": params.get(m.partition("+")[2], {}),
                }
                for m in _csv(methods)
            ]
        elif params:
            raise HarnessError("--param needs --methods (in a sweep file, give params in the method's table)")
        grid = (
            sweeps.Grid.load(spec, **overrides)
            if spec
            else sweeps.Grid(**{k: v for k, v in overrides.items() if v is not None})
        )
        if dry_run:
            report = sweeps.status(grid, store)
        else:
            report = sweeps.sweep(
                grid, store=store, executor=executor, address=address, max_retries=max_retries, progress=not quiet
            )
    counts = sweeps.describe(report)
    if dry_run:
        table = Table(title=f"sweep cells in {store}")
        table.add_column("cell")
        table.add_column("state")
        for key, state in report.status.items():
            table.add_row(
                Text(report.labels[key]), Text(state), style={"failed": "red", "missing": "yellow"}.get(state)
            )
        out_console.print(table)
    else:
        out_console.print(f"{report.computed} cells computed, {report.done_before} already in {store}")
    for cell, error in report.failed:
        out_console.print(Text(f"{'invalid' if dry_run else 'failed'}: {cell}: {error}"), style="red")
    out_console.print(
        f"{report.total} cells: {counts['done']} done, {counts['failed']} failed, {counts['missing']} missing"
    )
    if report.failed:  # a dry run that found refused methods or parameters (2), a sweep with failed cells (1)
        raise typer.Exit(2 if dry_run else 1)


@app.command()
def export(
    format: str = typer.Option("csv", "--format", "-f", help="csv, parquet, markdown or latex"),
    out: Optional[Path] = typer.Option(
        None, "--out", "-o", help="file to write [default: print to stdout; parquet needs a file]"
    ),
    store: Path = STORE,
    model: Optional[str] = ONLY_MODEL,
    method: Optional[str] = ONLY_METHOD,
    suite: Optional[str] = ONLY_SUITE,
    detail: bool = DETAIL,
) -> None:
    """Write the results table (complete cells) as CSV, Parquet, Markdown or LaTeX."""
    from harness.export import export as export_table

    with user_errors():
        text = export_table(store, format, out, detail=detail, model=model, method=method, suite=suite)
    if text is not None:
        typer.echo(text, nl=not text.endswith("\n"))
    else:
        out_console.print(Text(f"wrote {out}"))


@app.command()
def leaderboard(
    store: Path = STORE,
    port: int = typer.Option(8501, help="port to serve on"),
    host: str = typer.Option("127.0.0.1", help="address to bind (loopback by default)"),
) -> None:
    """Open the Streamlit leaderboard over a results store (read only)."""
    from harness.leaderboard import APP

    with user_errors():
        if not store.exists():
            raise HarnessError(f"no results store at {store}; run `harness run ...` first or pass --store")
    env = {**os.environ, "HARNESS_STORE": str(store.resolve())}
    command = [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.port",
        str(port),
        "--server.address",
        host,
        "--server.headless",
        "true",
        "--browser.gatherUsageStats",
        "false",
    ]
    sys.stdout.flush()
    sys.stderr.flush()
    # the server replaces this process: a signal to `harness leaderboard` reaches Streamlit itself,
    # so stopping it never leaves an orphaned server answering on the port
    os.execve(sys.executable, command, env)


@app.command("list")
def list_(what: str = typer.Argument("all", help="methods, suites, models or all")) -> None:
    """Show registered methods and suites (plugins included, broken ones with their error) and zoo models."""
    from harness import registry, zoo

    with user_errors():
        if what not in ("all", "methods", "suites", "models"):
            raise HarnessError(f"unknown listing {what!r}; use methods, suites, models or all")
    groups = [("methods", registry.METHODS), ("suites", registry.SUITES)]
    for title, group in groups:
        if what not in ("all", title):
            continue
        table = Table(title=title)
        for column in ("name", "status", "families", "parameters", "reference", "package"):
            table.add_column(column)
        for entry in registry.entries(group):
            card = registry.describe(entry)
            listing = ", ".join(f"{n}={d!r}" for n, _t, d in card["parameters"])
            if entry.ok:
                cells = (
                    entry.name,
                    card["status"],
                    ", ".join(card["families"]),
                    listing,
                    card["reference"],
                    entry.distribution,
                )
            else:
                cells = (entry.name, card["status"], "", "", entry.target, entry.distribution)
            table.add_row(*(Text(str(c)) for c in cells), style=None if entry.ok else "red")
        out_console.print(table)
    if what in ("all", "models"):
        table = Table(title="zoo models (use with --model NAME)")
        for column in ("name", "family", "weights", "heldout ppl", "unigram ppl"):
            table.add_column(column)
        for name in zoo.list_models():
            info = zoo.manifest(name)
            table.add_row(
                name,
                zoo.family_of(name),
                "shipped" if info else "not built",
                f"{info['dense_ppl']:.2f}" if (info or {}).get("dense_ppl") else "",
                f"{info['unigram_ppl']:.2f}" if (info or {}).get("unigram_ppl") else "",
            )
        out_console.print(table)


@app.command()
def show(
    store: Path = STORE,
    model: Optional[str] = ONLY_MODEL,
    method: Optional[str] = ONLY_METHOD,
    suite: Optional[str] = ONLY_SUITE,
    detail: bool = DETAIL,
) -> None:
    """Print the results in the store: the headline summary, or the full table with --detail (and
    any failed or incomplete cells)."""
    from harness.store import COMPLETE, ResultStore

    with user_errors():
        if not store.exists():
            raise HarnessError(f"no results store at {store}; run `harness run ...` first or pass --store")
        rows = ResultStore(store, read_only=True).table(model=model, method=method, suite=suite)
    complete = [r for r in rows if r["status"] == COMPLETE]
    print_results(complete, str(store), detail)
    other = {r["run_key"]: r for r in rows if r["status"] != COMPLETE}
    if other:
        table = Table(title="incomplete or failed cells")
        for column in ("model", "method", "ratio", "suite", "status", "error"):
            table.add_column(column)
        for r in other.values():
            table.add_row(*(Text(str(r[c] or "")) for c in ("model", "method", "ratio", "suite", "status", "error")))
        out_console.print(table)


@app.command()
def bench(
    out: Path = typer.Option(
        Path("harness-results/bench"),
        "--out",
        "-o",
        help="directory for benchmarks.md, benchmarks.json and bench.log (timestamped milestones)",
    ),
    only: List[str] = typer.Option(
        [],
        "--only",
        help="tables to run, comma-separated: pruned, linear, prefill, e2e-llama, capacity, e2e-deltanet, e2e-gated-deltanet, e2e-qwen35 (default: all; with --tune: none)",
    ),
    mask: Optional[Path] = typer.Option(
        None,
        "--mask",
        help="LeanK mask for the Llama-3.1-8B rows (default: $HARNESS_LEANK_MASK, "
        "else a synthetic mask with the published per-head counts)",
    ),
    quick: bool = typer.Option(
        False,
        "--quick",
        help="small sizes (a one-minute GPU smoke test); without a GPU, the end-to-end "
        "table on the tiny zoo models and the GPU tables skipped",
    ),
    tune: bool = typer.Option(
        False,
        "--tune",
        help="first sweep the decode kernels' launch settings on this GPU and "
        "cache the winners per shape class (then only the --only tables run)",
    ),
    sweep: List[str] = typer.Option(
        [],
        "--sweep",
        help="with --tune, the sweeps to run, comma-separated: pruned (Llama-shaped heads), "
        "pruned-wide (256-wide heads), linear (default: all)",
    ),
    quiet: bool = QUIET,
) -> None:
    """Run the GPU speed tables (docs/benchmarks.md) and write them as markdown and JSON."""
    import torch

    from harness.bench import GPU_ONLY, TABLES, TITLES, Table, run_table
    from harness.bench.masks import default_mask_path
    from harness.bench.pruned_decode import SWEEPS
    from harness.bench.report import write
    from harness.progress import bars

    with user_errors():
        names = _csv(only) or ([] if tune else list(TABLES))
        unknown = [n for n in names if n not in TABLES]
        if unknown:
            raise HarnessError(f"--only: unknown table {unknown[0]!r}; tables: {', '.join(TABLES)}")
        sweeps = _csv(sweep) or list(SWEEPS)
        unknown = [n for n in sweeps if n not in SWEEPS]
        if unknown:
            raise HarnessError(f"--sweep: unknown sweep {unknown[0]!r}; sweeps: {', '.join(SWEEPS)}")
        if sweep and not tune:
            raise HarnessError("--sweep picks what --tune sweeps; add --tune")
        if not torch.cuda.is_available() and (tune or not quick):
            raise HarnessError(
                "harness bench times GPU kernels and models but CUDA is not available; "
                "--quick runs the end-to-end table on the tiny zoo models on CPU"
            )
        mask_path = default_mask_path(mask)
        if mask_path is not None:
            from harness.leank_mask import load_mask

            load_mask(mask_path)  # a bad --mask or $HARNESS_LEANK_MASK fails now, not after the other tables
        command = [
            "harness",
            "bench",
            "--out",
            str(out),
            *(["--only", ",".join(names)] if only else []),
            *(["--mask", str(mask)] if mask is not None else []),
            *(["--quick"] if quick else []),
            *(["--tune"] if tune else []),
            *(["--sweep", ",".join(sweeps)] if sweep else []),
        ]
        tables = []
        with bars(not quiet) as bar, bench_log(out / "bench.log") as log:
            advance = bar.task("bench tables", len(names) + tune)
            log.info("%s", " ".join(command))
            if tune:
                from harness.bench.pruned_decode import tune_table

                tables.append(tune_table(mask_path, quick=quick, bars=bar, sweeps=sweeps))
                text = write(out, tables, " ".join(command))
                advance()
            for name in [n for n in TABLES if n in names]:  # the registry's order
                if name in GPU_ONLY and not torch.cuda.is_available():
                    tables.append(
                        Table(
                            title=TITLES[name],
                            columns=[],
                            name=name,
                            skipped="needs a CUDA GPU (op-level Triton kernels); this machine has none",
                        )
                    )
                else:
                    log.info("table %s", name)
                    tables.append(run_table(name, quick=quick, mask_path=mask_path, bars=bar))
                text = write(out, tables, " ".join(command))  # after every table: a cut-off run keeps what finished
                log.info("table %s written", name)
                advance()
    typer.echo(text)
    out_console.print(Text(f"wrote {out / 'benchmarks.md'}, {out / 'benchmarks.json'} and {out / 'bench.log'}"))


@contextmanager
def bench_log(path: Path) -> Iterator:
    """The "harness.bench" logger, writing timestamped milestones to `path` while the block runs."""
    import logging

    from harness.bench import log

    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path, mode="w", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    level = log.level
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    try:
        yield log
    finally:
        log.removeHandler(handler)
        log.setLevel(level)
        handler.close()


@zoo_app.command("build")
def zoo_build(
    name: str = typer.Argument(..., help="zoo model name (see `harness zoo list`)"),
    steps: Optional[int] = typer.Option(None, help="training steps [default: the zoo's setting]"),
    seed: int = typer.Option(0, help="training seed"),
    out_dir: Optional[Path] = typer.Option(None, "--out", help="output folder [default: the shipped weights folder]"),
) -> None:
    """Train a zoo model from scratch on the embedded corpus (deterministic under --seed)."""
    from harness import zoo

    with user_errors():
        if name not in zoo.list_models():
            raise HarnessError(f"unknown zoo model {name!r}; zoo models: {', '.join(zoo.list_models())}")
        kwargs = {"steps": steps} if steps is not None else {}
        path = zoo.build(name, out_dir=out_dir, seed=seed, progress=True, **kwargs)
    out_console.print(Text(f"built {name} -> {path}"))


@zoo_app.command("list")
def zoo_list() -> None:
    """List zoo models and whether their weights are present."""
    list_("models")


# warnings about library internals the user cannot act on (deprecations inside transformers, fla,
# peft, lm-eval, torch); the command line hides them, the Python API leaves warnings alone
QUIET_WARNINGS = r"(transformers|fla|peft|lm_eval|torch|datasets)(\.|$)"


def quiet_libraries() -> None:
    import warnings

    for category in (FutureWarning, DeprecationWarning):
        warnings.filterwarnings("ignore", category=category, module=QUIET_WARNINGS)
    import logging

    logging.getLogger("transformers").setLevel(logging.ERROR)  # e.g. "falling back to its reference PyTorch ..."


def main() -> None:
    quiet_libraries()
    try:
        app()
    except BrokenPipeError:  # a plain echo's write
        _reader_left()
    except SystemExit as exc:
        # click's standalone mode (the help of a bare `harness`) turns a broken pipe into exit 1
        # after wrapping stdout in PacifyFlushWrapper: that wrapper tells it from a real failure
        if exc.code == 1 and type(sys.stdout).__name__ == "PacifyFlushWrapper":
            sys.exit(0)
        raise


if __name__ == "__main__":
    main()
