"""A static pruned K cache: every store allocated once for (batch, capacity), lengths on the device.

Per attention layer and row, over the row's own token slots 0..len-1 (no padding is stored: a
left-padded prompt's row keeps its real tokens only, so its sink starts at slot 0):

- head: slots [0, sink), full keys and values: (B, Hkv, sink, d | dv);
- ring: the last W = recent + 1 slots past the sink, full keys and values: (B, Hkv, W, d | dv),
  slot s at position (s - sink) % W;
- middle: slots sink .. len - W - 1, which have left the ring, per group of KV heads keeping the
  same number c of channels: their kept key channels (B, Hg, M, c) and values (B, Hg, M, dv),
  M = capacity - sink - W; heads keeping 0 channels (`value_sum`, the default) keep only the fp32
  running sum of their middle values (B, Hs, dv). The groups' stores are views of one flat key
  store and one flat value store per layer.

A decode step at slot t = lengths[row] (`harness.kernels.static_decode`): `update` appends (the
ring slot t - W moves to the middle, token t takes its place), the attention reads head, middle
and ring with LeanK's rule (full channels for the first `sink` slots and the last `recent`), and
the decode loop's `advance` adds 1 to every length. What a step reads and writes depends on
`lengths` only: no host synchronization, no allocation, no shape change, so a CUDA graph replays
it. The same cache with every channel kept is the dense twin (`all_channels`): a static K/V
cache decoded by the same loop and the same kernel.

Prefill (`prefilling`) runs the model on some rows' prompts of one length; each layer's
attention (`static_attention`, registered as the attention implementation `harness_static`)
attends over the prompt's dense keys and values of that layer (with all channels, LeanK's
deployment, or by the rule), then `commit`s them into the stores: the prompt's dense K of one
layer of those rows is all that exists beside the stores.
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from harness.kcache import KeyChannelPlan
from harness.kernels.pruned_attention import masked_attention
from harness.kernels.static_decode import static_append, static_decode_attention

ATTN_IMPLEMENTATION = "harness_static"
PREFILL_QUERY_CHUNK = 256  # queries per chunk of the rule-based (not full-channel) prefill attention


@dataclass
class StaticGroup:
    """KV heads keeping the same number of channels, and their middle stores."""

    heads: torch.Tensor  # (Hg,) long
    channels: torch.Tensor  # (B, Hg, c) long: the kept channels of each (row, head)
    keys: torch.Tensor  # (B, Hg, M, c): a view of the layer's flat key store
    values: torch.Tensor  # (B, Hg, M, dv): a view of the layer's flat value store

    @property
    def count(self) -> int:
        return self.channels.shape[-1]


def all_channels(plan: KeyChannelPlan) -> KeyChannelPlan:
    """The dense twin of `plan`: every head keeps every channel (same window)."""
    full = tuple(tuple(range(plan.head_dim)) for _ in range(plan.num_heads))
    return dataclasses.replace(plan, kept=full, chooser=None, count=0, full_prefill=True)


class StaticKLayer:
    """One attention layer's stores for `batch` rows of up to `capacity` tokens."""

    def __init__(self, plan: KeyChannelPlan, batch: int, capacity: int, dtype: torch.dtype, device):
        self.plan = plan
        self.num_heads, self.head_dim, self.value_dim = plan.num_heads, plan.head_dim, plan.value_dim
        self.sink, self.recent = plan.sink, plan.recent
        self.window = plan.recent + 1
        self.batch, self.tokens = batch, capacity
        self.capacity = max(0, capacity - self.sink - self.window)  # middle slots per row
        b, h, d, dv, m = batch, plan.num_heads, plan.head_dim, plan.value_dim, self.capacity
        counts = [plan.count] * h if plan.kept is None else [len(k) for k in plan.kept]
        sums = [i for i, c in enumerate(counts) if c == 0 and plan.value_sum and plan.kept is not None]
        by_count: dict[int, list[int]] = {}
        for i, c in enumerate(counts):
            if i not in sums:
                by_count.setdefault(c, []).append(i)

        def zeros(*shape, dt=dtype):
            return torch.zeros(*shape, dtype=dt, device=device)

        self.head_k, self.head_v = zeros(b, h, self.sink, d), zeros(b, h, self.sink, dv)
        self.ring_k, self.ring_v = zeros(b, h, self.window, d), zeros(b, h, self.window, dv)
        ordered = sorted(by_count.items(), reverse=True)
        self.keys_flat = zeros(sum(b * len(hs) * m * c for c, hs in ordered))
        self.values_flat = zeros(sum(b * len(hs) * m * dv for _, hs in ordered))
        self.key_offsets = torch.zeros(b, h, dtype=torch.long)
        self.value_offsets = torch.zeros(b, h, dtype=torch.long)
        self.groups: list[StaticGroup] = []
        k_at = v_at = 0
        for c, heads in ordered:
            hg = len(heads)
            if plan.kept is None:
                kept = torch.arange(c).expand(b, hg, c)  # placeholders: a chooser sets them at prefill
            else:
                kept = torch.tensor([plan.kept[i] for i in heads], dtype=torch.long).reshape(hg, c).expand(b, hg, c)
            keys = self.keys_flat[k_at : k_at + b * hg * m * c].view(b, hg, m, c)
            values = self.values_flat[v_at : v_at + b * hg * m * dv].view(b, hg, m, dv)
            for j, head in enumerate(heads):
                self.key_offsets[:, head] = k_at + (torch.arange(b) * hg + j) * m * c
                self.value_offsets[:, head] = v_at + (torch.arange(b) * hg + j) * m * dv
            self.groups.append(
                StaticGroup(torch.tensor(heads, device=device), kept.contiguous().to(device), keys, values)
            )
            k_at, v_at = k_at + keys.numel(), v_at + values.numel()
        self.key_offsets, self.value_offsets = self.key_offsets.to(device), self.value_offsets.to(device)
        self.num_sum_heads = len(sums)
        self.sum_heads = torch.tensor(sums, device=device) if sums else None
        self.value_sum = zeros(b, len(sums), dv, dt=torch.float32) if sums else None
        index = torch.full((h,), -1, dtype=torch.int32)
        index[sums] = torch.arange(len(sums), dtype=torch.int32)
        self.sum_index = index.to(device)  # each head's index among the value-sum heads, -1 for the others
        self.counts = torch.tensor(counts, dtype=torch.int32, device=device)
        self.channel_table = torch.zeros(b, h, d, dtype=torch.int32, device=device)  # kept channels, padded
        self.keep = torch.zeros(b, h, d, dtype=torch.float32, device=device)  # 0/1 per channel
        for g in self.groups:
            self._set_channels(g, torch.arange(b, device=device), g.channels.clone())
        self.dense = plan.kept is not None and all(c == d for c in counts)

    # --- channels -------------------------------------------------------------------------------
    def _set_channels(self, group: StaticGroup, rows: torch.Tensor, channels: torch.Tensor) -> None:
        """Kept channels (n, Hg, c) of `group` for the rows `rows` (n,), in every table that holds them."""
        group.channels[rows] = channels
        table = torch.zeros(*channels.shape[:-1], self.head_dim, dtype=torch.int32, device=channels.device)
        table[..., : group.count] = channels.to(torch.int32)
        keep = torch.zeros(*channels.shape[:-1], self.head_dim, device=channels.device).scatter_(-1, channels, 1.0)
        self.channel_table[rows[:, None], group.heads[None, :]] = table
        self.keep[rows[:, None], group.heads[None, :]] = keep

    def choose(self, rows: list[int], kept: torch.Tensor) -> None:
        """Channels chosen at prefill for `rows` (a chooser plan: one group, every head): kept (n, Hkv, c)."""
        (group,) = self.groups
        index = torch.tensor(rows, device=group.channels.device)
        self._set_channels(group, index, kept.sort(-1).values.to(group.channels.device))

    # --- prefill --------------------------------------------------------------------------------
    def commit(self, rows: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write the prompts of `rows` (all of one length P): keys (n, Hkv, P, d), values (n, Hkv, P, dv)."""
        n, _, length, _ = keys.shape
        sink, window = self.sink, self.window
        n_mid = max(0, length - window - sink)
        if length > self.tokens or n_mid > self.capacity:
            raise ValueError(f"a prompt of {length} tokens does not fit a static cache of {self.tokens}")
        index = torch.tensor(rows, device=keys.device)
        head = min(length, sink)
        self.head_k[index, :, :head] = keys[:, :, :head]
        self.head_v[index, :, :head] = values[:, :, :head]
        middle_k, middle_v = keys[:, :, sink : sink + n_mid], values[:, :, sink : sink + n_mid]
        for g in self.groups:
            idx = g.channels[index][:, :, None, :].expand(-1, -1, n_mid, -1)
            g.keys[index, :, :n_mid] = middle_k.index_select(1, g.heads).gather(-1, idx)
            g.values[index, :, :n_mid] = middle_v.index_select(1, g.heads)
        if self.value_sum is not None:
            self.value_sum[index] = middle_v.index_select(1, self.sum_heads).float().sum(-2)
        slots = torch.arange(min(length, max(sink, length - window)), length, device=keys.device)
        positions = (slots - sink) % window
        self.ring_k[index[:, None], :, positions[None, :]] = keys[:, :, slots].transpose(1, 2)
        self.ring_v[index[:, None], :, positions[None, :]] = values[:, :, slots].transpose(1, 2)

    def prefill_attention(self, rows: list[int], query, keys, values, scaling: float) -> torch.Tensor:
        """Attention of the prompts of `rows` over themselves, then `commit`; (n, P, Hq, dv)."""
        plan = self.plan
        if plan.chooser is not None:
            self.choose(rows, plan.chooser(query, keys, torch.zeros(len(rows), dtype=torch.long)))
        if self.dense or plan.full_prefill:
            out = causal_attention(query, keys, values, scaling)
        else:  # LeanK's rule inside the prompt too: the dense reference, a chunk of queries at a time
            scale = self.keep[torch.tensor(rows, device=self.keep.device)]
            out = rule_attention(query, keys, values, scale, sink=self.sink, recent=self.recent, scaling=scaling)
        self.commit(rows, keys, values)
        return out

    # --- bookkeeping ----------------------------------------------------------------------------
    def reset(self) -> None:
        if self.value_sum is not None:
            self.value_sum.zero_()

    def read_bytes(self, length: int) -> int:
        """Bytes a decode step reads from the stores when every row holds `length` tokens, the
        new one included: head and ring slots in full, middle slots' kept channels and values,
        the value sums."""
        t = length - 1  # the new token's slot
        elem = self.head_k.element_size()
        full_slots = min(t + 1, self.sink) + (t - max(self.sink, t - self.recent) + 1 if t >= self.sink else 0)
        n_mid = max(0, t - self.recent - self.sink)
        full = self.batch * self.num_heads * full_slots * (self.head_dim + self.value_dim) * elem
        middle = sum(self.batch * len(g.heads) * n_mid * (g.count + self.value_dim) * elem for g in self.groups)
        sums = 0 if self.value_sum is None else self.value_sum.numel() * self.value_sum.element_size()
        return full + middle + sums

    def nbytes(self) -> dict[str, int]:
        """Bytes this layer's stores allocate (the whole capacity), split into keys and values."""

        def size(t):
            return 0 if t is None else t.numel() * t.element_size()

        keys = size(self.head_k) + size(self.ring_k) + size(self.keys_flat)
        values = size(self.head_v) + size(self.ring_v) + size(self.values_flat) + size(self.value_sum)
        return {"keys": keys, "values": values}


def causal_attention(query, keys, values, scaling: float) -> torch.Tensor:
    """Plain causal attention of a prompt over itself (GQA by repeating K/V heads); (n, P, Hq, dv)."""
    n_rep = query.shape[1] // keys.shape[1]
    if n_rep > 1:
        keys, values = keys.repeat_interleave(n_rep, 1), values.repeat_interleave(n_rep, 1)
    out = torch.nn.functional.scaled_dot_product_attention(
        query, keys, values, is_causal=query.shape[2] > 1, scale=scaling
    )
    return out.transpose(1, 2)


def rule_attention(
    query, keys, values, key_scale, *, sink: int, recent: int, scaling: float, chunk: int = PREFILL_QUERY_CHUNK
) -> torch.Tensor:
    """The prompt's attention with LeanK's rule (middle keys through the kept channels), by
    `masked_attention` over chunks of queries (scores of chunk x prompt at a time); (n, P, Hq, dv)."""
    length = query.shape[2]
    parts = []
    for lo in range(0, length, chunk):
        hi = min(length, lo + chunk)
        slots = torch.arange(hi, device=query.device)
        causal = slots[None, :] <= torch.arange(lo, hi, device=query.device)[:, None]  # (L, hi)
        parts.append(
            masked_attention(
                query[:, :, lo:hi],
                keys[:, :, :hi],
                values[:, :, :hi],
                causal[None, None],
                key_scale=key_scale,
                sink=sink,
                recent=recent,
                scaling=scaling,
            )
        )
    return torch.cat(parts, 1)


@dataclass
class DecodeView:
    """What `StaticKCache.update` hands the attention function at a decode step."""

    layer: StaticKLayer
    lengths: torch.Tensor


@dataclass
class PrefillView:
    """What `StaticKCache.update` hands the attention function during prefill."""

    layer: StaticKLayer
    rows: list[int]
    keys: torch.Tensor
    values: torch.Tensor


class StaticKCache:
    """One StaticKLayer per attention layer (keyed by the attention module's `layer_idx`) and the
    per-row lengths they share. Passed to the decoder layers as their cache."""

    def __init__(self, plans: dict[int, KeyChannelPlan], batch: int, capacity: int, dtype: torch.dtype, device):
        self.layers = {i: StaticKLayer(p, batch, capacity, dtype, device) for i, p in plans.items()}
        self.batch, self.capacity = batch, capacity
        self.lengths = torch.zeros(batch, dtype=torch.int32, device=device)  # tokens each row holds
        self._prefill_rows: list[int] | None = None

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        layer = self.layers[layer_idx]
        if self._prefill_rows is not None:
            view = PrefillView(layer, self._prefill_rows, key_states, value_states)
        else:
            static_append(layer, key_states, value_states, self.lengths)
            view = DecodeView(layer, self.lengths)
        return view, view

    @contextlib.contextmanager
    def prefilling(self, rows: list[int]):
        """Forward passes inside write the prompts of `rows` (one length P), then set their lengths."""
        self._prefill_rows = rows
        try:
            yield
        finally:
            self._prefill_rows = None

    def set_lengths(self, rows: list[int], length: int) -> None:
        self.lengths[torch.tensor(rows, device=self.lengths.device)] = length

    def advance(self) -> None:
        """After a decode step: every row holds one more token."""
        self.lengths.add_(1)

    def reset(self) -> None:
        self.lengths.zero_()
        for layer in self.layers.values():
            layer.reset()

    def read_bytes(self, length: int) -> int:
        """Bytes a decode step reads from every layer's stores at `length` tokens a row."""
        return sum(layer.read_bytes(length) for layer in self.layers.values())

    def nbytes(self) -> dict[str, int]:
        total = {"keys": 0, "values": 0}
        for layer in self.layers.values():
            for k, v in layer.nbytes().items():
                total[k] += v
        return total


def static_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention implementation `harness_static`: a decode step over a StaticKLayer, or a
    prefill's attention (then its commit into the stores)."""
    scaling = module.scaling if scaling is None else scaling
    if isinstance(key, DecodeView):
        return static_decode_attention(query, key.layer, key.lengths, scaling=scaling), None
    if isinstance(key, PrefillView):
        return key.layer.prefill_attention(key.rows, query, key.keys, key.values, scaling), None
    raise TypeError("the harness_static attention runs with a StaticKCache only (harness.graph_decode)")


AttentionInterface.register(ATTN_IMPLEMENTATION, static_attention)
AttentionMaskInterface.register(ATTN_IMPLEMENTATION, sdpa_mask)  # never built by the loop, which passes no mask
