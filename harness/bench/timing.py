"""GPU timing shared by the bench tables: medians of Triton's `do_bench` (eager) and
`do_bench_cudagraph` (the call replayed from a CUDA graph: no launch cost), the
device-to-device copy that every table compares achieved bandwidth with, and the GPU-busy share
of the static loop's decode steps (torch.profiler; `harness.bench.profile` profiles with the
same helpers)."""

from __future__ import annotations

import time
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
    return 2 * (nbytes // 4) * 4 / ms / 1e6


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def device_us(event) -> float:
    return getattr(event, "self_device_time_total", None) or getattr(event, "self_cuda_time_total", 0.0)


def new_profiler():
    from torch.profiler import ProfilerActivity, profile

    return profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if torch.cuda.is_available() else []))


def cuda_kernels(events) -> list:
    from torch.autograd import DeviceType

    return [e for e in events if e.device_type == DeviceType.CUDA]  # the GPU's own events


def static_busy(model, prompt: torch.Tensor, steps: int = 8, top: int = 0) -> dict:
    """Wall and GPU-busy time per step of `steps` decode steps of the static loop (graph replays on
    CUDA), after a prefill of `prompt`: the share of a step the GPU is busy, which a host-bound loop
    (launches, synchronizations) keeps low; with `top`, also the `top` kernels by GPU time per step
    as (name, launches per step, us per step). The model's decoder is released afterwards."""
    from harness import graph_decode

    batch, context = prompt.shape
    try:
        dec = graph_decode.decoder(
            model, batch, graph_decode.capacity_for(context, steps + 1), max_new_tokens=steps + 1
        )
        first = dec.prefill(prompt)
        profiler = new_profiler()
        sync()
        profiler.start()
        start = time.perf_counter()
        dec.decode(first, steps + 1)  # the first token comes from the prefill's logits, then `steps` steps
        sync()
        elapsed = time.perf_counter() - start
        profiler.stop()
    finally:
        graph_decode.release(model)
    kernels = cuda_kernels(profiler.key_averages())
    if prompt.is_cuda and not kernels:  # a CUDA step runs kernels: the profiler did not see the graph's
        return {"step_ms": 1e3 * elapsed / steps, "gpu_busy_ms": None, "busy_share": None}
    busy_us = sum(device_us(e) for e in kernels)
    step_ms, busy_ms = 1e3 * elapsed / steps, busy_us / 1e3 / steps
    by_gpu = sorted(kernels, key=lambda e: -device_us(e))[:top]
    return {
        "step_ms": step_ms,
        "gpu_busy_ms": busy_ms,
        "busy_share": busy_ms / step_ms,
        "top_gpu": [(e.key, e.count / steps, device_us(e) / steps) for e in by_gpu],
    }
