"""End to end: decode tokens/s, prefill tokens/s, cache bytes and peak memory of a dense model and
its compressed twin, measured in the same run, interleaved per shape
(`harness.suites.speed.SpeedSuite.measure`: the speed suite's measurement, reused).

On a GPU (bf16, random weights: speed and memory do not depend on the weight values):
- Llama-3.1-8B config: dense through stock `generate` (transformers' DynamicCache: what a user
  gets without this harness), dense through the static decode loop (`harness.graph_decode`: a
  static K/V cache, every step replayed from a CUDA graph; the fair twin) and LeanK-masked through
  the same loop (the published mask, or a synthetic one, applied by the softmax family adapter: a
  static pruned K cache; the prompt attends with all channels, LeanK's deployment);
- DeltaNet-1.3B config: dense through stock `generate`, dense and 50% pruned (d_k 128 -> 64, sliced
  by the fla family adapter) through the static decode loop (the model's own conv and recurrent
  states allocated once for the batch, updated in place by a replayed step).
The variants of one model share its weight tensors (a deep copy that reuses every parameter;
slicing replaces only the pruned q/k projections), so one copy of the weights is resident and
each variant's peak memory is those weights plus its own cache and activations; a static
variant's cache is freed after its measurement.

With `quick` on CPU, the zoo's llama-tiny (dense vs a random 0.5 mask) and deltanet-tiny (dense vs
50% pruned) stand in, to check the path (the static loop runs eagerly there); peak memory is
CUDA-only.

Memory plan (H200, 139 GB; one model resident at a time, its weights once):
- Llama: weights 16.1 GB. Dense KV is 128 KiB a token (32 layers x 8 KV heads x 128 x K,V x bf16):
  8 x 32k is 34.4 GB, 52 x 4k 27.9 GB (the LeanK cache about 0.57 of it). Stock `generate`
  prefills the whole batch in one forward (262,144 tokens: about 25 GB of MLP activations in
  flight); the static loop prefills rows of one length, at most 32,768 tokens per forward, each
  layer writing its keys into the cache before the next runs.
- DeltaNet: weights 2.7 GB (+0.2 GB of sliced q/k projections); fp32 state 25 MB a sequence, 1.6
  GB at batch 64; a 64 x 2k prefill adds about 5 GB.
"""

from __future__ import annotations

import contextlib
import copy
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch

from harness.bench import Table, log

WINDOW = {"sink": 16, "recent": 64, "full_prefill": True}  # LeanK's deployment: the prompt attends fully
# (batch, context) per model; "full" is sized for a 139 GB H200 (the memory plan above)
SHAPES = {
    "full": {
        "llama": ((8, 32768), (52, 4096)),
        "deltanet": ((64, 2048),),
        "gated-deltanet": ((64, 2048),),
        "qwen35": ((64, 2048),),
    },
    "quick": {
        "llama": ((2, 1024),),
        "deltanet": ((8, 512),),
        "gated-deltanet": ((8, 512),),
        "qwen35": ((8, 512),),
    },  # a GPU smoke test
    # zoo models; 128 > sink + recent: a real middle
    "cpu": {"llama": ((2, 128),), "deltanet": ((2, 128),), "gated-deltanet": ((2, 128),), "qwen35": ((2, 128),)},
}


@dataclass
class Variant:
    model: torch.nn.Module
    twin: str | None = None  # the dense variant run the same way (same cache kind, same decode kernel)
    env: dict[str, str] = field(default_factory=dict)  # environment while it runs
    engine: str = "generate"  # the speed suite's engine: generate, or static (the CUDA-graph loop)


@dataclass
class Case:
    """One model and its variants, all sharing one set of weights; the first variant is the stock dense."""

    model: str
    variants: dict[str, Variant]
    shapes: tuple[tuple[int, int], ...]  # (batch, context)
    notes: list[str] = field(default_factory=list)
    copy_gbps: float | None = None  # device-to-device copy (read + write) measured in the same run (CUDA)


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy whose parameters are `model`'s own tensors (no second copy of the weights)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


def weight_read_bytes(model) -> int:
    """Bytes of weights a decode step reads: every parameter but the input embedding table (a
    step reads one row of it per sequence), unless the output projection shares it."""
    embed = model.get_input_embeddings().weight
    tied = model.get_output_embeddings() is not None and model.get_output_embeddings().weight is embed
    return sum(p.numel() * p.element_size() for p in model.parameters() if tied or p is not embed)


def unique_bytes(models) -> int:
    seen = {p.data_ptr(): p.numel() * p.element_size() for m in models for p in m.parameters()}
    return sum(seen.values())


