"""The decode loop: a static cache, a prefill that writes straight into it, and every one-token
step replayed from one CUDA graph.

    from harness import graph_decode
    out = graph_decode.generate(model, input_ids, attention_mask=mask, max_new_tokens=32)
    out.sequences        # (B, prompt + new) like `model.generate(...)`; out.logits with return_logits

Eager `generate` is bound by the host at decode time (hundreds of launches and several host
synchronizations per step), so bytes a compressed cache saves do not show as speed. Here:

- `Decoder` holds a model's decode state for (batch, capacity) (`harness.decode_state`: for Llama
  and Qwen2 the static pruned K cache of `harness.static_kcache`, or its dense twin for a plain
  model; for fla DeltaNet and Gated DeltaNet their recurrent and short-convolution states, allocated
  once for the batch), the step's input and output buffers, and the step captured once in a CUDA
  graph: the model's forward over one token per row with the state updated in place, the next
  token (greedy, or sampled with temperature / top-k / top-p), the end of sequence bookkeeping.
  Everything the step reads is a device tensor: a replay needs no host.
- Prefill runs the model eagerly on the prompts, rows of one length together (at most
  `prefill_tokens` tokens per forward), each row's prompt written into the state: a softmax
  model's layers write their keys and values into the stores before the next layer runs (no row's
  whole dense K is ever held beside them); a recurrent model's final states are copied into their rows.
- EOS is checked on the device; the host reads it every `check_every` steps (one synchronization
  per `check_every` tokens), and the output is trimmed to where `generate` would have stopped.
- With a graph, sibling projections that read one tensor (q/k/v/beta, gate/up) run as one GEMM
  (`harness.shared_projections`: their weights regrouped in place, no second copy); `release`
  (or `Decoder.close`) gives them their own storage back. `HARNESS_SHARED_PROJECTIONS=off` keeps
  one GEMM per projection.

On CPU (no graphs) the same step runs eagerly through the kernels' torch twins; tests check the
whole loop against eager `generate` there and, on a GPU, the captured graph against it.
`generate` falls back to the model's own `generate` where the loop does not apply (`reason`).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from dataclasses import dataclass

import torch

from harness.decode_state import plans, reason, state_for  # noqa: F401 (re-exported: the loop's public names)
from harness.shared_projections import SharedProjections

CAPACITY_ALIGN = 64  # cache capacity (prompt + new tokens) rounded up to this many tokens
PREFILL_TOKENS = 32768  # tokens per prefill forward (rows of one length grouped up to this)
# "off": a graph's step runs each projection on its own (by default sibling projections run as one
# GEMM while a decoder holds a graph: harness.shared_projections)
SHARED_PROJECTIONS_ENV = "HARNESS_SHARED_PROJECTIONS"


def shares_projections(graphs: bool) -> bool:
    """A decoder's default: sibling projections grouped with a graph, unless switched off."""
    value = os.environ.get(SHARED_PROJECTIONS_ENV, "on")
    if value not in ("on", "off"):
        raise ValueError(f"{SHARED_PROJECTIONS_ENV} must be on or off, got {value!r}")
    return graphs and value == "on"


@dataclass(frozen=True)
class Sampling:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def check(self) -> None:
        if self.do_sample and not (self.temperature > 0 and math.isfinite(self.temperature)):
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.top_k < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"need top_k >= 0 and 0 < top_p <= 1, got top_k={self.top_k}, top_p={self.top_p}")


@dataclass
class DecodeResult:
    sequences: torch.Tensor  # (B, prompt width + new), like generate: left-padded prompt, then new tokens
    new_tokens: torch.Tensor  # (B, new): pad after a row's end of sequence
    logits: torch.Tensor | None = None  # (B, new, vocab) fp32, the raw logits each token was chosen from


