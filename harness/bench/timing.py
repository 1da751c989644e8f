"""GPU timing shared by the bench tables: medians of Triton's `do_bench` (eager) and
`do_bench_cudagraph` (the call replayed from a CUDA graph: no launch cost), and the
device-to-device copy that every table compares achieved bandwidth with."""

from __future__ import annotations

from typing import Callable

import torch


def graph_ms(fn: Callable[[], object], rep: int = 100) -> float:
    """Median ms of `fn` replayed from a CUDA graph (called once first: compiling and
    autotuning happen outside the capture)."""
    from triton.testing import do_bench_cudagraph

    fn()
    torch.cuda.synchronize()
    return do_bench_cudagraph(fn, rep=rep, return_mode="median")


def eager_ms(fn: Callable[[], object], rep: int = 100) -> float:
    """Median ms of `fn` launched eagerly."""
    from triton.testing import do_bench

    return do_bench(fn, rep=rep, return_mode="median")


def copy_gbps(nbytes: int, rep: int = 100) -> float:
    """Bytes read + written per second by a device-to-device copy of `nbytes`: the faster of
    graph and eager timing (the stricter bandwidth limit to compare with)."""
    src = torch.empty(nbytes // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    ms = min(graph_ms(copy, rep), eager_ms(copy, rep))
    del src, dst
    return 2 * (nbytes // 4) * 4 / ms / 1e6