def layer_shape(model) -> tuple[int, int, int]:
    """(layers, KV heads, head_dim) of a softmax model's attention."""
    from harness.families import adapter_for

    geometry = adapter_for(model).geometry(model)
    heads, head_dim, _ = geometry[min(geometry)]
    return len(geometry), heads, head_dim


def base_model(device: str, zoo_name: str, shape_name: str):
    if device == "cpu":
        from harness.loader import load_model

        return load_model(zoo_name, device="cpu").model
    from harness.model_shapes import random_model

    return random_model(shape_name, device, torch.bfloat16)


def llama_case(device: str, mask_path, shapes) -> Case:
    from harness.bench.masks import leank_mask, random_mask
    from harness.families import adapter_for
    from harness.leank_mask import mask_selection

    dense = base_model(device, "llama-tiny", "llama-3.1-8b")
    if device == "cpu":
        mask, kind = random_mask(*layer_shape(dense)), "random"
        source = "random, half of each head's channels (the zoo stand-in)"
    else:
        mask, source, synthetic = leank_mask(mask_path, layer_shape(dense))
        kind = "LeanK SYNTHETIC" if synthetic else "LeanK"
    adapter = adapter_for(dense)
    masked = shared_copy(dense)
    adapter.apply(masked, mask_selection(mask, adapter.family, "leank", {"cache": dict(WINDOW)}))
    loop = "static graph" if device == "cuda" else "static loop"
    variants = {
        "dense": Variant(dense),
        f"dense, {loop}": Variant(dense, engine="static"),
        f"{kind} mask (kept {float(mask.mean()):.4g}), {loop}": Variant(masked, twin=f"dense, {loop}", engine="static"),
    }
    return Case(
        "llama-tiny (zoo)" if device == "cpu" else "Llama-3.1-8B config",
        variants,
        shapes,
        [
            f"mask: {source}.",
            f"LeanK window: sink {WINDOW['sink']} + recent {WINDOW['recent']} tokens keep "
            "all channels; the prompt attends with all channels (LeanK's deployment), decode steps read the "
            'pruned cache. "dense" is stock `generate`; the static variants run `harness.graph_decode` (a '
            'static cache, each decode step replayed from a CUDA graph); the LeanK variant\'s twin ("vs twin") '
            "is the dense model through the same loop (a static K/V cache, the same attention kernel with every "
            "channel kept).",
        ],
    )


# linear and hybrid models: key -> (zoo stand-in on CPU, published geometry on a GPU, label)
LINEAR_MODELS = {
    "deltanet": ("deltanet-tiny", "deltanet-1.3b", "DeltaNet-1.3B config"),
    "gated-deltanet": ("gated-deltanet-tiny", "gated-deltanet-1.3b", "Gated DeltaNet-1.3B config"),
    "qwen35": ("qwen35-hybrid-tiny", "qwen3.5-0.8b", "Qwen3.5-0.8B geometry"),
}


