"""A K cache that stores middle keys with their kept channels only (LeanK / ThinK realization).

Per layer, the cache holds three segments in slot order:
- head: the first `sink + max(pads)` slots, full keys and values (every row's first `sink`
  real tokens are full; with left padding the rows' sinks start at different slots, so the
  head is sized for the most padded row and the attention treats the extra slots as middle);
- middle: per group of heads that keep the same channel count, the kept channels of the keys
  (`B x heads x tokens x count`); values for heads that keep channels; for heads that keep none,
  only a running sum of the middle values (`value_sum` on, the default);
- window: the last `recent` slots, full keys and values.
`update` appends new tokens to the window; the attention call reads all three segments
(`harness.kernels.pruned_attention.pruned_cache_attention`) and then `compact`s, moving slots that
left the window into the head (while it fills) or into the middle (keeping kept channels only).
So the memory a long context holds is what the selection keeps, and `nbytes` counts it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from harness.selection import DEFAULT_RECENT, DEFAULT_SINK


@dataclass
class KeyChannelPlan:
    """How one attention layer's keys are pruned: kept channels per KV head and the window."""

    num_heads: int  # KV heads
    head_dim: int
    value_dim: int
    kept: tuple[tuple[int, ...], ...] | None  # per KV head; None = chosen at prefill by `chooser`
    sink: int = DEFAULT_SINK
    recent: int = DEFAULT_RECENT
    value_sum: bool = True  # heads that keep 0 channels store a running sum of middle values
    full_prefill: bool = False  # the first forward (the prompt) attends with all channels
    chooser: Callable | None = None  # (query_window (B,Hq,W,d), keys (B,Hkv,T,d)) -> kept (B,Hkv,c)
    count: int = 0  # channels per head when `chooser` picks them

    def key_scale(self, device=None) -> torch.Tensor:
        """(Hkv, d) 0/1 mask of kept channels (static plans only)."""
        scale = torch.zeros(self.num_heads, self.head_dim)
        for h, idx in enumerate(self.kept or ()):
            scale[h, list(idx)] = 1.0
        return scale.to(device) if device is not None else scale

    def groups(self, batch: int, device) -> list["HeadGroup"]:
        by_count: dict[int, list[int]] = {}
        for h, idx in enumerate(self.kept):
            by_count.setdefault(len(idx), []).append(h)
        out = []
        for count, heads in sorted(by_count.items(), reverse=True):
            channels = torch.tensor([self.kept[h] for h in heads], dtype=torch.long, device=device).reshape(
                len(heads), count
            )
            out.append(HeadGroup(torch.tensor(heads, device=device), channels[None].expand(batch, -1, -1).contiguous()))
        return out


# Middle storage grows in place: a decode step appends one slot instead of copying the whole
# middle (which would move the cache through memory at every step). The first fill (the prompt)
# is allocated exactly; a later append that does not fit regrows with 1/8 of the middle (at
# least one slot) to spare: amortized, a decode step copies 8 slots, not the whole middle.
GROWTH_FRACTION = 1 / 8


def _append(store: torch.Tensor | None, used: int, new: torch.Tensor) -> torch.Tensor:
    """Write `new` (B, H, n, w) after the first `used` slots of `store` (B, H, capacity, w),
    regrowing it when full; returns the store (possibly a new tensor)."""
    need = used + new.shape[-2]
    if store is None or store.shape[-2] < need:
        spare = 0 if store is None else max(1, int(used * GROWTH_FRACTION))
        grown = new.new_empty(*new.shape[:-2], need + spare, new.shape[-1])
        if used:
            grown[:, :, :used].copy_(store[:, :, :used])
        store = grown
    store[:, :, used:need].copy_(new)
    return store


