"""End to end: decode tokens/s, prefill tokens/s, cache bytes and peak memory of a dense model and
its compressed twin, measured in the same run, interleaved per shape, through each model's own
`generate` (`harness.suites.speed.SpeedSuite.measure`: the speed suite's measurement, reused).

On a GPU (bf16, random weights: speed and memory do not depend on the weight values):
- Llama-3.1-8B config: dense (transformers' DynamicCache, what `generate` uses by default), dense
  with a StaticCache (preallocated, written in place: DynamicCache concatenates the whole cache at
  every step, a cost the pruned cache does not pay), and LeanK-masked (the published mask, or a
  synthetic one, applied by the softmax family adapter: decode through `PrunedKCache`; the prompt
  attends with all channels, LeanK's deployment);
- DeltaNet-1.3B config: dense and 50% pruned (d_k 128 -> 64, sliced by the fla family adapter),
  each with fla's decode step and with ours (HARNESS_FLA_DECODE=fla / ours, read at every call).
The variants of one model share its weight tensors (a deep copy that reuses every parameter;
slicing replaces only the pruned q/k projections), so one copy of the weights is resident and
each variant's peak memory is those weights plus its own cache and activations.

With `quick` on CPU, the zoo's llama-tiny (dense vs a random 0.5 mask) and deltanet-tiny (dense vs
50% pruned) stand in, to check the path; peak memory is CUDA-only.

Memory plan (80 GB H100; one model resident at a time, its weights once):
- Llama: weights 16.1 GB. Dense KV is 128 KiB a token (32 layers x 8 KV heads x 128 x K,V x bf16):
  4 x 16k and 16 x 4k are both 65,536 tokens, 8.6 GB (the LeanK cache about 0.6 of it). A prefill
  of 65,536 tokens adds about 8 GB per layer in flight (MLP 3 x 1.9 GB, q/k/v, and for the LeanK
  variant a materialized bf16 mask, batch x context^2: 2.1 GB at 4 x 16k); logits: last position
  only. Estimated peak about 33 GB; measured on an H100 41 GB dense and 52-54 GB LeanK
  (docs/benchmarks.md). 8 x 32k would not fit: 34 GB of KV, 22 GB of prefill MLP, a 17 GB mask.
- DeltaNet: weights 2.7 GB (+0.2 GB of sliced q/k projections); fp32 state 25 MB a sequence, 1.6
  GB at batch 64; a 64 x 2k prefill adds about 5 GB. Estimated peak about 10 GB; measured 14.7 GB
  dense, 11.8 GB pruned.
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
from harness.kernels import fla_decode

WINDOW = {"sink": 16, "recent": 64, "full_prefill": True}  # LeanK's deployment: the prompt attends fully
FLA_DECODE = fla_decode.ENV  # read by harness.kernels.fla_decode at every call
# (batch, context) per model; "full" is sized for an 80 GB H100 (the memory plan above)
SHAPES = {
    "full": {"llama": ((4, 16384), (16, 4096)), "deltanet": ((64, 2048),)},
    "quick": {"llama": ((2, 1024),), "deltanet": ((8, 512),)},  # a GPU smoke test
    "cpu": {"llama": ((2, 128),), "deltanet": ((2, 128),)},  # zoo models; 128 > sink + recent: a real middle
}


@dataclass
class Variant:
    model: torch.nn.Module
    twin: str | None = None  # the dense variant run the same way (same cache kind, same decode kernel)
    env: dict[str, str] = field(default_factory=dict)  # environment while it runs


@dataclass
class Case:
    """One model and its variants, all sharing one set of weights; the first variant is the stock dense."""

    model: str
    variants: dict[str, Variant]
    shapes: tuple[tuple[int, int], ...]  # (batch, context)
    notes: list[str] = field(default_factory=list)


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A deep copy whose parameters are `model`'s own tensors (no second copy of the weights)."""
    return copy.deepcopy(model, memo={id(p): p for p in model.parameters()})


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
    from harness.methods.leank import mask_selection

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
    static = shared_copy(dense)
    static.generation_config.cache_implementation = "static"
    static.generation_config.disable_compile = True  # eager like the others (a static cache would auto-compile)
    variants = {"dense": Variant(dense), "dense, static cache": Variant(static),
                f"{kind} mask (kept {float(mask.mean()):.4g})": Variant(masked, twin="dense, static cache")}
    return Case("llama-tiny (zoo)" if device == "cpu" else "Llama-3.1-8B config", variants, shapes,
                [f"mask: {source}.", f"LeanK window: sink {WINDOW['sink']} + recent {WINDOW['recent']} tokens keep "
                 "all channels; the prompt attends with all channels (LeanK's deployment), decode steps read the "
                 "pruned cache. Its twin (\"vs twin\") is the dense model with a static cache, also written in place."])