def first_half(geometry: dict, family: str, meta: dict | None = None):
    """A selection keeping channels 0 .. d/2 - 1 of every head of every layer of `geometry`."""
    from harness.selection import ChannelSelection, LayerSelection

    layers = {
        i: LayerSelection(d, dv, tuple(tuple(range(d // 2)) for _ in range(h))) for i, (h, d, dv) in geometry.items()
    }
    return ChannelSelection(family, layers, "first-half", 0.5, meta=meta or {})


def linear_case(device: str, shapes, kind: str = "deltanet") -> Case:
    """A linear (or hybrid) model dense through stock `generate` and through the static loop, and
    with half of its key channels pruned through the same loop."""
    from harness import graph_decode
    from harness.families import adapter_for
    from harness.method import ATTENTION_PART

    zoo, shape, name = LINEAR_MODELS[kind]
    dense = base_model(device, zoo, shape)
    adapter = adapter_for(dense)
    pruned = shared_copy(dense)
    notes = ["channels 0 to d_k/2 - 1 of every head kept (which ones does not change the speed)."]
    if kind == "qwen35":
        linear, attention = adapter.part("linear"), adapter.part("softmax")
        geometry = linear.geometry(dense)
        both = adapter.combine(
            dense,
            first_half(geometry, linear.family),
            first_half(attention.geometry(dense), ATTENTION_PART, {"cache": dict(WINDOW)}),
        )
        adapter.apply(pruned, both)
        notes.append(
            f"Its attention layers keep half of each KV head's channels in a static pruned K cache "
            f"(sink {WINDOW['sink']} + recent {WINDOW['recent']} full, the prompt attending fully)."
        )
    else:
        geometry = adapter.geometry(dense)
        adapter.apply(pruned, first_half(geometry, adapter.family))
    d = next(iter(geometry.values()))[1]
    notes.append(
        '"dense" is stock `generate` (fla\'s layers decode through our delta-rule step, the default); '
        "the static variants run `harness.graph_decode` (conv and recurrent states allocated once for the "
        "batch, each decode step replayed from a CUDA graph); the pruned variant's twin is the dense model "
        "through the same loop."
    )
    loop = "static graph" if device == "cuda" else "static loop"
    variants = {
        "dense": Variant(dense),
        f"dense, {loop}": Variant(dense, engine="static"),
        f"pruned (d_k {d} -> {d // 2}), {loop}": Variant(pruned, twin=f"dense, {loop}", engine="static"),
    }
    if device == "cuda":  # what grouping the sibling projections into one GEMM each gives (only a graph groups them)
        off = {graph_decode.SHARED_PROJECTIONS_ENV: "off"}
        variants[f"dense, {loop}, a GEMM per projection"] = Variant(dense, env=off, engine="static")
        notes.append(
            "The static variants run the sibling projections that read one tensor (q/k/v/beta, gate/up) "
            "as one GEMM each (harness.shared_projections); the last variant runs one GEMM per projection."
        )
    return Case(f"{zoo} (zoo)" if device == "cpu" else name, variants, shapes, notes)


@contextlib.contextmanager
def environ(values: dict[str, str]):
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


TOP_KERNELS = 10  # the kernels by GPU time per step the log lists for each static row


def measure_case(case: Case, suite, bars, device: str) -> list[dict[str, Any]]:
    from harness.bench.timing import static_busy

    vocab = next(iter(case.variants.values())).model.config.vocab_size
    advance = bars.task(case.model, len(case.shapes) * len(case.variants)) if bars is not None else (lambda: None)
    rows = []
    for batch, context in case.shapes:
        # token ids above the special ones (0-2: pad, bos, eos): random weights, so any text will do
        prompt = torch.randint(
            3, vocab, (batch, context), generator=torch.Generator().manual_seed(batch * 7919 + context)
        )
        found = {}
        for label, variant in case.variants.items():  # interleaved: every variant at this shape, then the next
            start = time.perf_counter()
            try:
                with environ(variant.env):
                    found[label] = suite.measure(variant.model, prompt, engine=variant.engine)
                    if variant.engine == "static" and device == "cuda":  # a separate, profiled run
                        found[label]["busy"] = static_busy(variant.model, prompt.to(device), top=TOP_KERNELS)
            except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
                found[label] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"}
            log.info(
                "%s | %s | %d x %d: %s (%.1f s)",
                case.model,
                label,
                batch,
                context,
                summary(found[label], batch, context),
                time.perf_counter() - start,
            )
            for name, calls, us in found[label].get("busy", {}).get("top_gpu", []):
                log.info("    %9.1f us/step  x%5.1f  %s", us, calls, name[:100])
            if device == "cuda":
                torch.cuda.empty_cache()
            advance()
        rows += shape_rows(case, batch, context, found)
    return rows


def summary(found: dict, batch: int, context: int) -> str:
    """One measurement in a log line."""
    if "error" in found:
        return found["error"]
    peak = f", peak {found['peak_memory'] / 1e9:.2f} GB" if "peak_memory" in found else ""
    share = found.get("busy", {}).get("busy_share")
    busy = f", GPU busy {share:.0%} of a step" if share is not None else ""
    return (
        f"prefill {batch * context / found['prefill']['median']:,.0f} tokens/s, decode "
        f"{found['decode']['median'] * 1e3:.2f} ms/token, cache {found['cache_bytes'] / 1e9:.4g} GB{peak}{busy}"
    )


def shape_rows(case: Case, batch: int, context: int, found: dict[str, dict]) -> list[dict[str, Any]]:
    stock = found[next(iter(case.variants))]
    rows = []
    for label, r in found.items():
        row = {
            "model": case.model,
            "variant": label,
            "batch": batch,
            "context": context,
            "shape": f"{batch} x {context}",
            "engine": case.variants[label].engine,
            **case.variants[label].env,
        }
        if "error" in r:
            rows.append({**row, "error": r["error"]})
            continue
        decode_s = r["decode"]["median"]
        row.update(
            {
                "prefill_tokens_per_s": batch * context / r["prefill"]["median"],
                "decode_ms_per_token": decode_s * 1e3,
                "decode_tokens_per_s": batch / decode_s,
                "cache_bytes": r["cache_bytes"],
                "cache_gb": r["cache_bytes"] / 1e9,
                "peak_memory_bytes": r.get("peak_memory"),
                "peak_gb": r["peak_memory"] / 1e9 if "peak_memory" in r else None,
                "prefill": r["prefill"],
                "decode": r["decode"],
            }
        )
        if "busy" in r:
            row["gpu_busy"] = r["busy"]["busy_share"]
        if case.copy_gbps:  # the bandwidth limit: weights + cache read per step at copy speed
            read = weight_read_bytes(case.variants[label].model) + r["cache_read_bytes"]
            limit_s = read / (case.copy_gbps * 1e9)
            row.update({"read_gb": read / 1e9, "limit_ms": limit_s * 1e3, "of_limit": limit_s / decode_s})
        if r is not stock and "decode" in stock:
            row["decode_vs_dense"] = stock["decode"]["median"] / decode_s
            row["cache_vs_dense"] = r["cache_bytes"] / stock["cache_bytes"]
        twin = found.get(case.variants[label].twin or "", {})
        if "decode" in twin:
            row["decode_vs_twin"] = twin["decode"]["median"] / decode_s
            row["twin"] = case.variants[label].twin
        rows.append(row)
    return rows


def twin_limits(rows: list[dict[str, Any]]) -> list[str]:
    """A note per compressed row with a twin: the speedup its bytes allow (twin's bytes read per
    step / its own) and the speedup measured."""
    by_key = {(r["model"], r["shape"], r["variant"]): r for r in rows}
    out = []
    for r in rows:
        twin = by_key.get((r["model"], r["shape"], r.get("twin")))
        if twin is None or "read_gb" not in r or "read_gb" not in twin:
            continue
        out.append(
            f"{r['model']}, {r['shape']}: {r['variant']} vs {twin['variant']}: the bytes read allow "
            f"{twin['read_gb']:.1f} / {r['read_gb']:.1f} GB = {twin['read_gb'] / r['read_gb']:.2f}x; measured "
            f"{r['decode_vs_twin']:.2f}x ({r['decode_vs_twin'] / (twin['read_gb'] / r['read_gb']):.0%} of it)."
        )
    return out


def run_llama(quick: bool = False, mask_path=None, bars=None) -> Table:
    """Llama-3.1-8B config: dense (stock generate, static loop), LeanK-masked (static loop)."""
    return run(quick, mask_path, bars, models=("llama",))


def run_deltanet(quick: bool = False, bars=None) -> Table:
    """DeltaNet-1.3B config: dense (stock generate, static loop) vs 50% pruned (static loop)."""
    return run(quick, None, bars, models=("deltanet",))


def run_gated_deltanet(quick: bool = False, bars=None) -> Table:
    """Gated DeltaNet-1.3B config: the same rows as DeltaNet's."""
    return run(quick, None, bars, models=("gated-deltanet",))


def run_qwen35(quick: bool = False, bars=None) -> Table:
    """Qwen3.5-0.8B geometry (Gated DeltaNet + attention layers): the same rows."""
    return run(quick, None, bars, models=("qwen35",))


def run(quick: bool = False, mask_path=None, bars=None, models=("llama", "deltanet")) -> Table:
    """The end-to-end rows of `models` (one table each in `harness bench`, so that each fits one
    10-minute GPU command)."""
    from harness import registry

    speed_suite = registry.get_suite("speed")  # the speed suite's measurement (core reaches suites by entry point)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not quick:
        from harness.errors import HarnessError

        raise HarnessError(
            "the end-to-end table needs a CUDA GPU (Llama-3.1-8B and DeltaNet-1.3B configs); "
            "--quick runs it on the tiny zoo models on CPU"
        )
    size = "cpu" if device == "cpu" else ("quick" if quick else "full")
    # no warm-up run: a static variant's kernels compile and its step is captured when its decoder
    # is built, before anything is timed; the median of 3 runs leaves out a first run's one-time costs
    suite = speed_suite(new_tokens={"full": 32, "quick": 8, "cpu": 4}[size], warmup=0, repeats=3)
    cases = {
        "llama": lambda: llama_case(device, mask_path, SHAPES[size]["llama"]),
        **{kind: (lambda kind=kind: linear_case(device, SHAPES[size][kind], kind)) for kind in LINEAR_MODELS},
    }
    builders = [cases[m] for m in models]
    rows, notes = [], []
    copy = None
    if device == "cuda":
        from harness.bench.timing import copy_gbps

        copy = copy_gbps(1 << 30)
        notes.append(
            f'Copy bandwidth (1 GiB device to device, read + write, this run): {copy:,.0f} GB/s. "limit ms": '
            "bytes a decode step must read (weights but the input embedding table, plus the cache at the "
            'context + half the new tokens) at that bandwidth; "of limit": limit / measured.'
        )
    for build in builders:  # one model (and its variants) resident at a time
        torch.manual_seed(0)
        start = time.perf_counter()
        case = build()
        log.info(
            "%s: built with variants %s (%.1f s)", case.model, ", ".join(case.variants), time.perf_counter() - start
        )
        if device == "cuda":
            models = {id(v.model): v.model for v in case.variants.values()}.values()
            notes.append(
                f"{case.model}: {unique_bytes(models) / 1e9:.2f} GB of weights shared by its variants; "
                f"{torch.cuda.memory_allocated() / 1e9:.2f} GB allocated before its runs."
            )
        notes += [f"{case.model}: {n}" for n in case.notes]
        case.copy_gbps = copy
        rows += measure_case(case, suite, bars, device)
        del case
        if device == "cuda":
            torch.cuda.empty_cache()
    notes = [
        f"Random weights ({'bf16' if device == 'cuda' else 'float32'}): speed and memory do not depend on the weight "
        f"values. Each row: `SpeedSuite.measure` (warm-up {suite.warmup}, median of {suite.repeats} runs of "
        f"{suite.new_tokens} new tokens through the row's engine: `generate`, or the static loop; decode: the time "
        "between consecutive tokens; prefill: the prompt's forward into the model's own cache, to the first token). "
        "At each shape the variants of a model run one after another.",
        '"vs dense": decode speedup over the model\'s first (stock) dense row; "vs twin": over the dense row run the '
        "same way (same cache kind or decode kernel); cache / dense: cache bytes over the first row's.",
        "Peak memory: the most allocated during the timed calls (`torch.cuda.max_memory_allocated`): the resident "
        "weights (shared: counted once) plus that variant's cache and activations."
        if device == "cuda"
        else "Peak memory is measured on CUDA only.",
        *notes,
    ]
    columns = [
        "model",
        "variant",
        "engine",
        "shape",
        "prefill_tokens_per_s",
        "decode_ms_per_token",
        "decode_tokens_per_s",
        "cache_gb",
        "peak_gb",
        "decode_vs_dense",
        "decode_vs_twin",
        "cache_vs_dense",
    ]
    if copy:
        columns[8:8] = ["read_gb", "limit_ms", "of_limit"]
        columns.insert(columns.index("decode_tokens_per_s"), "gpu_busy")
        notes.append(
            '"GPU busy": static rows only, a separate run of 8 decode steps under torch.profiler: the sum of '
            "the GPU's kernel times over the wall time (a host-bound loop leaves the GPU idle between launches)."
        )
        notes += twin_limits(rows)
    if any("error" in r for r in rows):
        columns.append("error")
        notes.append("Rows with an error failed (the message is the exception's first line); the others stand.")
    return Table(
        title="End to end: dense vs compressed models, same run"
        + (f" ({', '.join(models)})" if len(models) < 2 else ""),
        columns=columns,
        rows=rows,
        notes=notes,
        labels={
            "shape": "batch x context",
            "prefill_tokens_per_s": "prefill tokens/s",
            "read_gb": "read GB/step",
            "limit_ms": "limit ms",
            "of_limit": "of limit",
            "gpu_busy": "GPU busy",
            "decode_ms_per_token": "decode ms/token",
            "decode_tokens_per_s": "decode tokens/s",
            "cache_gb": "cache GB",
            "peak_gb": "peak GB",
            "decode_vs_dense": "vs dense",
            "decode_vs_twin": "vs twin",
            "cache_vs_dense": "cache / dense",
        },
        formats={
            "gpu_busy": "{:.0%}",
            "read_gb": "{:.2f}",
            "limit_ms": "{:.2f}",
            "of_limit": "{:.0%}",
            "prefill_tokens_per_s": "{:,.0f}",
            "decode_ms_per_token": "{:.2f}",
            "decode_tokens_per_s": "{:,.0f}",
            "cache_gb": "{:.4g}",
            "peak_gb": "{:.2f}",
            "decode_vs_dense": "{:.2f}x",
            "decode_vs_twin": "{:.2f}x",
            "cache_vs_dense": "{:.3f}",
        },
    )
