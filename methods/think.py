"""ThinK: query-driven key-channel pruning, chosen per sequence at prefill.

Xu et al., "ThinK: Thinner Key Cache by Query-Driven Pruning" (arXiv 2407.21018). Per KV head,
channel c scores (mean over the last `window` prompt queries of q_c^2) * (mean over the prompt's
keys of k_c^2), the queries of every head sharing the KV head pooled (GQA); the lowest-scoring
channels leave the cache. The choice depends on the prompt, so `select` only fixes the count
per head; the K cache calls `choose_at_prefill` on each sequence's prompt and then stores only
the chosen channels of middle keys (real memory reduction, not zeroed channels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from harness import params
from harness.method import SOFTMAX_FAMILIES, CacheWindow, Method, keep_count
from harness.selection import ChannelSelection, LayerSelection


@dataclass
class ThinK(CacheWindow, Method):
    name = "think"
    families = SOFTMAX_FAMILIES
    paper = "Xu et al. 2024, ThinK, arXiv 2407.21018"
    needs = frozenset()

    window: int = 32  # observation window: the last prompt queries that score channels

    def validate(self) -> None:
        self.validate_window()
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}")

    def select(self, layers, ratio, family, progress=None) -> ChannelSelection:
        chosen = {}
        for layer in layers:
            n_keep = keep_count(layer.head_dim, ratio)
            # placeholder indices: the real ones are chosen per sequence (meta says so)
            chosen[layer.index] = LayerSelection(
                layer.head_dim, layer.value_dim, tuple(tuple(range(n_keep)) for _ in range(layer.num_heads))
            )
            if progress is not None:
                progress()
        counts = {sel.kept_counts[0] for sel in chosen.values()}
        meta = {
            **self.window_meta(),
            "prefill_chooser": {"method": self.name, "params": params.as_dict(self), "count": counts.pop()},
        }
        return ChannelSelection(family=family, layers=chosen, method=self.name, ratio=ratio, meta=meta)

    def choose_at_prefill(
        self, query: torch.Tensor, keys: torch.Tensor, pads: torch.Tensor | None, count: int
    ) -> torch.Tensor:
        """query (B, Hq, L, d), keys (B, Hkv, T, d), pads (B,) left padding -> kept (B, Hkv, count)."""
        b, hkv, total, d = keys.shape
        recent_q = query[:, :, -self.window :].float()
        q_energy = recent_q.reshape(b, hkv, -1, d).pow(2).mean(2)  # GQA: a KV head's query heads pooled
        real = torch.ones(b, total, dtype=torch.bool, device=keys.device)
        if pads is not None:
            real = torch.arange(total, device=keys.device)[None, :] >= pads.to(keys.device)[:, None]
        k_sq = keys.float().pow(2) * real[:, None, :, None]
        k_energy = k_sq.sum(2) / real.sum(-1).clamp(min=1)[:, None, None]
        return (q_energy * k_energy).topk(count, dim=-1).indices