def rows_of(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> list[torch.Tensor]:
    """Each row's real tokens (left padding removed)."""
    if attention_mask is None:
        return list(input_ids)
    mask = attention_mask.bool()
    lengths = mask.sum(-1)
    width = input_ids.shape[1]
    if not torch.equal(mask, torch.arange(width, device=mask.device)[None, :] >= (width - lengths)[:, None]):
        raise ValueError("the static decode loop takes left-padded prompts (padding only before each row's tokens)")
    return [row[width - n :] for row, n in zip(input_ids, lengths.tolist())]


class Decoder:
    """A model's decode state for `batch` rows of up to `capacity` tokens, and its decode step
    (captured in a CUDA graph when `graphs`)."""

    def __init__(
        self,
        model,
        batch: int,
        capacity: int,
        *,
        max_new_tokens: int,
        sampling: Sampling = Sampling(),
        eos: tuple[int, ...] = (),
        pad: int = 0,
        record_logits: bool = False,
        graphs: bool | None = None,
        prefill_tokens: int = PREFILL_TOKENS,
        shared_projections: bool | None = None,
    ):
        sampling.check()
        self.model, self.batch, self.capacity = model, batch, capacity
        self.state = state_for(model, batch, capacity)
        self.device = self.state.device
        self.max_new_tokens, self.sampling, self.pad = max_new_tokens, sampling, pad
        self.graphs = self.device.type == "cuda" if graphs is None else graphs
        if self.graphs and self.device.type != "cuda":
            raise ValueError("CUDA graphs need a CUDA model")
        self.prefill_tokens = prefill_tokens
        dev = self.device
        self.eos = torch.tensor(sorted(set(eos)), dtype=torch.long, device=dev) if eos else None
        self.min_new = torch.zeros(1, dtype=torch.long, device=dev)
        self.next_ids = torch.full((batch, 1), pad, dtype=torch.long, device=dev)
        self.step = torch.zeros(1, dtype=torch.long, device=dev)
        self.done = torch.zeros(batch, dtype=torch.bool, device=dev)
        self.tokens = torch.full((batch, max_new_tokens), pad, dtype=torch.long, device=dev)
        vocab = model.config.vocab_size
        self.logits = torch.zeros(max_new_tokens, batch, vocab, device=dev) if record_logits else None
        self.graph = None
        if shared_projections is None:
            shared_projections = shares_projections(self.graphs)
        self.projections = SharedProjections(model) if shared_projections else None
        if self.graphs:
            self._capture()

    @torch.no_grad()
    def prefill(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Fill the state with the prompts (left-padded ids); the logits of each row's last token (B, V)."""
        rows = rows_of(input_ids.to(self.device), None if attention_mask is None else attention_mask.to(self.device))
        if len(rows) != self.batch:
            raise ValueError(f"this decoder holds {self.batch} rows, got {len(rows)} prompts")
        if min(len(r) for r in rows) < 1:
            raise ValueError("every prompt needs at least one token")
        if max(len(r) for r in rows) + self.max_new_tokens > self.capacity:
            raise ValueError(f"prompt + {self.max_new_tokens} new tokens exceed the cache's {self.capacity}")
        self.state.reset()
        first = torch.empty(self.batch, self.model.config.vocab_size, device=self.device)
        by_length: dict[int, list[int]] = {}
        for i, r in enumerate(rows):
            by_length.setdefault(len(r), []).append(i)
        for length, members in by_length.items():
            per = max(1, self.prefill_tokens // length)
            for lo in range(0, len(members), per):
                chunk = members[lo : lo + per]
                first[chunk] = self.prefill_rows(chunk, torch.stack([rows[i] for i in chunk]))
        return first

    @torch.no_grad()
    def prefill_rows(self, rows: list[int], ids: torch.Tensor) -> torch.Tensor:
        """One forward over the prompts `ids` (n, P) of rows `rows`, writing them into the state;
        the logits of their last tokens (n, V) fp32."""
        return self.state.prefill_rows(rows, ids.to(self.device))

    # --- one step ---------------------------------------------------------------------------------
    def _choose(self, logits: torch.Tensor) -> torch.Tensor:
        s = self.sampling
        if not s.do_sample:
            return logits.argmax(-1)
        logits = logits / s.temperature
        if s.top_k:
            kth = logits.topk(min(s.top_k, logits.shape[-1]), -1).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if s.top_p < 1:
            ordered, index = logits.sort(-1, descending=True)
            probs = ordered.softmax(-1)
            drop = (probs.cumsum(-1) - probs) > s.top_p  # keep the smallest prefix whose mass reaches top_p
            logits = torch.full_like(logits, float("-inf")).scatter(-1, index, ordered.masked_fill(drop, float("-inf")))
        probs = logits.softmax(-1)
        # exponential race: argmax(p / E), E ~ Exp(1), picks index i with probability p_i
        return (probs / torch.empty_like(probs).exponential_()).argmax(-1)

    def _emit(self, logits: torch.Tensor) -> None:
        """Choose each row's next token from `logits` (B, V), record it, feed it back."""
        logits = logits.float()
        if self.logits is not None:
            self.logits.index_copy_(0, self.step, logits[None])
        if self.eos is not None:  # no end of sequence before min_new_tokens
            eos_logits = logits[:, self.eos]
            logits[:, self.eos] = torch.where(self.step < self.min_new, float("-inf"), eos_logits)
        token = torch.where(self.done, self.pad, self._choose(logits))
        self.tokens.index_copy_(1, self.step, token[:, None])
        if self.eos is not None:
            self.done |= (token[:, None] == self.eos[None, :]).any(-1)
        self.next_ids.copy_(token[:, None])
        self.step.add_(1)

    def _step(self) -> None:
        with self.projections.routed() if self.projections is not None else contextlib.nullcontext():
            self._emit(self.state.step(self.next_ids))

    def _capture(self) -> None:
        """Warm up (compiles the kernels) and capture `_step`. Both write the state (a softmax
        cache at each row's current length), so they run before the prefill, which overwrites it."""
        with self.state.context(), torch.no_grad():
            self._reset_outputs()
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side):
                for _ in range(2):
                    self._step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(self.graph):
                self._step()
        self.state.reset()
        self._reset_outputs()

    def _reset_outputs(self) -> None:
        self.step.zero_()
        self.done.zero_()
        self.tokens.fill_(self.pad)
        self.next_ids.fill_(self.pad)

    # --- the loop ---------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(
        self,
        first_logits: torch.Tensor,
        max_new_tokens: int,
        *,
        min_new_tokens: int = 0,
        check_every: int = 16,
        timed: bool = False,
    ) -> tuple[int, list[float]]:
        """Tokens 1..max_new_tokens after a prefill: the first from `first_logits`, each next one a
        step. Returns (steps run, seconds per step when `timed` on CUDA)."""
        if max_new_tokens > self.max_new_tokens:
            raise ValueError(f"this decoder holds {self.max_new_tokens} new tokens, asked for {max_new_tokens}")
        self._reset_outputs()
        self.min_new.fill_(min_new_tokens)
        self._emit(first_logits)
        clock = _Clock(self.device) if timed else None
        n = 1
        with contextlib.ExitStack() as stack:
            if self.graph is None:
                stack.enter_context(self.state.context())
            while n < max_new_tokens:
                if self.graph is not None:
                    self.graph.replay()
                else:
                    self._step()
                n += 1
                if clock is not None:
                    clock.mark()
                if self.eos is not None and n % check_every == 0 and bool(self.done.all()):
                    break
        return n, [] if clock is None else clock.intervals()

    def close(self) -> None:
        """Drop the graph and give the model's projections their own storage back (a decoder's
        model cannot be saved before: grouped weights share storage)."""
        self.graph = None
        if self.projections is not None:
            self.projections.restore()
            self.projections = None

    def result(self, input_ids: torch.Tensor, n: int) -> DecodeResult:
        """The first `n` new tokens (trimmed where generate stops: every row past its end) after `input_ids`."""
        tokens = self.tokens[:, :n]
        if self.eos is not None and n:
            ended = (tokens[:, :, None] == self.eos[None, None, :]).any(-1)
            if bool(ended.any(-1).all()):
                n = int(ended.float().argmax(-1).max()) + 1
                tokens = tokens[:, :n]
        logits = None if self.logits is None else self.logits[:n].transpose(0, 1).clone()
        return DecodeResult(torch.cat([input_ids.to(tokens.device), tokens], 1), tokens.clone(), logits)


class _Clock:
    """Marks between decode steps: CUDA events on a GPU (no synchronization until the end), the
    host clock elsewhere."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.marks: list = []
        self.mark()

    def mark(self) -> None:
        if self.cuda:
            event = torch.cuda.Event(enable_timing=True)
            event.record()
            self.marks.append(event)
        else:
            self.marks.append(time.perf_counter())

    def intervals(self) -> list[float]:
        """Seconds between consecutive marks."""
        if self.cuda:
            self.marks[-1].synchronize()
            return [a.elapsed_time(b) / 1e3 for a, b in zip(self.marks, self.marks[1:])]
        return [b - a for a, b in zip(self.marks, self.marks[1:])]


def capacity_for(prompt_tokens: int, max_new_tokens: int) -> int:
    need = prompt_tokens + max_new_tokens
    return -(-need // CAPACITY_ALIGN) * CAPACITY_ALIGN


def decoder(model, batch: int, capacity: int, **options) -> Decoder:
    """The model's decoder for these shapes, reused while they stay the same (one kept per model:
    a new shape frees the old cache first)."""
    options = {**options, "eos": tuple(sorted(set(options.get("eos", ()))))}
    key = (batch, capacity, tuple(sorted(options.items())))
    held: Decoder | None = model.__dict__.get("_harness_decoder")
    if held is not None and held.made_with == key:
        return held
    release(model)
    made = Decoder(model, batch, capacity, **options)
    made.made_with = key  # what `decoder` built it for
    model.__dict__["_harness_decoder"] = made
    return made


def release(model) -> None:
    """Free the model's decoder (its cache and graph)."""
    held = model.__dict__.pop("_harness_decoder", None)
    if held is not None:
        held.close()
        del held
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def eos_ids(model, eos_token_id) -> tuple[int, ...]:
    if eos_token_id is None:
        eos_token_id = getattr(model.generation_config, "eos_token_id", None)
    if eos_token_id is None:
        return ()
    return tuple(int(t) for t in (eos_token_id if isinstance(eos_token_id, (list, tuple)) else [eos_token_id]))


