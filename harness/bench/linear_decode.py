"""Linear attention at pruned key dims, op level, on a GPU: fla 0.6's ops vs ours.

Decode (`run_decode`): one token, batch 64, 16 heads, d_v 128, fp32 state, bf16 q/k/v,
d_k = 128 x kept ratio (a 1.3B DeltaNet / Gated DeltaNet layer's heads). fla's
`fused_recurrent_(gated_)delta_rule` against `harness.kernels.delta_decode.delta_rule_step`, both
called directly (not through a model, so the table does not depend on HARNESS_FLA_DECODE). Each op
is captured in a CUDA graph (launch cost excluded) that steps several layers' states in turn, at
least 256 MB in all, so that no state stays in the 50 MB L2 cache between its reads, as in a model;
median of `do_bench_cudagraph`. GB/s counts the state read and written (2 x |S|); a copy measured
in the same run (the faster of graph and eager) gives the bandwidth limit.

Prefill (`run_prefill`): fla's chunk kernels at batch 16 x 4096 tokens (the size of docs/methods.md section 6),
same heads and dims, `do_bench` median. fla autotunes its chunk kernels at every new d_k, compiling
every candidate config: on a fresh machine that takes minutes; with Triton's on-disk cache filled
the table took about a minute on an H100 (docs/benchmarks.md).
"""

from __future__ import annotations

import torch

from harness.bench import Table, log
from harness.bench.timing import copy_gbps, eager_ms, graph_ms

HEADS, DV, DK_FULL = 16, 128, 128
RATIOS = (1.0, 0.75, 0.5, 0.25)
MIN_BYTES = 256 << 20  # states stepped per timed graph: far beyond the L2 cache
TARGET = 0.85  # of copy bandwidth: the target for our decode step (on the H200)
OPS = {False: "delta rule", True: "gated delta rule"}


def fla_original(fn):
    return getattr(fn, "_harness_original", fn)


