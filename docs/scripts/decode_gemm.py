"""How long one decode-step projection takes at batch 64 (docs/benchmarks.md, the fourth H100 session).

`F.linear` of 64 bf16 rows of 2,048 features against one weight of N outputs, for the output widths
of a 1.3B DeltaNet layer (q or k pruned to 1,024; q, k or v at 2,048; q+k+v fused; the MLP's 5,632
and its fused gate+up 11,264), replayed 20 at a time from a CUDA graph (as the static decode loop
replays its step), with cuBLAS and with cuBLASLt. Repeated weights under the GPU's L2 size partly
stay cached, so the larger rates overstate what one step sees.

    python docs/scripts/decode_gemm.py

Needs a CUDA GPU; prints one line per shape.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ROWS, FEATURES = 64, 2048
OUTPUTS = (1024, 2048, 4096, 5632, 11264)


def replay_us(fn, reps: int = 200, per_graph: int = 20) -> float:
    """Microseconds per call of `fn`, replayed `per_graph` at a time from one CUDA graph."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps // per_graph):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / reps


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("needs a CUDA GPU")
    torch.manual_seed(0)
    x = torch.randn(ROWS, FEATURES, device="cuda", dtype=torch.bfloat16)
    print(torch.cuda.get_device_name())
    for backend in ("cublas", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(backend)
        for n in OUTPUTS:
            w = torch.randn(n, FEATURES, device="cuda", dtype=torch.bfloat16)
            us = replay_us(lambda: F.linear(x, w))
            mb = w.numel() * w.element_size() / 2**20
            print(f"{backend} N={n:5d} ({mb:5.1f} MB): {us:6.2f} us ({mb * 2**20 / us / 1e3:5.0f} GB/s)", flush=True)


if __name__ == "__main__":
    main()
