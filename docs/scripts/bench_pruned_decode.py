"""One-token decode attention at Llama-3.1-8B shapes: dense SDPA vs the pruned-K-cache Triton path.

Builds one attention layer's PrunedKLayer (Hkv=8, Hq=32, d=dv=128, sink 16, recent 64, bf16) with
per-head kept counts from the LeanK mask (../shared/data/leank-masks/llama3.1-8b-instruct.pth, or
a synthetic mask with the same kept fraction 0.3125 when that file is absent), for batch 8 x 32k and
batch 52 x 4k, and times (triton.testing.do_bench, median) on a CUDA GPU:
- dense: torch SDPA over full K and V (enable_gqa=True, and the n_rep query heads of each KV head
  as n_rep query rows, which is the same computation for one token; the faster is the baseline);
- pruned: `harness.kernels.pruned_decode.pruned_decode_attention` (eager, and replayed from a CUDA
  graph, which removes the launch overhead of its small torch ops);
- copy: a device-to-device copy of as many bytes as the pruned path must read (middle keys of the
  kept channels, middle values of heads that keep channels, head and window K/V, the query).
Prints times, speedups and achieved bandwidth (bytes the path must read / time; the copy's GB/s
counts bytes read plus written). Also checks the pruned output against the torch reference.

    python docs/scripts/bench_pruned_decode.py [--layer N] [--mask PATH] [--counts 0,32,64,...]

Runs in well under 2 minutes on an H100.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.nn.functional as F
import triton.testing

from harness.kcache import KeyChannelPlan, PrunedKLayer
from harness.kernels.pruned_attention import pruned_cache_attention
from harness.kernels.pruned_decode import pruned_decode_attention

HKV, HQ, D = 8, 32, 128
SINK, RECENT = 16, 64
MASK = os.path.join(os.path.dirname(__file__), "..", "..", "..", "shared", "data", "leank-masks",
                    "llama3.1-8b-instruct.pth")


def load_mask(path: str) -> tuple[torch.Tensor, str]:
    """[layers, kv heads, 128] 0/1 mask: LeanK's when present, else synthetic with kept fraction 0.3125."""
    for p in (path, "/work/shared/data/leank-masks/llama3.1-8b-instruct.pth"):
        if p and os.path.exists(p):
            return torch.load(p, map_location="cpu", weights_only=True), p
    g = torch.Generator().manual_seed(0)
    # LeanK's counts over 32 layers x 8 heads: 47 heads keep 0 (18.4%), 118 keep 32, 71 keep 64, 20 keep 96,
    # 10240 channels = 0.3125 of 256 x 128
    counts = torch.tensor([0] * 47 + [32] * 118 + [64] * 71 + [96] * 20)[torch.randperm(32 * HKV, generator=g)]
    mask = torch.zeros(32, HKV, D)
    for i, c in enumerate(counts.tolist()):
        mask.view(-1, D)[i, torch.randperm(D, generator=g)[:c]] = 1.0
    return mask, "synthetic (kept fraction %.4f)" % mask.mean().item()


def build_layer(kept, batch: int, context: int, dtype, device) -> PrunedKLayer:
    """A layer as `update` leaves it at a decode step: head (sink), middle, window (recent + 1)."""
    plan = KeyChannelPlan(HKV, D, D, kept, sink=SINK, recent=RECENT)
    layer = PrunedKLayer(plan)
    n_win, n_mid = RECENT + 1, context - SINK - RECENT - 1

    def rnd(*shape):
        return torch.randn(*shape, device=device, dtype=dtype)

    layer.lazy_initialization(rnd(1), None)
    layer.pads, layer.head_len = torch.zeros(batch, dtype=torch.long), SINK
    layer.head_k, layer.head_v = rnd(batch, HKV, SINK, D), rnd(batch, HKV, SINK, D)
    layer.win_k, layer.win_v = rnd(batch, HKV, n_win, D), rnd(batch, HKV, n_win, D)
    layer.groups = plan.groups(batch, device)
    for g in layer.groups:
        if g.count:
            g.mid_keys, g.mid_values = rnd(batch, len(g.heads), n_mid, g.count), rnd(batch, len(g.heads), n_mid, D)
        else:
            g.value_sum = torch.randn(batch, len(g.heads), D, device=device) * n_mid ** 0.5
    layer.n_mid = n_mid
    return layer


def pruned_bytes(layer, query) -> int:
    size = lambda t: 0 if t is None else t.numel() * t.element_size()  # noqa: E731
    total = size(query) + sum(size(t) for t in (layer.head_k, layer.head_v, layer.win_k, layer.win_v))
    return total + sum(size(g.mid_keys) + size(g.mid_values) + size(g.value_sum) for g in layer.groups)


def graph_time(fn) -> float | None:
    try:
        return triton.testing.do_bench_cudagraph(fn, return_mode="median")
    except Exception as exc:  # noqa: BLE001
        print(f"  (CUDA graph timing failed: {exc!r})")
        return None


