"""Decode attention over the static pruned K cache vs dense SDPA at Llama-3.1-8B shapes, whole mask.

For each shape (batch x context), every layer of the LeanK mask (32 layers x 8 KV heads x 128
channels) gets its own `StaticKLayer` (the cache the decode loop uses: sink 16, ring of recent
64 + 1, the middle per kept-count group) with random contents and every row at the context, and
one decode step's attention is timed:
- dense: torch SDPA over full K and V (32 query heads on 8 KV heads; the faster of enable_gqa and
  the n_rep query heads as query rows, which is the same computation for one token). Every layer
  of the dense model has the same shape, so one layer is timed and counted 32 times;
- pruned: `harness.kernels.static_decode.static_decode_attention` (partials + merge), with the
  launch settings `harness.kernels.launch_settings` gives this GPU; the token's append (evicting
  into the middle) is timed apart ("append us");
- copy: a device-to-device copy of 1 GiB in the same run (GB/s counts bytes read plus written),
  the bandwidth limit the kernel's achieved GB/s (bytes it must read / time) is compared with.
All times are medians of triton.testing.do_bench_cudagraph (the call replayed from a CUDA graph:
no launch overhead on either side) and, for reference, of do_bench (eager). Speedup = the 32 dense
layers' time / the sum of the 32 pruned layers' times. The typical layer's output is checked
against the torch twin.

    harness bench --only pruned [--mask PATH]          # this table
    harness bench --tune [--mask PATH]                 # sweep launch settings on this GPU, cache the winners
    harness bench --tune --sweep pruned-wide           # only the 256-wide heads' class (Qwen3.5's attention)
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness.bench import log
from harness.bench.timing import copy_gbps, eager_ms, graph_ms


@dataclass(frozen=True)
class Geometry:
    """An attention layer's heads as the decode kernel sees them."""

    kv_heads: int
    query_heads: int
    head_dim: int

    def all_channels(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(range(self.head_dim)) for _ in range(self.kv_heads))

    def first_half(self) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(range(self.head_dim // 2)) for _ in range(self.kv_heads))


LLAMA = Geometry(kv_heads=8, query_heads=32, head_dim=128)  # Llama-3.1-8B
WIDE = Geometry(kv_heads=2, query_heads=8, head_dim=256)  # Qwen3.5-0.8B's attention layers
HKV, HQ, D, LAYERS = LLAMA.kv_heads, LLAMA.query_heads, LLAMA.head_dim, 32
SINK, RECENT = 16, 64
SHAPES = ((8, 32768), (52, 4096))
WIDE_SHAPES = ((64, 2048),)  # the e2e-qwen35 table's batch x context
TARGETS = {"8 x 32768": 1.6, "52 x 4096": 1.45}  # speedup over SDPA the issue asks for (and >= 88% of copy)


def kept_of(mask_layer: torch.Tensor) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(torch.nonzero(row).flatten().tolist()) for row in mask_layer)


def build_layer(kept, batch: int, context: int, dtype=torch.bfloat16, device="cuda", geometry: Geometry = LLAMA):
    """A StaticKLayer whose rows each hold `context` tokens, the new one included (head: sink,
    ring: recent + 1, middle: the rest), random contents; and its lengths (the new token's slot)."""
    from harness.kcache import KeyChannelPlan
    from harness.static_kcache import StaticKLayer

    d = geometry.head_dim
    plan = KeyChannelPlan(geometry.kv_heads, d, d, kept, sink=SINK, recent=RECENT)
    layer = StaticKLayer(plan, batch, context, dtype, device)
    for store in (layer.head_k, layer.head_v, layer.ring_k, layer.ring_v, layer.keys_flat, layer.values_flat):
        store.normal_()
    if layer.value_sum is not None:
        layer.value_sum.normal_().mul_(layer.capacity**0.5)
    return layer, torch.full((batch,), context - 1, dtype=torch.int32, device=device)


def read_bytes(layer, query, context: int) -> int:
    """What a decode step's attention must read: the query and what the stores hold at `context`."""
    return query.numel() * query.element_size() + layer.read_bytes(context)


def _times(fn) -> tuple[float, float]:
    """(CUDA-graph median ms, eager median ms)."""
    return graph_ms(fn), eager_ms(fn)


def host_us_per_call(fn, calls: int = 20) -> float:
    """Host time to issue one call (no synchronization inside the loop): what an eager decode
    loop pays per layer on the CPU, whatever the GPU time. Few calls: once the launch queue is
    full, issuing waits for the GPU (200 calls at 8 x 32k measured the GPU time instead)."""
    import time

    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    issued = time.perf_counter() - start
    torch.cuda.synchronize()
    return 1e6 * issued / calls


def dense_times(batch: int, context: int, dtype=torch.bfloat16) -> dict:
    import torch.nn.functional as F

    q = torch.randn(batch, HQ, 1, D, device="cuda", dtype=dtype)
    k, v = (torch.randn(batch, HKV, context, D, device="cuda", dtype=dtype) for _ in range(2))
    rows = q.reshape(batch, HKV, HQ // HKV, D)
    variants = {
        "enable_gqa": lambda: F.scaled_dot_product_attention(q, k, v, scale=D**-0.5, enable_gqa=True),
        "rows": lambda: F.scaled_dot_product_attention(rows, k, v, scale=D**-0.5),
    }
    times = {name: _times(fn) for name, fn in variants.items()}
    best = min(times, key=lambda n: times[n][0])
    nbytes = 2 * k.numel() * k.element_size() + q.numel() * q.element_size()
    return {"variant": best, "graph_ms": times[best][0], "eager_ms": times[best][1], "bytes": nbytes}


def layer_times(kept, batch: int, context: int, check: bool = False, geometry: Geometry = LLAMA) -> dict:
    from harness.kernels.static_decode import static_append, static_decode_attention, static_decode_attention_torch

    torch.manual_seed(0)
    layer, lengths = build_layer(kept, batch, context, geometry=geometry)
    d, hkv = geometry.head_dim, geometry.kv_heads
    query = torch.randn(batch, geometry.query_heads, 1, d, device="cuda", dtype=torch.bfloat16)
    fn = lambda: static_decode_attention(query, layer, lengths, scaling=d**-0.5)  # noqa: E731
    graph, eager = _times(fn)
    row = {"graph_ms": graph, "eager_ms": eager, "bytes": read_bytes(layer, query, context)}
    if check:
        key = torch.randn(batch, hkv, 1, d, device="cuda", dtype=torch.bfloat16)
        row["append_us"] = 1e3 * graph_ms(lambda: static_append(layer, key, key, lengths))
        row["host_us"] = host_us_per_call(fn)
        ref = static_decode_attention_torch(query, layer, lengths, scaling=d**-0.5).float()
        row["rel_error"] = ((fn().float() - ref).norm() / ref.norm()).item()
    torch.cuda.empty_cache()
    return row


def typical_layer(mask: torch.Tensor) -> int:
    fractions = mask.mean((1, 2))
    return int((fractions - mask.mean()).abs().argmin())


def measure(mask: torch.Tensor, shapes=SHAPES, layers=None, advance=None) -> tuple[list[dict], float]:
    """Rows per shape (whole mask: sums over `layers`, default all) and the copy GB/s."""
    copy = copy_gbps(1 << 30)
    layers = list(range(mask.shape[0])) if layers is None else list(layers)
    typical = typical_layer(mask)
    rows = []
    for batch, context in shapes:
        dense = dense_times(batch, context)
        per_layer = []
        for i in layers:
            per_layer.append(layer_times(kept_of(mask[i]), batch, context, check=i == typical))
            if advance:
                advance()
        graph = sum(r["graph_ms"] for r in per_layer)
        eager = sum(r["eager_ms"] for r in per_layer)
        nbytes = sum(r["bytes"] for r in per_layer)
        n = len(layers)
        checked = [r["rel_error"] for r in per_layer if "rel_error" in r]
        rows.append(
            {
                "shape": f"{batch} x {context}",
                "layers": n,
                "dense_us_per_layer": 1e3 * dense["graph_ms"],
                "pruned_us_per_layer": 1e3 * graph / n,
                "speedup": dense["graph_ms"] * n / graph,
                "eager_speedup": dense["eager_ms"] * n / eager,
                "bytes_ratio": nbytes / (dense["bytes"] * n),
                "pruned_gbps": nbytes / graph / 1e6,
                "dense_gbps": dense["bytes"] / dense["graph_ms"] / 1e6,
                "copy_gbps": copy,
                "pruned_of_copy": nbytes / graph / 1e6 / copy,
                "slowest_layer_us": 1e3 * max(r["graph_ms"] for r in per_layer),
                "rel_error": checked[0] if checked else None,
                "dense_variant": dense["variant"],
                "host_us_per_call": next((r["host_us"] for r in per_layer if "host_us" in r), None),
                "append_us": next((r["append_us"] for r in per_layer if "append_us" in r), None),
            }
        )
        log.info(
            "pruned decode %s, %d layers: %.2fx over SDPA, %.0f%% of copy",
            rows[-1]["shape"],
            n,
            rows[-1]["speedup"],
            100 * rows[-1]["pruned_of_copy"],
        )
    return rows, copy


# the sweep: (BLOCK_N, NUM_WARPS, NUM_STAGES) x ITEMS_PER_SM (runtime: no recompile)
TUNE_TILES = ((64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 4, 3), (128, 8, 2), (128, 8, 3), (256, 8, 2))
# 256-wide heads: a 128-token tile of keys (or values) is already 64 KiB, so smaller tiles and more
# warps too; the first is the defaults' tile (the Llama-tuned one), timed in the same run
WIDE_TILES = ((128, 4, 2), (32, 4, 2), (32, 4, 3), (64, 4, 2), (64, 4, 3), (64, 8, 2), (64, 8, 3), (128, 8, 2))
TUNE_ITEMS = (4, 8, 16)
SWEEPS = ("pruned", "pruned-wide", "linear")  # what `harness bench --tune` sweeps (--sweep picks)


@dataclass(frozen=True)
class TuneCase:
    """One shape of the sweep: the layers it times at each setting (their times summed) and the
    settings it tries."""

    batch: int
    context: int
    geometry: Geometry
    kepts: tuple  # per layer timed: the kept channels of each KV head
    grid: tuple  # the settings (dicts) tried

    @property
    def shape(self) -> str:
        return f"{self.batch} x {self.context}"

    @property
    def shape_class(self) -> str:
        from harness.kernels import launch_settings

        return launch_settings.shape_class(self.context, self.geometry.head_dim)


def grid_of(tiles, items=TUNE_ITEMS) -> tuple:
    return tuple(
        dict(BLOCK_N=bn, NUM_WARPS=w, NUM_STAGES=st, ITEMS_PER_SM=i, MIN_BLOCKS_PER_SPLIT=4)
        for bn, w, st in tiles
        for i in items
    )


def tune_cases(mask: torch.Tensor, sweeps=SWEEPS, quick: bool = False) -> list[TuneCase]:
    """The sweep's shapes: the LeanK mask's typical layer at the Llama shapes ("pruned"); a
    Qwen3.5-0.8B attention layer with every channel and with half of them ("pruned-wide": the
    hybrid's dense and pruned rows share its class)."""
    quick_grid = grid_of(((128, 4, 2), (128, 4, 3)), (8,))
    cases = []
    if "pruned" in sweeps:
        kept = kept_of(mask[typical_layer(mask)])
        for batch, context in ((2, 4096), (8, 1024)) if quick else SHAPES:
            cases.append(TuneCase(batch, context, LLAMA, (kept,), quick_grid if quick else grid_of(TUNE_TILES)))
    if "pruned-wide" in sweeps:
        kepts = (WIDE.all_channels(), WIDE.first_half())
        for batch, context in ((4, 512),) if quick else WIDE_SHAPES:
            cases.append(TuneCase(batch, context, WIDE, kepts, quick_grid if quick else grid_of(WIDE_TILES)))
    return cases


def tune(cases, save: bool = True, advance=None) -> list[dict]:
    """Time each case's layers at every setting of its grid; the least total time per shape class
    is recorded in the user's launch-settings cache (`save`) for this GPU. Returns every timing
    (rows with "best": True for the winners)."""
    from harness.kernels import launch_settings
    from harness.kernels.pruned_decode import KERNEL, device_name

    gpu = device_name("cuda")
    out = []
    try:
        for case in cases:
            cls, timed = case.shape_class, []
            for setting in case.grid:
                launch_settings.OVERRIDE[KERNEL] = setting
                row = {"shape": case.shape, "class": cls, **setting}
                try:
                    r = [layer_times(k, case.batch, case.context, geometry=case.geometry) for k in case.kepts]
                except Exception as exc:  # noqa: BLE001 - a setting that does not compile or fit
                    out.append({**row, "error": repr(exc)[:120]})
                    continue
                finally:
                    if advance:
                        advance()
                graph = sum(x["graph_ms"] for x in r)
                timed.append(
                    {
                        **row,
                        "graph_us": 1e3 * graph,
                        "eager_us": 1e3 * sum(x["eager_ms"] for x in r),
                        "gbps": sum(x["bytes"] for x in r) / graph / 1e6,
                    }
                )
            if not timed:
                log.info("tune %s (%s) on %s: no setting ran", case.shape, cls, gpu)
                continue
            best = min(timed, key=lambda row: row["graph_us"])
            best["best"] = True
            chosen = {k: best[k] for k in case.grid[0]}
            log.info("tune %s (%s) on %s: best %s, %.1f us", best["shape"], cls, gpu, chosen, best["graph_us"])
            if save:
                layers = "typical layer" if len(case.kepts) == 1 else f"{len(case.kepts)} layers (summed)"
                note = f"harness bench --tune: {layers} at {best['shape']}, {best['graph_us']:.1f} us"
                path = launch_settings.save(KERNEL, gpu, cls, chosen, note=note)
                log.info("tune: recorded in %s", path)
            out += timed
    finally:
        launch_settings.OVERRIDE.pop(KERNEL, None)
    return out


def tune_table(mask_path=None, quick: bool = False, bars=None, sweeps=SWEEPS):
    """`harness bench --tune`: the sweeps' timings as a table (winners cached for this GPU)."""
    from harness.bench import Table
    from harness.bench.masks import leank_mask
    from harness.kernels import launch_settings
    from harness.kernels.pruned_decode import device_name

    mask, source, _ = leank_mask(mask_path, (LAYERS, HKV, D))
    cases = tune_cases(mask, sweeps, quick)
    total = sum(len(c.grid) for c in cases)
    advance = bars.task("launch settings sweep", total) if bars is not None and total else None
    rows = tune(cases, advance=advance)
    linear = []
    if "linear" in sweeps:
        from harness.bench.linear_decode import DK_FULL, RATIOS, tune_decode, tune_grid

        sweep = 4 if quick else sum(len(tune_grid(round(DK_FULL * r))) for r in RATIOS)
        linear_advance = bars.task("linear decode sweep", sweep) if bars is not None else None
        linear = tune_decode(quick, advance=linear_advance)
    keys = ["BLOCK_N", "NUM_WARPS", "NUM_STAGES", "ITEMS_PER_SM", "MIN_BLOCKS_PER_SPLIT"]
    rows = [{"kernel": "pruned_decode", **r} for r in rows] + [{"kernel": "delta_decode", **r} for r in linear]
    return Table(
        title=f"Launch settings sweep ({', '.join(sweeps)}), {device_name('cuda')}",
        columns=[
            "kernel",
            "shape",
            "class",
            "d_k",
            *keys,
            "BLOCK_V",
            "EVICT_FIRST",
            "graph_us",
            "eager_us",
            "gbps",
            "delta_us",
            "gated_us",
            "best",
            "error",
        ],
        rows=rows,
        labels={
            "graph_us": "us (graphs)",
            "eager_us": "us (eager)",
            "gbps": "GB/s",
            "delta_us": "delta rule us",
            "gated_us": "gated us",
        },
        formats={
            "graph_us": "{:.1f}",
            "eager_us": "{:.1f}",
            "gbps": "{:.0f}",
            "delta_us": "{:.1f}",
            "gated_us": "{:.1f}",
        },
        notes=[
            *(
                [
                    f"Mask: {source}; the typical layer (kept fraction nearest the mask's) at the Llama-3.1-8B "
                    "shapes (8 KV heads of 128); medians of do_bench_cudagraph. The fastest setting per shape "
                    f"class is written to the user's launch-settings cache ({launch_settings.user_cache()}), "
                    "which the kernels read from then on."
                ]
                if "pruned" in sweeps
                else []
            ),
            *(
                [
                    "Classes with a head dim: a Qwen3.5-0.8B attention layer (2 KV heads of 256, 8 query heads), "
                    "timed with every channel kept and with the first half (the hybrid's dense and pruned rows); "
                    "the least summed time wins."
                ]
                if "pruned-wide" in sweeps
                else []
            ),
            *(
                [
                    "The linear decode step (`delta_rule_step`, batch 64, 16 heads, d_v 128) was swept too, per "
                    "d_k (BLOCK_V x NUM_WARPS, both rules; the least total time wins): "
                    + "; ".join(
                        f"d_k {r['d_k']}: BLOCK_V {r['BLOCK_V']}, {r['NUM_WARPS']} warps, {r['delta_us']:.1f} + "
                        f"{r['gated_us']:.1f} us"
                        for r in linear
                        if r.get("best")
                    )
                    + ". Its timings are the table's delta_decode rows."
                ]
                if linear
                else []
            ),
        ],
    )


def run(mask_path=None, quick: bool = False, bars=None):
    from harness.bench import Table
    from harness.bench.masks import leank_mask

    mask, source, _ = leank_mask(mask_path, (LAYERS, HKV, D))
    shapes, layers = (((2, 4096), (8, 1024)), range(4)) if quick else (SHAPES, range(LAYERS))
    advance = bars.task("pruned decode (layers x shapes)", len(shapes) * len(layers)) if bars is not None else None
    rows, _ = measure(mask, shapes, layers, advance=advance)
    for r in rows:
        r["target_met"] = r["speedup"] >= TARGETS.get(r["shape"], 1.45) and r["pruned_of_copy"] >= 0.88
    met = sum(r["target_met"] for r in rows)
    torch.cuda.empty_cache()
    from harness.kernels import launch_settings
    from harness.kernels.pruned_decode import KERNEL, device_name

    gpu = device_name("cuda") if torch.cuda.is_available() else "no GPU"
    sources = sorted({launch_settings.source(KERNEL, gpu, launch_settings.shape_class(c)) for _, c in shapes})
    return Table(
        title="Softmax attention: decode over the static pruned K cache (Llama-3.1-8B shapes)",
        columns=[
            "shape",
            "layers",
            "bytes_ratio",
            "dense_us_per_layer",
            "pruned_us_per_layer",
            "speedup",
            "eager_speedup",
            "pruned_gbps",
            "copy_gbps",
            "pruned_of_copy",
            "slowest_layer_us",
            "append_us",
            "rel_error",
            "host_us_per_call",
        ],
        rows=rows,
        labels={
            "shape": "batch x context",
            "bytes_ratio": "bytes pruned / dense",
            "dense_us_per_layer": "dense SDPA (us/layer)",
            "pruned_us_per_layer": "pruned (us/layer)",
            "speedup": "speedup (graphs)",
            "eager_speedup": "speedup (eager)",
            "pruned_gbps": "pruned GB/s",
            "copy_gbps": "copy GB/s (r+w)",
            "pruned_of_copy": "pruned / copy",
            "slowest_layer_us": "slowest layer (us)",
            "append_us": "append (us, typical layer)",
            "rel_error": "rel. error (typical layer)",
            "host_us_per_call": "host us/call",
        },
        formats={
            "bytes_ratio": "{:.3f}",
            "dense_us_per_layer": "{:.1f}",
            "pruned_us_per_layer": "{:.1f}",
            "speedup": "{:.2f}x",
            "eager_speedup": "{:.2f}x",
            "pruned_gbps": "{:.0f}",
            "copy_gbps": "{:.0f}",
            "pruned_of_copy": "{:.0%}",
            "slowest_layer_us": "{:.1f}",
            "append_us": "{:.1f}",
            "rel_error": "{:.1e}",
            "host_us_per_call": "{:.0f}",
        },
        notes=[
            f"Mask: {source}. 8 KV heads, 32 query heads, head_dim 128, bf16, sink 16 + recent 64 full; "
            "random cache contents (times do not depend on them).",
            f"Every one of the {len(layers)} layers timed with its own kept counts; speedup = {len(layers)} x one dense "
            "layer (all alike) / the sum of the pruned layers. Medians of triton.testing.do_bench_cudagraph "
            "(graphs) and do_bench (eager); GB/s = bytes the step must read / time; the copy (1 GiB, same run) "
            "counts bytes read + written.",
            f"Launch settings on {gpu}: {', '.join(sources)} (`harness bench --tune` sweeps them on this GPU).",
            f"Targets: >= 1.6x over SDPA at 8 x 32768, >= 1.45x at 52 x 4096, >= 88% of copy bandwidth at both: "
            f"met at {met} of {len(rows)} shapes. LeanK's paper reports 1.29x for its own kernel.",
            "append: the token's write and its eviction into the middle, one launch per layer (not in the "
            "speedup; SDPA's cache write is not timed either). host us/call: CPU time to issue one attention "
            "call eagerly, what a decode loop without CUDA graphs pays per layer whatever the GPU time.",
        ],
    )


if __name__ == "__main__":
    import argparse
    import json

    ap = argparse.ArgumentParser(
        description="static pruned K-cache decode: the table's rows, or --tune the launch settings"
    )
    ap.add_argument("--tune", action="store_true", help="sweep at the typical layer and cache the winners for this GPU")
    ap.add_argument("--mask", default=None)
    args = ap.parse_args()
    from harness.bench.masks import default_mask_path, leank_mask

    m, where, _ = leank_mask(default_mask_path(args.mask), (LAYERS, HKV, D))
    print(where)
    for row in tune(tune_cases(m)) if args.tune else measure(m)[0]:
        print(json.dumps(row))
