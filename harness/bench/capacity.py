"""The largest batch that fits: at a context, the most rows each Llama-3.1-8B variant decodes
through the static loop (`harness.graph_decode`) without running out of GPU memory.

A probe at batch B does what a real run of B rows does, except for the other rows' prefills:
it builds the decoder (the static cache for B rows of context + new tokens), prefills one row for
real (the transient every row's prefill has: one forward of `context` tokens, its layers' dense
keys one at a time), captures the step in a CUDA graph, sets every row's length to the context
(the other rows' stores hold zeros: memory and time do not depend on the values) and decodes
`new_tokens` steps. It fits when nothing raises torch.OutOfMemoryError; the capture is not
attempted with less than `CAPTURE_MARGIN` bytes free (a capture that runs out of memory midway
can leave the device unusable), which counts as not fitting. The search starts from an estimate
(free memory / cache bytes a row), grows or shrinks by 10% until one probe fits and one does not,
then bisects.

    harness bench --only capacity [--mask PATH]
"""

from __future__ import annotations

import gc
import time

import torch

from harness.bench import Table, log

CONTEXT, NEW_TOKENS = 32768, 16
CAPTURE_MARGIN = 2 << 30
PREFILL_RESERVE = 8e9  # bytes the estimate leaves for the prefill's transient and the step's activations


def free_bytes() -> int:
    """Bytes a new allocation can still get: free on the device plus the allocator's unused reserve."""
    return torch.cuda.mem_get_info()[0] + torch.cuda.memory_reserved() - torch.cuda.memory_allocated()


def row_bytes(model, capacity: int) -> int:
    """Cache bytes one row of `capacity` tokens takes (a cache on the meta device: no memory)."""
    from harness.decode_state import plans
    from harness.static_kcache import StaticKCache

    dtype = next(model.parameters()).dtype
    return sum(StaticKCache(plans(model), 1, capacity, dtype, "meta").nbytes().values())


def probe(model, batch: int, context: int, new_tokens: int, prompt: torch.Tensor) -> int | None:
    """Peak bytes allocated by a decode of `batch` rows at `context`, or None when it does not fit."""
    from harness import graph_decode

    gc.collect()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    dec = None
    try:
        dec = graph_decode.Decoder(
            model, batch, graph_decode.capacity_for(context, new_tokens), max_new_tokens=new_tokens, graphs=False
        )
        first = dec.prefill_rows([0], prompt)
        if free_bytes() < CAPTURE_MARGIN:
            return None
        dec.graphs = True
        dec._capture()
        dec.state.set_lengths(list(range(batch)), context)
        dec.decode(first.expand(batch, -1).contiguous(), new_tokens)
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated()
    except torch.OutOfMemoryError:
        return None
    finally:
        if dec is not None:
            dec.graph = None
        del dec
        gc.collect()
        torch.cuda.empty_cache()


def largest_batch(model, context: int = CONTEXT, new_tokens: int = NEW_TOKENS, limit: int = 2048, advance=None) -> dict:
    """The largest batch `probe` fits (searched as the module says), its peak, and the probes."""
    from harness import graph_decode

    vocab = model.config.vocab_size
    prompt = torch.randint(3, vocab, (1, context), generator=torch.Generator().manual_seed(context))
    per_row = row_bytes(model, graph_decode.capacity_for(context, new_tokens))
    guess = int(max(1.0, (free_bytes() - PREFILL_RESERVE) / per_row))
    lo, hi, peak, probes = 0, limit + 1, None, []
    batch = min(guess, limit)
    while hi - lo > 1:
        start = time.perf_counter()
        found = probe(model, batch, context, new_tokens, prompt)
        probes.append(
            {"batch": batch, "fits": found is not None, "peak_bytes": found, "seconds": time.perf_counter() - start}
        )
        log.info(
            "capacity probe: batch %d at %d tokens: %s (%.1f s)",
            batch,
            context,
            f"fits, peak {found / 1e9:.1f} GB" if found else "does not fit",
            probes[-1]["seconds"],
        )
        if advance:
            advance()
        if found is not None:
            lo, peak = batch, found
        else:
            hi = batch
        if hi == limit + 1:  # nothing failed yet: grow
            batch = min(limit, max(batch + 1, int(batch * 1.1)))
        elif lo == 0:  # nothing fit yet: shrink
            batch = max(1, min(batch - 1, int(batch * 0.9)))
        else:
            batch = (lo + hi) // 2
        if batch in (lo, hi):
            break
    return {"batch": lo, "peak_bytes": peak, "row_bytes": per_row, "estimate": guess, "probes": probes}


def run(quick: bool = False, mask_path=None, bars=None) -> Table:
    """Dense (static K/V cache) and LeanK-masked Llama-3.1-8B config through the static loop."""
    from harness.bench import end_to_end

    context = 4096 if quick else CONTEXT
    torch.manual_seed(0)
    case = end_to_end.llama_case("cuda", mask_path, ((1, context),))
    variants = {label: v for label, v in case.variants.items() if v.engine == "static"}
    advance = bars.task("largest batch (probes)", 16 * len(variants)) if bars is not None else None
    rows = []
    for label, variant in variants.items():
        found = largest_batch(variant.model, context, advance=advance)
        rows.append(
            {
                "model": case.model,
                "variant": label,
                "context": context,
                "largest_batch": found["batch"],
                "peak_gb": None if found["peak_bytes"] is None else found["peak_bytes"] / 1e9,
                "row_gb": found["row_bytes"] / 1e9,
                "estimate": found["estimate"],
                "probes": found["probes"],
            }
        )
    dense = rows[0]["largest_batch"]
    for r in rows:
        r["vs_dense"] = r["largest_batch"] / dense if dense else None
    weights = end_to_end.unique_bytes(v.model for v in variants.values())
    mask_note = next(n for n in case.notes if n.startswith("mask:"))
    del case, variants
    torch.cuda.empty_cache()
    return Table(
        title="Largest batch that fits: Llama-3.1-8B config through the static decode loop",
        columns=["model", "variant", "context", "largest_batch", "vs_dense", "row_gb", "peak_gb", "estimate"],
        rows=rows,
        labels={
            "largest_batch": "largest batch",
            "vs_dense": "vs dense",
            "row_gb": "cache GB / row",
            "peak_gb": "peak GB at it",
            "estimate": "first probe",
        },
        formats={"vs_dense": "{:.2f}x", "row_gb": "{:.3f}", "peak_gb": "{:.1f}"},
        notes=[
            f"Random weights (bf16), {weights / 1e9:.1f} GB resident, shared by the variants; {NEW_TOKENS} new "
            "tokens a row. A probe at batch B: the static cache for B rows, one row's real prefill (the transient "
            "each row's prefill has), the step captured in a CUDA graph, every row at the context, "
            f"{NEW_TOKENS} decode steps; it fits when no allocation fails.",
            mask_note,
            "Stock `generate` is not probed: it prefills the whole batch in one forward, so its limit is set by "
            "the prefill's activations, not the cache.",
        ],
    )