def bench(kept, batch: int, context: int, dtype=torch.bfloat16):
    dev = "cuda"
    torch.manual_seed(0)
    layer = build_layer(kept, batch, context, dtype, dev)
    scaling = D ** -0.5
    query = torch.randn(batch, HQ, 1, D, device=dev, dtype=dtype)
    mask = torch.ones(batch, 1, 1, context, dtype=torch.bool, device=dev)

    out = pruned_decode_attention(query, layer, mask, scaling=scaling)
    ref = pruned_cache_attention(query, layer, mask, scaling=scaling)
    err = ((out.float() - ref.float()).norm() / ref.float().norm()).item()

    # dense K and V at full width (random: the times do not depend on the values)
    k, v = torch.randn(batch, HKV, context, D, device=dev, dtype=dtype), torch.randn(batch, HKV, context, D, device=dev, dtype=dtype)
    dense_gqa = lambda: F.scaled_dot_product_attention(query, k, v, scale=scaling, enable_gqa=True)  # noqa: E731
    q_rows = query.reshape(batch, HKV, HQ // HKV, D)  # one KV head's query heads as query rows: the same result
    dense_rows = lambda: F.scaled_dot_product_attention(q_rows, k, v, scale=scaling)  # noqa: E731
    torch.testing.assert_close(dense_rows().reshape(batch, HQ, 1, D), dense_gqa(), atol=2e-2, rtol=2e-2)
    pruned = lambda: pruned_decode_attention(query, layer, mask, scaling=scaling)  # noqa: E731

    n_bytes = pruned_bytes(layer, query)
    src = torch.empty(n_bytes, dtype=torch.uint8, device=dev).random_(0, 255)
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731

    t = {name: triton.testing.do_bench(fn, return_mode="median")
         for name, fn in (("dense_gqa", dense_gqa), ("dense_rows", dense_rows), ("pruned", pruned), ("copy", copy))}
    t["pruned_graph"] = graph_time(pruned)
    t["dense_graph"] = graph_time(dense_rows if t["dense_rows"] <= t["dense_gqa"] else dense_gqa)
    dense = min(t["dense_gqa"], t["dense_rows"])
    dense_bytes = k.numel() * k.element_size() * 2 + query.numel() * query.element_size()
    gbs = lambda b, ms: b / ms / 1e6 if ms else float("nan")  # noqa: E731

    print(f"\nbatch {batch} x {context} tokens, {dtype}: pruned reads {n_bytes / 1e6:.1f} MB, dense {dense_bytes / 1e6:.1f} MB "
          f"({n_bytes / dense_bytes:.3f} of dense); pruned vs reference rel. error {err:.2e}")
    print(f"  dense SDPA   enable_gqa {t['dense_gqa'] * 1e3:8.1f} us   rows {t['dense_rows'] * 1e3:8.1f} us   "
          f"-> {gbs(dense_bytes, dense):6.0f} GB/s")
    print(f"  pruned       eager {t['pruned'] * 1e3:8.1f} us  {gbs(n_bytes, t['pruned']):6.0f} GB/s   speedup {dense / t['pruned']:.2f}x")
    if t["pruned_graph"] and t["dense_graph"]:
        print(f"  CUDA graphs  dense {t['dense_graph'] * 1e3:8.1f} us   pruned {t['pruned_graph'] * 1e3:8.1f} us  "
              f"{gbs(n_bytes, t['pruned_graph']):6.0f} GB/s   speedup {t['dense_graph'] / t['pruned_graph']:.2f}x")
    print(f"  copy of the pruned bytes {t['copy'] * 1e3:8.1f} us  {gbs(2 * n_bytes, t['copy']):6.0f} GB/s read+write "
          f"(pruned eager / copy {t['pruned'] / t['copy']:.2f})")
    del layer, k, v, src, dst
    torch.cuda.empty_cache()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mask", default=MASK)
    ap.add_argument("--layer", default="typical",
                    help="mask layer index, or 'typical' (the layer whose kept fraction is nearest the mask's)")
    ap.add_argument("--counts", default=None,
                    help="comma-separated kept count per KV head (channels chosen at random) instead of a mask file")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    if args.counts:
        g = torch.Generator().manual_seed(0)
        counts = [int(c) for c in args.counts.split(",")]
        mask = torch.zeros(1, len(counts), D)
        for h, c in enumerate(counts):
            mask[0, h, torch.randperm(D, generator=g)[:c]] = 1.0
        source, args.layer = f"--counts {args.counts}", "0"
    else:
        mask, source = load_mask(args.mask)
    if args.layer == "typical":
        fractions = mask.mean((1, 2))
        layer_idx = int((fractions - mask.mean()).abs().argmin())
    else:
        layer_idx = int(args.layer)
    kept = tuple(tuple(torch.nonzero(row).flatten().tolist()) for row in mask[layer_idx])
    counts = [len(x) for x in kept]
    print(f"{torch.cuda.get_device_name()}; mask {source}; layer {layer_idx}: kept counts per KV head {counts} "
          f"(fraction {sum(counts) / (len(counts) * D):.4f}; whole mask {mask.mean().item():.4f})")
    for batch, context in ((8, 32768), (52, 4096)):
        bench(kept, batch, context)


if __name__ == "__main__":
    main()
