"""speed: prefill throughput, decode latency per token at several context lengths and batch sizes,
cache bytes and (on CUDA) peak memory, for the model and, in a compressed cell, its uncompressed
reference (`SuiteContext.reference`) measured interleaved in the same cell, so that every ratio is
taken side by side on the same machine at the same time.

End to end, through one of two engines (`engine`):
- `static` (`auto` picks it on CUDA for the models it covers: Llama and Qwen2, fla DeltaNet and
  Gated DeltaNet, transformers' Gated DeltaNet hybrids; `harness.decode_state.reason` says why
  another is not):
  `harness.graph_decode`, a static cache or state filled by a prefill that writes straight into
  it and each decode step replayed from a CUDA graph; the uncompressed reference runs the same
  loop (a softmax model's dense twin: a static K/V cache). Prefill time: the prefill call (CUDA events);
  decode: CUDA events around each replayed step.
- `generate` (`auto` elsewhere, CPU included): the model's own `generate` (a compressed softmax
  model decodes with its pruned K cache, a pruned linear model with its smaller state); a streamer
  stamps the time at every token it emits (after a device synchronize on CUDA): prefill = prompt to
  first token, decode = the interval between consecutive new tokens.
All after `warmup` runs; rows report the median over `repeats` runs of `new_tokens` tokens, with
min and the interquartile range in `details` (pytest-benchmark's statistics), the device and the engine.

Rows: per (context, batch) `<quantity>/c<context>b<batch>` for quantity in prefill_tokens_per_s,
decode_ms_per_token, cache_bytes, peak_memory_bytes (CUDA), and with a reference the same with a
`dense_` prefix plus decode_speedup and prefill_speedup (dense time / this model's time). Summary
rows (no "/") repeat those of the largest context and batch.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable

import torch

from harness.calibration import load_text
from harness.params import parse_ints
from harness.suite import Headline, Metric, Suite, SuiteContext


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds one call of `fn` takes (CUDA events on a GPU, perf_counter on CPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def stats(samples: list[float]) -> dict[str, float]:
    """Median, min and interquartile range of a list of timings."""
    ordered = sorted(samples)
    quartiles = statistics.quantiles(ordered, n=4) if len(ordered) > 1 else [ordered[0]] * 3
    return {
        "median": statistics.median(ordered),
        "min": ordered[0],
        "iqr": quartiles[2] - quartiles[0],
        "rounds": len(ordered),
    }


STATE_NAMES = frozenset({"recurrent_state", "recurrent_states", "conv_state", "conv_states", "state"})


def cache_bytes(cache, moved: bool = False) -> int:
    """Bytes of the tensors a generation cache holds (its own count when it keeps one). `moved`:
    the bytes one decode step moves through it instead: a recurrent or convolution state (a tensor
    under one of `STATE_NAMES`) is read and rewritten whole, so it counts twice; keys and values
    are read once."""
    weight = lambda name: 2 if moved and name in STATE_NAMES else 1  # noqa: E731
    if hasattr(cache, "nbytes") and callable(cache.nbytes):
        return sum(weight(name) * n for name, n in cache.nbytes().items())
    seen: set[int] = set()

    def walk(x, depth: int, name: str = "") -> int:
        if torch.is_tensor(x):
            if x.data_ptr() in seen or x.numel() == 0:
                return 0
            seen.add(x.data_ptr())
            return weight(name) * x.numel() * x.element_size()
        if isinstance(x, (list, tuple)):
            return sum(walk(y, depth, name) for y in x)
        if isinstance(x, dict):
            return sum(walk(y, depth, k if isinstance(k, str) else name) for k, y in x.items())
        if depth < 4 and hasattr(x, "__dict__") and not isinstance(x, torch.nn.Module):
            return sum(walk(y, depth + 1, k) for k, y in vars(x).items())
        return 0

    return walk(cache, 0)


class StepClock:
    """A `generate` streamer that only records when each token arrives."""

    def __init__(self, device: torch.device):
        self.device, self.stamps = device, []

    def put(self, _tokens) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.stamps.append(time.perf_counter())

    def end(self) -> None:
        pass

    def prefill(self) -> float:
        """Seconds from the prompt to the first new token (the prompt's forward into the cache)."""
        return self.stamps[1] - self.stamps[0]

    def steps(self) -> list[float]:
        """Seconds per decode step: between consecutive new tokens (stamps: prompt, token 1, 2, ...)."""
        return [b - a for a, b in zip(self.stamps[1:-1], self.stamps[2:])]


ENGINES = ("auto", "generate", "static")


@dataclass
class SpeedSuite(Suite):
    name = "speed"
    description = "prefill tokens/s, decode ms/token at context x batch, cache bytes, peak memory; vs the uncompressed model in the same cell"
    headlines = (
        Headline("decode_ms_per_token", "decode ms/token", "lower"),
        Headline("prefill_tokens_per_s", "prefill tokens/s", "higher"),
    )

    contexts: str = "128,512"  # prompt lengths, comma-separated
    batches: str = "1,4"
    new_tokens: int = 8  # decode steps timed per generate call
    warmup: int = 1
    repeats: int = 3
    engine: str = "auto"  # auto: the static CUDA-graph loop where it applies (CUDA), else generate

    def validate(self) -> None:
        parse_ints(self.contexts, "contexts")
        parse_ints(self.batches, "batches")
        if self.new_tokens < 2 or self.warmup < 0 or self.repeats < 1:
            raise ValueError("need new_tokens >= 2, warmup >= 0 and repeats >= 1")
        if self.engine not in ENGINES:
            raise ValueError(f"engine must be one of {', '.join(ENGINES)}, got {self.engine!r}")

    def engine_for(self, model, engine: str | None = None) -> str:
        """The engine a measurement of `model` uses: `engine` (or this suite's), `auto` resolved."""
        from harness import graph_decode

        engine = engine or self.engine
        if engine == "generate":
            return engine
        why = graph_decode.reason(model)
        if engine == "auto":
            return "static" if next(model.parameters()).is_cuda and why is None else "generate"
        if why is not None:
            raise ValueError(f"the static engine does not apply: {why}")
        return engine

    def prompts(self, tokenizer, context: int, batch: int) -> torch.Tensor:
        ids = tokenizer(load_text(None, split="heldout"), add_special_tokens=False)["input_ids"]
        rows = [
            (ids * (1 + (context * (b + 1)) // max(len(ids), 1)))[b * context : (b + 1) * context] for b in range(batch)
        ]
        return torch.tensor(rows, dtype=torch.long)

    @torch.no_grad()
    def measure(self, model, prompt: torch.Tensor, engine: str | None = None) -> dict[str, Any]:
        """Prefill and decode times, cache bytes and (CUDA) peak memory of `model` on `prompt`."""
        engine = self.engine_for(model, engine)
        device = next(model.parameters()).device
        prompt = prompt.to(device)
        once = self._static_run if engine == "static" else self._generate_run
        try:
            for _ in range(self.warmup):
                once(model, prompt)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            prefills, decodes = [], []
            for _ in range(self.repeats):
                prefill, steps, nbytes, read = once(model, prompt)
                prefills.append(prefill)
                decodes += steps
        finally:
            if engine == "static":
                from harness import graph_decode

                graph_decode.release(model)  # its cache must not stay resident beside the next model's
        result = {
            "prefill": stats(prefills),
            "decode": stats(decodes),
            "cache_bytes": nbytes,
            "engine": engine,
            "cache_read_bytes": read,
        }
        if device.type == "cuda":
            result["peak_memory"] = torch.cuda.max_memory_allocated(device)
        return result

    def _generate_run(self, model, prompt: torch.Tensor) -> tuple[float, list[float], int, int]:
        """One `generate` of `new_tokens`: (prefill s, decode step s, cache bytes, bytes a step moves
        through the cache)."""
        # transformers sizes a StaticCache to the longest one this model ever had (to spare
        # torch.compile a recompile): a short prompt after a long one would be timed and counted
        # with the long one's cache (16 x 16416 slots for 16 x 4096 after 4 x 16384)
        model.__dict__.pop("_previous_max_cache_length", None)
        pad = getattr(model.generation_config, "pad_token_id", None) or getattr(model.config, "pad_token_id", None) or 0
        clock = StepClock(prompt.device)
        out = model.generate(
            prompt,
            max_new_tokens=self.new_tokens,
            min_new_tokens=self.new_tokens,
            do_sample=False,
            pad_token_id=pad,
            return_dict_in_generate=True,
            streamer=clock,
        )
        cache = out.past_key_values  # at the end: all but the last token, about what a late step reads
        return clock.prefill(), clock.steps(), cache_bytes(cache), cache_bytes(cache, moved=True)

    def _static_run(self, model, prompt: torch.Tensor) -> tuple[float, list[float], int, int]:
        """One prefill and `new_tokens` tokens through the static decode loop (its decoder, cache
        and captured step kept between runs of the same shape); the same four values as
        `_generate_run` (the bytes a step moves: halfway through the new tokens)."""
        from harness import graph_decode

        batch, context = prompt.shape
        dec = graph_decode.decoder(
            model, batch, graph_decode.capacity_for(context, self.new_tokens), max_new_tokens=self.new_tokens
        )  # no end of sequence: every token is decoded
        first = None

        def prefill():
            nonlocal first
            first = dec.prefill(prompt)

        seconds = timed(prefill, prompt.device)
        _, steps = dec.decode(first, self.new_tokens, timed=True)
        return seconds, steps, sum(dec.state.nbytes().values()), dec.state.read_bytes(context + self.new_tokens // 2)

    def run(self, model, tokenizer, ctx: SuiteContext) -> list[Metric]:
        from harness.provenance import device_name

        contexts, batches = parse_ints(self.contexts, "contexts"), parse_ints(self.batches, "batches")
        models = {"": model, **({"dense_": ctx.reference} if ctx.reference is not None else {})}
        device = device_name(ctx.device)
        advance = ctx.progress("speed", len(contexts) * len(batches) * len(models))
        rows: list[Metric] = []
        for context in contexts:
            for batch in batches:
                prompt = self.prompts(tokenizer, context, batch)
                where = f"c{context}b{batch}"
                found = {}
                for prefix, m in models.items():  # interleaved per (context, batch): side by side
                    found[prefix] = self.measure(m, prompt)
                    advance()
                for prefix, r in found.items():
                    info = {
                        "device": device,
                        "context": context,
                        "batch": batch,
                        "new_tokens": self.new_tokens,
                        "engine": r["engine"],
                    }
                    rows += [
                        Metric(
                            f"{prefix}prefill_tokens_per_s/{where}",
                            batch * context / r["prefill"]["median"],
                            "tokens/s",
                            {**info, **r["prefill"]},
                        ),
                        Metric(
                            f"{prefix}decode_ms_per_token/{where}",
                            1e3 * r["decode"]["median"],
                            "ms",
                            {**info, **{k: v * 1e3 if k != "rounds" else v for k, v in r["decode"].items()}},
                        ),
                        Metric(f"{prefix}cache_bytes/{where}", r["cache_bytes"], "bytes", info),
                    ]
                    if "peak_memory" in r:
                        rows.append(Metric(f"{prefix}peak_memory_bytes/{where}", r["peak_memory"], "bytes", info))
                if "dense_" in found:
                    ours, dense = found[""], found["dense_"]
                    rows += [
                        Metric(
                            f"decode_speedup/{where}",
                            dense["decode"]["median"] / max(ours["decode"]["median"], 1e-12),
                            "x",
                            {"device": device},
                        ),
                        Metric(
                            f"prefill_speedup/{where}",
                            dense["prefill"]["median"] / ours["prefill"]["median"],
                            "x",
                            {"device": device},
                        ),
                    ]
        last = f"/c{contexts[-1]}b{batches[-1]}"
        summary = [
            Metric(m.name.removesuffix(last), m.value, m.unit, {**m.details, "at": last[1:]})
            for m in rows
            if m.name.endswith(last)
        ]
        return rows + summary
