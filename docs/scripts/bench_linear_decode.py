"""Linear-attention decode and prefill at pruned key dims, on a GPU: fla 0.6's ops vs
harness.kernels.delta_decode, against a device-to-device copy measured in the same run.

    python docs/scripts/bench_linear_decode.py [--out results.json]

Decode: one token, batch 64, 16 heads, d_v 128, fp32 state, d_k = 128 x kept ratio
(1.0 / 0.75 / 0.5 / 0.25: a 1.3B DeltaNet / Gated DeltaNet layer's shape). Each op is captured in
a CUDA graph and timed with `triton.testing.do_bench_cudagraph` (median); each timed graph steps
several layers' states in turn (at least 256 MB in all, as a model's layers would) so that no state
stays in the 50 MB L2 cache between its reads; achieved GB/s counts the state read and written
(2 x |S|), and a copy of the same bytes in the same run gives the bandwidth limit. Prefill: fla's chunk kernels at batch 8 x 2048 tokens, same heads and dims.
"""

from __future__ import annotations

import argparse
import json

import torch
import triton
from triton.testing import do_bench, do_bench_cudagraph

from harness.kernels.delta_decode import delta_rule_step

BATCH, HEADS, DV, DK_FULL = 64, 16, 128, 128
RATIOS = (1.0, 0.75, 0.5, 0.25)


def graph_ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=50, return_mode="median")


MIN_BYTES = 256 << 20  # states stepped per timed graph: far beyond the L2 cache


def copy_gbps(nbytes: int) -> float:
    src = torch.empty(max(nbytes, MIN_BYTES) // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    ms = graph_ms(lambda: dst.copy_(src))
    return 2 * src.numel() * 4 / ms / 1e6


def decode_row(dk: int, gated: bool) -> dict:
    from fla.ops.delta_rule import fused_recurrent_delta_rule
    from fla.ops.gated_delta_rule import fused_recurrent_gated_delta_rule

    dev, bf = "cuda", torch.bfloat16
    q, k = (torch.randn(BATCH, HEADS, dk, device=dev, dtype=bf) for _ in range(2))
    v = torch.randn(BATCH, HEADS, DV, device=dev, dtype=bf)
    beta = torch.rand(BATCH, HEADS, device=dev, dtype=bf)
    gate = -torch.rand(BATCH, HEADS, device=dev, dtype=torch.float32) * 0.1
    nbytes = BATCH * HEADS * dk * DV * 4
    layers = -(-MIN_BYTES // nbytes)
    states = [torch.zeros(BATCH, HEADS, dk, DV, device=dev, dtype=torch.float32) for _ in range(layers)]
    fla_states = [s.clone() for s in states]
    args = dict(q=q[:, None], k=k[:, None], v=v[:, None], beta=beta[:, None], output_final_state=True,
                use_qk_l2norm_in_kernel=True)

    def fla_step():
        for s in fla_states:
            if gated:
                fused_recurrent_gated_delta_rule(g=gate[:, None], initial_state=s, **args)
            else:
                fused_recurrent_delta_rule(initial_state=s, **args)

    def our_step():
        for s in states:
            delta_rule_step(q, k, v, beta, s, gate if gated else None)

    our_ms = graph_ms(our_step) / layers
    print(f"  ({'gated' if gated else 'plain'} d_k {dk}: ours {our_ms * 1e3:.1f} us over {layers} states)", flush=True)
    fla_ms = graph_ms(fla_step) / layers
    return {"op": "gated_delta_rule" if gated else "delta_rule", "d_k": dk, "state_bytes": nbytes,
            "fla_us": fla_ms * 1e3, "ours_us": our_ms * 1e3, "speedup_vs_fla": fla_ms / our_ms,
            "fla_gbps": 2 * nbytes / fla_ms / 1e6, "ours_gbps": 2 * nbytes / our_ms / 1e6}


def prefill_row(dk: int, gated: bool) -> dict:
    from fla.ops.delta_rule import chunk_delta_rule
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule

    dev, bf = "cuda", torch.bfloat16
    b, t = 8, 2048
    q, k = (torch.randn(b, t, HEADS, dk, device=dev, dtype=bf) for _ in range(2))
    v = torch.randn(b, t, HEADS, DV, device=dev, dtype=bf)
    beta = torch.rand(b, t, HEADS, device=dev, dtype=bf)
    gate = -torch.rand(b, t, HEADS, device=dev, dtype=torch.float32) * 0.1
    if gated:
        ms = do_bench(lambda: chunk_gated_delta_rule(q, k, v, g=gate, beta=beta, use_qk_l2norm_in_kernel=True), rep=50, return_mode="median")
    else:
        ms = do_bench(lambda: chunk_delta_rule(q, k, v, beta=beta, use_qk_l2norm_in_kernel=True), rep=50, return_mode="median")
    return {"op": "chunk_gated_delta_rule" if gated else "chunk_delta_rule", "d_k": dk, "batch": b, "tokens": t, "ms": ms}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", default=None)
    out = parser.parse_args().out
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__}
    import fla

    result["fla"] = fla.__version__
    dks = [round(DK_FULL * r) for r in RATIOS]
    result["copy_gbps"] = copy_gbps(BATCH * HEADS * DK_FULL * DV * 4)
    print(f"{result['device']}: copy {result['copy_gbps']:.0f} GB/s", flush=True)
    result["decode"], result["prefill"] = [], []
    for gated in (False, True):
        for dk in dks:
            r = decode_row(dk, gated)
            result["decode"].append(r)
            print(f"decode {r['op']:<18} d_k {r['d_k']:>3}: fla {r['fla_us']:7.1f} us ({r['fla_gbps']:6.0f} GB/s)  "
                  f"ours {r['ours_us']:7.1f} us ({r['ours_gbps']:6.0f} GB/s, {r['ours_gbps'] / result['copy_gbps']:.0%} of copy)  "
                  f"{r['speedup_vs_fla']:.2f}x", flush=True)
    for gated in (False, True):
        for dk in dks:
            r = prefill_row(dk, gated)
            result["prefill"].append(r)
            print(f"prefill {r['op']:<24} d_k {r['d_k']:>3}: {r['ms']:.3f} ms", flush=True)
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