@torch.no_grad()
def generate(
    model,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    *,
    max_new_tokens: int,
    min_new_tokens: int = 0,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    eos_token_id=None,
    pad_token_id: int | None = None,
    graphs: bool | None = None,
    return_logits: bool = False,
    check_every: int = 16,
) -> DecodeResult:
    """`model.generate` through the static decode loop (greedy or sampling); see the module doc."""
    if pad_token_id is None:
        pad_token_id = getattr(model.generation_config, "pad_token_id", None) or 0
    rows = rows_of(input_ids, attention_mask)
    capacity = capacity_for(max(len(r) for r in rows), max_new_tokens)
    dec = decoder(
        model,
        len(rows),
        capacity,
        max_new_tokens=max_new_tokens,
        sampling=Sampling(do_sample, temperature, top_k, top_p),
        eos=eos_ids(model, eos_token_id),
        pad=int(pad_token_id),
        record_logits=return_logits,
        graphs=graphs,
    )
    first = dec.prefill(input_ids, attention_mask)
    n, _ = dec.decode(first, max_new_tokens, min_new_tokens=min_new_tokens, check_every=check_every)
    return dec.result(input_ids, n)


def generate_or_fallback(
    model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, **kwargs
) -> torch.Tensor:
    """Sequences (B, prompt + new): through the decode loop on CUDA where it applies, else the
    model's own `generate` (the CPU path, and the reference everywhere). kwargs: generate's
    max_new_tokens, min_new_tokens, do_sample, eos_token_id, pad_token_id."""
    param = next(model.parameters(), None)
    if param is not None and param.is_cuda and reason(model) is None:
        return generate(model, input_ids, attention_mask, **kwargs).sequences
    return model.generate(input_ids, attention_mask=attention_mask, **kwargs)