def decode_row(dk: int, gated: bool, batch: int, rep: int) -> dict:
    from fla.ops.delta_rule import fused_recurrent_delta_rule
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    from harness.kernels.delta_decode import delta_rule_step

    # fla's own ops, also where harness.kernels.fla_cpu has wrapped them (its wrapper would hand a
    # CUDA decode step to our kernel under HARNESS_FLA_DECODE=auto, the default)
    fused_recurrent_delta_rule = fla_original(fused_recurrent_delta_rule)
    fused_recurrent_gated_delta_rule = fla_original(fused_recurrent_gated_delta_rule)

    dev, bf = "cuda", torch.bfloat16
    q, k = (torch.randn(batch, HEADS, dk, device=dev, dtype=bf) for _ in range(2))
    v = torch.randn(batch, HEADS, DV, device=dev, dtype=bf)
    beta = torch.rand(batch, HEADS, device=dev, dtype=bf)
    gate = -torch.rand(batch, HEADS, device=dev, dtype=torch.float32) * 0.1
    nbytes = batch * HEADS * dk * DV * 4
    layers = -(-MIN_BYTES // nbytes)
    states = [torch.zeros(batch, HEADS, dk, DV, device=dev, dtype=torch.float32) for _ in range(layers)]
    fla_states = [s.clone() for s in states]
    args = dict(
        q=q[:, None],
        k=k[:, None],
        v=v[:, None],
        beta=beta[:, None],
        output_final_state=True,
        use_qk_l2norm_in_kernel=True,
    )  # fla's layout: (B, T=1, H, d)

    def fla_step():
        for s in fla_states:
            if gated:
                fused_recurrent_gated_delta_rule(g=gate[:, None], initial_state=s, **args)
            else:
                fused_recurrent_delta_rule(initial_state=s, **args)

    def our_step():
        for s in states:
            delta_rule_step(q, k, v, beta, s, gate if gated else None)

    our_ms, fla_ms = graph_ms(our_step, rep) / layers, graph_ms(fla_step, rep) / layers
    return {
        "op": OPS[gated],
        "kept_ratio": dk / DK_FULL,
        "d_k": dk,
        "batch": batch,
        "state_bytes": nbytes,
        "states_per_graph": layers,
        "fla_us": fla_ms * 1e3,
        "ours_us": our_ms * 1e3,
        "fla_gbps": 2 * nbytes / fla_ms / 1e6,
        "ours_gbps": 2 * nbytes / our_ms / 1e6,
        "speedup_vs_fla": fla_ms / our_ms,
    }


TILE_FLOATS = (2048, 8192)  # the sweep's state tiles: 8 to 32 KB of fp32 a program (smaller idles, larger spills)


def tune_grid(dk: int) -> list[dict[str, int]]:
    """The settings the sweep times at key dim `dk`: d_v blocks whose (d_k x BLOCK_V) fp32 tile is
    8-32 KB, 2, 4 or 8 warps, with and without evict-first loads and stores."""
    height = 1 << (dk - 1).bit_length()  # the kernel's tile height: d_k rounded up to a power of 2
    blocks = [bv for bv in (16, 32, 64, 128) if TILE_FLOATS[0] <= height * bv <= TILE_FLOATS[1]] or [16]
    return [dict(BLOCK_V=bv, NUM_WARPS=w, EVICT_FIRST=e) for bv in blocks for w in (2, 4, 8) for e in (0, 1)]


def our_step_us(dk: int, gated: bool, batch: int, rep: int) -> float:
    """Our step alone (as `decode_row` times it), with the launch settings in force."""
    from harness.kernels.delta_decode import delta_rule_step

    dev, bf = "cuda", torch.bfloat16
    q, k = (torch.randn(batch, HEADS, dk, device=dev, dtype=bf) for _ in range(2))
    v = torch.randn(batch, HEADS, DV, device=dev, dtype=bf)
    beta = torch.rand(batch, HEADS, device=dev, dtype=bf)
    gate = -torch.rand(batch, HEADS, device=dev, dtype=torch.float32) * 0.1
    layers = -(-MIN_BYTES // (batch * HEADS * dk * DV * 4))
    states = [torch.zeros(batch, HEADS, dk, DV, device=dev, dtype=torch.float32) for _ in range(layers)]

    def step():
        for s in states:
            delta_rule_step(q, k, v, beta, s, gate if gated else None)

    return 1e3 * graph_ms(step, rep) / layers


def tune_decode(quick: bool = False, save: bool = True, advance=None) -> list[dict]:
    """Time our step at every setting of `tune_grid(d_k)` for each d_k, both rules; the setting with the
    least total time of the two rules is recorded per d_k in the user's launch-settings cache."""
    from harness.kernels import launch_settings
    from harness.kernels.delta_decode import KERNEL
    from harness.kernels.pruned_decode import device_name

    batch, rep = 64, (10 if quick else 30)
    gpu, rows = device_name("cuda"), []
    try:
        for ratio in (1.0,) if quick else RATIOS:
            dk = round(DK_FULL * ratio)
            grid = tune_grid(dk)[:4] if quick else tune_grid(dk)
            timed = []
            for setting in grid:
                launch_settings.OVERRIDE[KERNEL] = setting
                try:
                    times = {gated: our_step_us(dk, gated, batch, rep) for gated in (False, True)}
                except Exception as exc:  # noqa: BLE001 - a setting that does not compile or fit
                    rows.append({"d_k": dk, **setting, "error": repr(exc)[:120]})
                    continue
                finally:
                    if advance:
                        advance()
                timed.append(
                    {
                        "d_k": dk,
                        **setting,
                        "delta_us": times[False],
                        "gated_us": times[True],
                        "total_us": times[False] + times[True],
                    }
                )
            best = min(timed, key=lambda r: r["total_us"])
            best["best"] = True
            log.info(
                "tune linear decode d_k %d on %s: best %s, %.1f + %.1f us",
                dk,
                gpu,
                {k: best[k] for k in grid[0]},
                best["delta_us"],
                best["gated_us"],
            )
            if save:
                launch_settings.save(
                    KERNEL,
                    gpu,
                    launch_settings.key_dim_class(dk),
                    {k: best[k] for k in grid[0]},
                    note=f"harness bench --tune: batch {batch}, {HEADS} heads, d_v {DV}, "
                    f"{best['delta_us']:.1f} + {best['gated_us']:.1f} us",
                )
            rows += timed
    finally:
        launch_settings.OVERRIDE.pop(KERNEL, None)
    return rows


def run_decode(quick: bool = False, bars=None) -> Table:
    batch, rep = 64, (20 if quick else 50)
    ratios = (1.0, 0.5) if quick else RATIOS
    advance = bars.task("linear decode", 2 * len(ratios)) if bars is not None else (lambda: None)
    copy = copy_gbps(MIN_BYTES, rep)
    rows = []
    for gated in (False, True):
        for ratio in ratios:
            row = decode_row(round(DK_FULL * ratio), gated, batch, rep)
            row["ours_of_copy"] = row["ours_gbps"] / copy
            row["copy_gbps"] = copy
            rows.append(row)
            log.info(
                "linear decode %s d_k %d: fla %.1f us, ours %.1f us (%.0f%% of copy)",
                row["op"],
                row["d_k"],
                row["fla_us"],
                row["ours_us"],
                100 * row["ours_of_copy"],
            )
            advance()
    for row in rows:
        row["d_k_kept"] = f"{row['d_k']} ({row['kept_ratio']:g})"
        row["fla"] = f"{row['fla_us']:.1f} us, {row['fla_gbps']:.0f} GB/s"
        row["ours"] = f"{row['ours_us']:.1f} us, {row['ours_gbps']:.0f} GB/s"
    torch.cuda.empty_cache()
    met = sum(r["ours_of_copy"] >= TARGET for r in rows)
    falls = all(a["ours_us"] > b["ours_us"] for a, b in zip(rows, rows[1:]) if a["op"] == b["op"])
    return Table(
        title="Linear attention: one-token decode at pruned d_k",
        columns=["op", "d_k_kept", "fla", "ours", "ours_of_copy", "speedup_vs_fla"],
        labels={
            "d_k_kept": "d_k (kept)",
            "fla": "fla `fused_recurrent_*`",
            "ours": "ours (`delta_rule_step`)",
            "ours_of_copy": "ours / copy",
            "speedup_vs_fla": "ours vs fla",
        },
        rows=rows,
        formats={"ours_of_copy": "{:.0%}", "speedup_vs_fla": "{:.2f}x"},
        notes=[
            f"Batch {batch}, {HEADS} heads, d_v {DV}, fp32 state, bf16 q/k/v; d_k = {DK_FULL} x kept ratio (a 1.3B "
            "layer's heads). fla: `fused_recurrent_(gated_)delta_rule`; ours: `harness.kernels.delta_decode."
            "delta_rule_step`; both called directly.",
            f"Each op runs in a CUDA graph stepping >= {MIN_BYTES >> 20} MB of states in turn (no state reused from "
            f"L2), median of `do_bench_cudagraph` (rep {rep}); GB/s counts the state read and written.",
            "Our step's launch settings: this GPU's sweep winners per d_k (`harness bench --tune`), else defaults.",
            f"Device-to-device copy in the same run: {copy:.0f} GB/s (read + write). Target for ours: >= "
            f"{TARGET:.0%} of copy: met in {met} of {len(rows)} rows; our step time falls with d_k: "
            f"{'yes' if falls else 'NO'}.",
        ],
    )


def prefill_ms(dk: int, gated: bool, batch: int, tokens: int, rep: int) -> float:
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    chunk_delta_rule, chunk_gated_delta_rule = fla_original(chunk_delta_rule), fla_original(chunk_gated_delta_rule)

    dev, bf = "cuda", torch.bfloat16
    q, k = (torch.randn(batch, tokens, HEADS, dk, device=dev, dtype=bf) for _ in range(2))
    v = torch.randn(batch, tokens, HEADS, DV, device=dev, dtype=bf)
    beta = torch.rand(batch, tokens, HEADS, device=dev, dtype=bf)
    gate = -torch.rand(batch, tokens, HEADS, device=dev, dtype=torch.float32) * 0.1
    if gated:
        fn = lambda: chunk_gated_delta_rule(q, k, v, g=gate, beta=beta, use_qk_l2norm_in_kernel=True)  # noqa: E731
    else:
        fn = lambda: chunk_delta_rule(q, k, v, beta=beta, use_qk_l2norm_in_kernel=True)  # noqa: E731
    return eager_ms(fn, rep)


def run_prefill(quick: bool = False, bars=None) -> Table:
    sizes = ((2, 1024),) if quick else ((16, 4096),)  # the size of docs/methods.md section 6
    ratios, rep = ((1.0, 0.5) if quick else RATIOS), (20 if quick else 50)
    advance = bars.task("linear prefill", 2 * len(sizes) * len(ratios)) if bars is not None else (lambda: None)
    rows = []
    for batch, tokens in sizes:
        for gated in (False, True):
            full = None
            for ratio in ratios:
                dk = round(DK_FULL * ratio)
                ms = prefill_ms(dk, gated, batch, tokens, rep)
                full = ms if full is None else full
                log.info("prefill %s %d x %d d_k %d: %.3f ms", "gated" if gated else "delta", batch, tokens, dk, ms)
                rows.append(
                    {
                        "op": "chunk_gated_delta_rule" if gated else "chunk_delta_rule",
                        "batch": batch,
                        "tokens": tokens,
                        "shape": f"{batch} x {tokens}",
                        "kept_ratio": ratio,
                        "d_k": dk,
                        "ms": ms,
                        "speedup_vs_full": full / ms,
                    }
                )
                advance()
    torch.cuda.empty_cache()
    return Table(
        title="Linear attention: prefill chunk kernels at pruned d_k",
        columns=["op", "shape", "d_k", "ms", "speedup_vs_full"],
        rows=rows,
        labels={"shape": "batch x tokens", "speedup_vs_full": f"vs d_k {DK_FULL}"},
        formats={"ms": "{:.3f}", "speedup_vs_full": "{:.2f}x"},
        notes=[
            f"fla's chunk kernels alone (no projections), {HEADS} heads, d_v {DV}, bf16; batch x tokens as "
            f"shown; median of `do_bench` (rep {rep}); speedup against d_k {DK_FULL} at the same shape."
        ],
    )