@dataclass
class HeadGroup:
    """KV heads that keep the same number of channels, and their middle storage."""

    heads: torch.Tensor  # (Hg,)
    channels: torch.Tensor  # (B, Hg, count)
    mid_keys: torch.Tensor | None = None  # (B, Hg, n_mid, count): a view of keys_store
    mid_values: torch.Tensor | None = None  # (B, Hg, n_mid, dv): a view of values_store
    value_sum: torch.Tensor | None = None  # (B, Hg, dv) float32, heads keeping 0 channels
    keys_store: torch.Tensor | None = None  # (B, Hg, capacity, count)
    values_store: torch.Tensor | None = None  # (B, Hg, capacity, dv)

    @property
    def count(self) -> int:
        return self.channels.shape[-1]

    def append(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Append middle slots: kept-channel keys (B, Hg, n, count) and values (B, Hg, n, dv)."""
        used = 0 if self.mid_keys is None else self.mid_keys.shape[-2]
        self.keys_store = _append(self.keys_store, used, keys)
        self.values_store = _append(self.values_store, used, values)
        n = used + keys.shape[-2]
        self.mid_keys, self.mid_values = self.keys_store[:, :, :n], self.values_store[:, :, :n]


def _cat(old: torch.Tensor | None, new: torch.Tensor, dim: int = -2) -> torch.Tensor:
    return new if old is None else torch.cat([old, new], dim=dim)


class PrunedKLayer(CacheLayerMixin):
    is_sliding = False
    is_compileable = False
    is_croppable = False

    def __init__(self, plan: KeyChannelPlan):
        super().__init__()
        self.plan = plan
        self.num_heads, self.head_dim, self.value_dim = plan.num_heads, plan.head_dim, plan.value_dim
        self.sink, self.recent = plan.sink, plan.recent
        self.pads: torch.Tensor | None = None  # per-row left padding, fixed by the first attention call
        self.head_len = 0  # slots the head segment holds once full
        self.groups: list[HeadGroup] = []
        self.head_k = self.head_v = self.win_k = self.win_v = None
        self.n_mid = 0

    # --- transformers' cache-layer interface ------------------------------------------------
    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        self.win_k = _cat(self.win_k, key_states)
        self.win_v = _cat(self.win_v, value_states)
        return self, self  # the attention function recognizes the layer and reads its segments

    def get_seq_length(self) -> int:
        return sum(self.segment_lengths())

    def get_mask_sizes(self, query_length) -> tuple[int, int]:
        if isinstance(query_length, torch.Tensor):  # older transformers pass cache_position
            query_length = query_length.shape[0]
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self.plan)

    def reorder_cache(self, beam_idx) -> None:
        raise NotImplementedError("beam search is not supported with a pruned K cache; use greedy or sampling")

    # --- segments -----------------------------------------------------------------------------
    def segment_lengths(self) -> tuple[int, int, int]:
        head = 0 if self.head_k is None else self.head_k.shape[-2]
        win = 0 if self.win_k is None else self.win_k.shape[-2]
        return head, self.n_mid, win

    def _empty(self, width: int) -> torch.Tensor:
        b = self.win_k.shape[0]
        return self.win_k.new_zeros(b, self.num_heads, 0, width)

    def head_keys(self, group: HeadGroup) -> torch.Tensor:
        return (self.head_k if self.head_k is not None else self._empty(self.head_dim)).index_select(1, group.heads)

    def head_values(self, group: HeadGroup) -> torch.Tensor:
        return (self.head_v if self.head_v is not None else self._empty(self.value_dim)).index_select(1, group.heads)

    def window_keys(self, group: HeadGroup) -> torch.Tensor:
        return self.win_k.index_select(1, group.heads)

    def window_values(self, group: HeadGroup) -> torch.Tensor:
        return self.win_v.index_select(1, group.heads)

    def set_channels(self, kept: torch.Tensor | None) -> None:
        """Fix the per-head channels: from the static plan, or `kept` (B, Hkv, c) chosen at prefill."""
        batch = self.win_k.shape[0]
        if kept is None:
            self.groups = self.plan.groups(batch, self.win_k.device)
        else:
            heads = torch.arange(self.num_heads, device=self.win_k.device)
            self.groups = [HeadGroup(heads, kept.to(self.win_k.device).sort(-1).values)]

    def start(self, pads: torch.Tensor, kept: torch.Tensor | None = None) -> None:
        """At the first attention call: fix each row's left padding (sizes the head) and the channels."""
        self.pads = pads.cpu()
        self.head_len = self.sink + (int(pads.max()) if len(pads) else 0)
        self.set_channels(kept)

    def compact(self) -> None:
        """After an attention call: fill the head, then move slots older than `recent` to the middle."""
        head, _, win = self.segment_lengths()
        take = min(self.head_len - head, win)
        if take > 0:
            self.head_k = _cat(self.head_k, self.win_k[:, :, :take])
            self.head_v = _cat(self.head_v, self.win_v[:, :, :take])
            self.win_k, self.win_v = self.win_k[:, :, take:], self.win_v[:, :, take:]
        excess = self.win_k.shape[-2] - self.recent
        if excess <= 0:
            return
        old_k, old_v = self.win_k[:, :, :excess], self.win_v[:, :, :excess]
        for g in self.groups:
            keys = old_k.index_select(1, g.heads)
            if g.count or not self.plan.value_sum:
                idx = g.channels[:, :, None, :].expand(-1, -1, excess, -1)
                g.append(keys.gather(-1, idx), old_v.index_select(1, g.heads))
            else:
                part = old_v.index_select(1, g.heads).float().sum(-2)
                g.value_sum = part if g.value_sum is None else g.value_sum + part
        self.n_mid += excess
        # clone: a slice would keep the whole old window buffer alive
        self.win_k, self.win_v = self.win_k[:, :, excess:].clone(), self.win_v[:, :, excess:].clone()

    def nbytes(self) -> dict[str, int]:
        """Bytes this layer's storage allocates, split into keys and values (the middle's spare
        room for decoded tokens included: at most GROWTH_FRACTION of it, or one slot)."""

        def size(t):
            return 0 if t is None else t.numel() * t.element_size()

        keys = size(self.head_k) + size(self.win_k) + sum(size(g.keys_store) for g in self.groups)
        values = (
            size(self.head_v) + size(self.win_v) + sum(size(g.values_store) + size(g.value_sum) for g in self.groups)
        )
        return {"keys": keys, "values": values}


class PrunedKCache(Cache):
    """One PrunedKLayer per attention layer, built from the plans a softmax adapter installed.

    In a hybrid model (`layer_ids`: the model layer index of each plan, `num_layers`: all layers)
    the other layers get transformers' own linear-attention cache layers (conv and recurrent state).
    """

    def __init__(self, plans: list[KeyChannelPlan], layer_ids: list[int] | None = None, num_layers: int | None = None):
        layers = [PrunedKLayer(p) for p in plans]
        if layer_ids is not None and num_layers is not None and num_layers != len(plans):
            from transformers.cache_utils import LinearAttentionLayer

            by_id = dict(zip(layer_ids, layers))
            layers = [by_id[i] if i in by_id else LinearAttentionLayer() for i in range(num_layers)]
        super().__init__(layers=layers)

    def nbytes(self) -> dict[str, int]:
        total = {"keys": 0, "values": 0}
        for layer in (x for x in self.layers if isinstance(x, PrunedKLayer)):
            for k, v in layer.nbytes().items():
                total[k] += v
        return total