def deltanet_case(device: str, shapes) -> Case:
    from harness.families import adapter_for
    from harness.selection import ChannelSelection, LayerSelection

    dense = base_model(device, "deltanet-tiny", "deltanet-1.3b")
    adapter = adapter_for(dense)
    geometry = adapter.geometry(dense)
    layers = {i: LayerSelection(d, dv, tuple(tuple(range(d // 2)) for _ in range(h))) for i, (h, d, dv) in geometry.items()}
    pruned = shared_copy(dense)
    adapter.apply(pruned, ChannelSelection(adapter.family, layers, "first-half", 0.5))
    d = next(iter(geometry.values()))[1]
    label = f"pruned (d_k {d} -> {d // 2})"
    notes = ["channels 0 to d_k/2 - 1 of every head kept (which ones does not change the speed)."]
    if device == "cuda":
        variants = {"dense, fla decode": Variant(dense, env={FLA_DECODE: "fla"}),
                    "dense, our decode": Variant(dense, env={FLA_DECODE: "ours"}),
                    f"{label}, fla decode": Variant(pruned, twin="dense, fla decode", env={FLA_DECODE: "fla"}),
                    f"{label}, our decode": Variant(pruned, twin="dense, our decode", env={FLA_DECODE: "ours"})}
        notes.append(f"decode step: fla's `fused_recurrent_delta_rule` ({FLA_DECODE}=fla) or ours "
                     f"(`harness.kernels.delta_decode`, {FLA_DECODE}=ours); prefill is fla's chunk kernel in both.")
    else:
        variants = {"dense": Variant(dense), label: Variant(pruned, twin="dense")}
    return Case("deltanet-tiny (zoo)" if device == "cpu" else "DeltaNet-1.3B config", variants, shapes, notes)


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


def measure_case(case: Case, suite, bars, device: str) -> list[dict[str, Any]]:
    vocab = next(iter(case.variants.values())).model.config.vocab_size
    advance = bars.task(case.model, len(case.shapes) * len(case.variants)) if bars is not None else (lambda: None)
    rows = []
    for batch, context in case.shapes:
        # token ids above the special ones (0-2: pad, bos, eos): random weights, so any text will do
        prompt = torch.randint(3, vocab, (batch, context), generator=torch.Generator().manual_seed(batch * 7919 + context))
        found = {}
        for label, variant in case.variants.items():  # interleaved: every variant at this shape, then the next
            start = time.perf_counter()
            try:
                with environ(variant.env):
                    found[label] = suite.measure(variant.model, prompt)
            except (RuntimeError, MemoryError) as exc:  # torch.OutOfMemoryError is a RuntimeError
                found[label] = {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:160]}"}
            log.info("%s | %s | %d x %d: %s (%.1f s)", case.model, label, batch, context,
                     summary(found[label], batch, context), time.perf_counter() - start)
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
    return (f"prefill {batch * context / found['prefill']['median']:,.0f} tokens/s, decode "
            f"{found['decode']['median'] * 1e3:.2f} ms/token, cache {found['cache_bytes'] / 1e9:.4g} GB{peak}")


def shape_rows(case: Case, batch: int, context: int, found: dict[str, dict]) -> list[dict[str, Any]]:
    stock = found[next(iter(case.variants))]
    rows = []
    for label, r in found.items():
        row = {"model": case.model, "variant": label, "batch": batch, "context": context, "shape": f"{batch} x {context}",
               **case.variants[label].env}
        if "error" in r:
            rows.append({**row, "error": r["error"]})
            continue
        decode_s = r["decode"]["median"]
        row.update({
            "prefill_tokens_per_s": batch * context / r["prefill"]["median"], "decode_ms_per_token": decode_s * 1e3,
            "decode_tokens_per_s": batch / decode_s, "cache_bytes": r["cache_bytes"], "cache_gb": r["cache_bytes"] / 1e9,
            "peak_memory_bytes": r.get("peak_memory"), "peak_gb": r["peak_memory"] / 1e9 if "peak_memory" in r else None,
            "prefill": r["prefill"], "decode": r["decode"],
        })
        if r is not stock and "decode" in stock:
            row["decode_vs_dense"] = stock["decode"]["median"] / decode_s
            row["cache_vs_dense"] = r["cache_bytes"] / stock["cache_bytes"]
        twin = found.get(case.variants[label].twin or "", {})
        if "decode" in twin:
            row["decode_vs_twin"] = twin["decode"]["median"] / decode_s
        rows.append(row)
    return rows


def run_llama(quick: bool = False, mask_path=None, bars=None) -> Table:
    """Llama-3.1-8B config: dense (DynamicCache), dense (StaticCache), LeanK-masked."""
    return run(quick, mask_path, bars, models=("llama",))


def run_deltanet(quick: bool = False, bars=None) -> Table:
    """DeltaNet-1.3B config: dense vs 50% pruned, fla's decode step and ours."""
    return run(quick, None, bars, models=("deltanet",))


def run(quick: bool = False, mask_path=None, bars=None, models=("llama", "deltanet")) -> Table:
    """The end-to-end rows of `models` (one table each in `harness bench`, so that each fits one
    10-minute GPU command)."""
    from harness.suites.speed import SpeedSuite

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not quick:
        from harness.errors import HarnessError

        raise HarnessError("the end-to-end table needs a CUDA GPU (Llama-3.1-8B and DeltaNet-1.3B configs); "
                           "--quick runs it on the tiny zoo models on CPU")
    size = "cpu" if device == "cpu" else ("quick" if quick else "full")
    suite = SpeedSuite(new_tokens={"full": 32, "quick": 8, "cpu": 4}[size], warmup=1, repeats=3 if size == "full" else 2)
    cases = {"llama": lambda: llama_case(device, mask_path, SHAPES[size]["llama"]),
             "deltanet": lambda: deltanet_case(device, SHAPES[size]["deltanet"])}
    builders = [cases[m] for m in models]
    rows, notes = [], []
    for build in builders:  # one model (and its variants) resident at a time
        torch.manual_seed(0)
        start = time.perf_counter()
        case = build()
        log.info("%s: built with variants %s (%.1f s)", case.model, ", ".join(case.variants), time.perf_counter() - start)
        if device == "cuda":
            models = {id(v.model): v.model for v in case.variants.values()}.values()
            notes.append(f"{case.model}: {unique_bytes(models) / 1e9:.2f} GB of weights shared by its variants; "
                         f"{torch.cuda.memory_allocated() / 1e9:.2f} GB allocated before its runs.")
        notes += [f"{case.model}: {n}" for n in case.notes]
        rows += measure_case(case, suite, bars, device)
        del case
        if device == "cuda":
            torch.cuda.empty_cache()
    notes = [
        f"Random weights ({'bf16' if device == 'cuda' else 'float32'}): speed and memory do not depend on the weight "
        f"values. Each row: `SpeedSuite.measure` (warm-up {suite.warmup}, median of {suite.repeats} `generate` calls of "
        f"{suite.new_tokens} new tokens; decode: the time between consecutive tokens; prefill: a one-token `generate`, "
        "the prompt's forward into the model's own cache). At each shape the variants of a model run one after another.",
        "\"vs dense\": decode speedup over the model's first (stock) dense row; \"vs twin\": over the dense row run the "
        "same way (same cache kind or decode kernel); cache / dense: cache bytes over the first row's.",
        "Peak memory: the most allocated during the timed calls (`torch.cuda.max_memory_allocated`): the resident "
        "weights (shared: counted once) plus that variant's cache and activations."
        if device == "cuda" else "Peak memory is measured on CUDA only.",
        *notes,
    ]
    columns = ["model", "variant", "shape", "prefill_tokens_per_s", "decode_ms_per_token", "decode_tokens_per_s",
               "cache_gb", "peak_gb", "decode_vs_dense", "decode_vs_twin", "cache_vs_dense"]
    if any("error" in r for r in rows):
        columns.append("error")
        notes.append("Rows with an error failed (the message is the exception's first line); the others stand.")
    return Table(
        title="End to end: dense vs compressed models, same run" + (f" ({', '.join(models)})" if len(models) < 2 else ""),
        columns=columns, rows=rows, notes=notes,
        labels={"shape": "batch x context", "prefill_tokens_per_s": "prefill tokens/s",
                "decode_ms_per_token": "decode ms/token", "decode_tokens_per_s": "decode tokens/s",
                "cache_gb": "cache GB", "peak_gb": "peak GB", "decode_vs_dense": "vs dense",
                "decode_vs_twin": "vs twin", "cache_vs_dense": "cache / dense"},
        formats={"prefill_tokens_per_s": "{:,.0f}", "decode_ms_per_token": "{:.2f}", "decode_tokens_per_s": "{:,.0f}",
                 "cache_gb": "{:.4g}", "peak_gb": "{:.2f}", "decode_vs_dense": "{:.2f}x", "decode_vs_twin": "{:.2f}x",
                 "cache_vs_dense": "{:.3f}"},
    )
