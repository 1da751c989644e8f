"""Perplexity on held-out text: token-weighted, sliding window.

Each window of `seq_len` tokens advances by `stride`; only the tokens not already scored by
the previous window count (the first window scores all but its first token), so every
held-out token after the first is scored exactly once with up to `seq_len - stride` tokens
of context. Default text: the embedded corpus's held-out split.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from harness.calibration import load_text
from harness.suite import Headline, Metric, Suite, SuiteContext


@dataclass
class PerplexitySuite(Suite):
    name = "ppl"
    description = "token-weighted perplexity on held-out text (sliding window)"
    headlines = (Headline("ppl", "perplexity", "lower"),)

    seq_len: int = 256
    stride: int = 128
    limit: int = 32768  # held-out tokens scored at most (0 = all)
    batch_size: int = 8
    text_file: str | None = None

    def validate(self) -> None:
        if not 0 < self.stride <= self.seq_len:
            raise ValueError(f"need 0 < stride <= seq_len, got stride={self.stride}, seq_len={self.seq_len}")
        if self.limit < 0 or self.batch_size < 1:
            raise ValueError("limit must be >= 0 and batch_size >= 1")

    def windows(self, n_tokens: int) -> list[tuple[int, int, int]]:
        """(start, end, first scored position) for each window."""
        out, scored_to, start = [], 1, 0
        while scored_to < n_tokens:
            end = min(start + self.seq_len, n_tokens)
            out.append((start, end, scored_to))
            scored_to = end
            start = end - (self.seq_len - self.stride) if end < n_tokens else end
            start = max(start, 0)
        return out

    @torch.no_grad()
    def run(self, model, tokenizer, ctx: SuiteContext) -> list[Metric]:
        ids = tokenizer(load_text(self.text_file, split="heldout"), add_special_tokens=False)["input_ids"]
        if self.limit:
            ids = ids[: self.limit]
        tokens = torch.tensor(ids, dtype=torch.long)
        windows = self.windows(len(tokens))
        nll, count = 0.0, 0
        advance = ctx.progress("ppl", len(windows))
        device = next(model.parameters()).device
        for b in range(0, len(windows), self.batch_size):
            group = windows[b : b + self.batch_size]
            width = max(end - start for start, end, _ in group)
            batch = torch.full((len(group), width), tokenizer.pad_token_id or 0, dtype=torch.long)
            labels = torch.full((len(group), width), -100, dtype=torch.long)
            for row, (start, end, first) in enumerate(group):
                batch[row, : end - start] = tokens[start:end]
                labels[row, first - start : end - start] = tokens[first:end]
            # right padding is invisible to causal models for the real positions before it
            logits = model(input_ids=batch.to(device), use_cache=False).logits.float()
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            target = labels[:, 1:].to(device)
            mask = target != -100
            picked = logp.gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
            nll -= picked[mask].sum().item()
            count += int(mask.sum())
            advance(len(group))
        ppl = math.exp(nll / count)
        return [
            Metric("ppl", ppl, "", {"tokens": count, "seq_len": self.seq_len, "stride": self.stride}),
            Metric("nll", nll / count, "nats/token", {"tokens": count}),
        ]
