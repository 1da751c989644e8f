"""Where a decode step's time goes: torch.profiler over the decode steps of `generate` (the prompt's
forward and the first decode step left out), for each model of the end-to-end variants of
`harness.bench.end_to_end` (a model the table also runs through the static loop is profiled once,
through `generate`: the eager path whose host cost the loop removes).

    python -m harness.bench.profile --model llama --batch 4 --context 16384 [--mask PATH]
    python -m harness.bench.profile --model deltanet --batch 64 --context 64
    python -m harness.bench.profile --model deltanet --batch 64 --context 2048 --engine static

With `--engine static`, each variant the table runs through the static loop is profiled there
instead (graph replays on CUDA): wall and GPU-busy time per step, the share the acceptance of a
host-free loop is about, and the kernels that take the most GPU time.

Per variant it prints the wall time per decode step, the GPU's busy time per step (the sum of its
kernels' times: a step far longer than that is bound by the host, launching work), the host's
synchronizations and copies per step, and the operators that take the most host and GPU time.
A GPU tool (CUDA events and kernel times); on CPU it still runs, with host times only.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import torch
from transformers.generation.streamers import BaseStreamer

from harness.bench.timing import cuda_kernels, device_us, new_profiler, static_busy, sync


class DecodeWindow(BaseStreamer):
    """A `generate` streamer that starts `profiler` after the second new token (past the prompt's
    forward and the first decode step, which does one-time work such as growing a pruned cache's
    middle store past the prompt) and stops it at the end; it times the steps in between."""

    def __init__(self, profiler):
        self.profiler, self.puts, self.started = profiler, 0, None

    def put(self, _tokens) -> None:
        self.puts += 1
        if self.puts == 3:  # 1: the prompt, 2: the prefill's token, 3: the first decode step's token
            sync()
            self.profiler.start()
            self.started = time.perf_counter()

    def end(self) -> None:
        sync()
        self.elapsed = time.perf_counter() - self.started
        self.profiler.stop()


def profile_variant(model, prompt: torch.Tensor, steps: int, top: int) -> dict[str, Any]:
    pad = getattr(model.generation_config, "pad_token_id", None) or 0
    generate = lambda n, streamer=None: model.generate(  # noqa: E731
        prompt, max_new_tokens=n, min_new_tokens=n, do_sample=False, pad_token_id=pad, streamer=streamer
    )
    start = time.perf_counter()
    generate(steps + 1)  # warm-up: compiles, autotunes, allocator
    sync()
    warmup_s = time.perf_counter() - start
    profiler = new_profiler()
    window = DecodeWindow(profiler)
    generate(steps + 2, window)
    events = profiler.key_averages()
    n = steps  # decode steps inside the window (the forwards of tokens 3 .. steps + 2)
    kernels = cuda_kernels(events)
    gpu_us = sum(device_us(e) for e in kernels)
    count = lambda name: sum(e.count for e in events if e.key == name)  # noqa: E731
    by_host = sorted((e for e in events if e.self_cpu_time_total > 0), key=lambda e: -e.self_cpu_time_total)[:top]
    by_gpu = sorted(kernels, key=lambda e: -device_us(e))[:top]
    return {
        "warmup_s": warmup_s,
        "step_ms": 1e3 * window.elapsed / n,
        "gpu_busy_ms": gpu_us / 1e3 / n,
        "syncs_per_step": (count("cudaStreamSynchronize") + count("cudaDeviceSynchronize")) / n,
        "memcpy_per_step": (count("cudaMemcpyAsync") + count("cudaMemcpy")) / n,
        "launches_per_step": (count("cudaLaunchKernel") + count("cuLaunchKernel") + count("cuLaunchKernelEx")) / n,
        "top_host": [(e.key, e.count / n, e.self_cpu_time_total / n) for e in by_host],
        "top_gpu": [(e.key, e.count / n, device_us(e) / n) for e in by_gpu],
    }


def print_top(title: str, rows) -> None:
    if rows:
        print(f"  {title}:")
    for name, calls, us in rows:
        print(f"    {us:9.1f}  x{calls:6.1f}  {name[:90]}")


def main(argv=None) -> None:
    from harness.bench import end_to_end

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("llama", "deltanet", "gated-deltanet", "qwen35"), required=True)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--context", type=int, default=4096)
    parser.add_argument("--steps", type=int, default=8, help="decode steps profiled")
    parser.add_argument("--mask", default=None, help="LeanK mask .pth (llama; default: a synthetic mask)")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument(
        "--engine",
        choices=("generate", "static"),
        default="generate",
        help="generate: each model through `generate`; static: each static-loop variant through the loop "
        "(wall and GPU-busy time per step, and its top kernels)",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    shapes = ((args.batch, args.context),)
    torch.manual_seed(0)
    case = (
        end_to_end.llama_case(device, args.mask, shapes)
        if args.model == "llama"
        else end_to_end.linear_case(device, shapes, args.model)
    )
    vocab = next(iter(case.variants.values())).model.config.vocab_size
    prompt = torch.randint(3, vocab, (args.batch, args.context), generator=torch.Generator().manual_seed(0)).to(device)
    results, seen = {}, set()
    for label, variant in case.variants.items():
        if args.engine == "static":
            if variant.engine == "static":
                with torch.no_grad():
                    r = results[label] = static_busy(variant.model, prompt, args.steps, args.top)
                print(
                    f"== {case.model} | {label} | {args.batch} x {args.context}: {r['step_ms']:.2f} ms/step wall, "
                    + (
                        "GPU busy not seen (the profiler recorded no kernels)"
                        if r["busy_share"] is None
                        else f"GPU busy {r['gpu_busy_ms']:.2f} ms/step ({r['busy_share']:.0%})"
                    ),
                    flush=True,
                )
                print_top("GPU (self us/step)", r.get("top_gpu", []))
            continue
        if id(variant.model) in seen:
            continue  # a model the table also runs through another engine: profiled once, through generate
        seen.add(id(variant.model))
        with torch.no_grad(), end_to_end.environ(variant.env):
            r = results[label] = profile_variant(variant.model, prompt, args.steps, args.top)
        print(
            f"\n== {case.model} | {label} | {args.batch} x {args.context}: {r['step_ms']:.2f} ms/step wall, "
            f"GPU busy {r['gpu_busy_ms']:.2f} ms/step; per step {r['launches_per_step']:.0f} launches, "
            f"{r['syncs_per_step']:.1f} syncs, {r['memcpy_per_step']:.1f} copies; warm-up generate {r['warmup_s']:.1f} s",
            flush=True,
        )
        print_top("host (self CPU us/step)", r["top_host"])
        print_top("GPU (self us/step)", r["top_gpu"])
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
