"""Softmax attention with pruned key channels for middle tokens: the torch references.

The rule (LeanK, docs/methods.md section 3): a query at slot `t` scores key slot `j` with all channels
when `j` is one of its row's first `sink` real tokens or one of the last `recent` slots
(`t - j < recent`), and with the head's kept channels only otherwise ("middle" keys).

Two twins compute it:
- `masked_attention`: the dense reference. Full K and V, a per-channel key scale (0/1 for a
  mask, LeanK's trainable alpha in training) applied to middle keys only.
- `pruned_cache_attention`: reads a `harness.kcache.PrunedKLayer`, which stores middle keys with
  the kept channels only, grouped by per-head kept count, and, for heads that keep no channel,
  a running sum of middle values instead of the values (their middle scores are exactly 0).
Both work for any number of queries (prefill chunks and one-token decode), GQA, and per-row
left padding (`pads`: padded slots at the start of each row). The GPU decode kernel (speed issue)
must agree with `pruned_cache_attention`.
"""

from __future__ import annotations

import math

import torch


def pads_from_mask(mask: torch.Tensor | None, batch: int, kv_len: int) -> torch.Tensor:
    """Left-padding count per row from a 4D mask (bool: True attends; float: 0 attends)."""
    if mask is None:
        return torch.zeros(batch, dtype=torch.long)
    last = mask[:, 0, -1, :kv_len]
    attends = last if last.dtype == torch.bool else last == 0
    return (~attends).long().sum(-1).cpu()


def additive(mask: torch.Tensor | None, dtype=torch.float32) -> torch.Tensor | None:
    if mask is None or mask.dtype != torch.bool:
        return None if mask is None else mask.to(dtype)
    return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, torch.finfo(dtype).min)


def full_channel_rule(
    q_slots: torch.Tensor, k_slots: torch.Tensor, pads: torch.Tensor, sink: int, recent: int
) -> torch.Tensor:
    """(B, L, T) bool: True where query slot scores key slot with all channels."""
    is_sink = (k_slots[None, :] - pads[:, None]) < sink  # (B, T)
    is_recent = (q_slots[:, None] - k_slots[None, :]) < recent  # (L, T)
    return is_sink[:, None, :] | is_recent[None, :, :]


def _expand_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    return x if n_rep == 1 else x.repeat_interleave(n_rep, dim=1)


def masked_attention(
    query,
    key,
    value,
    mask,
    *,
    key_scale,
    sink: int,
    recent: int,
    scaling: float,
    pads: torch.Tensor | None = None,
    full_queries: int = 0,
):
    """Dense reference. query (B, Hq, L, d), key/value (B, Hkv, T, d|dv); key_scale (Hkv, d) or
    (B, Hkv, d) multiplies middle keys; the first `full_queries` query slots (counted from slot 0)
    score everything with all channels (LeanK scores only answer tokens against pruned keys).
    Returns (B, L, Hq, dv) in query's dtype."""
    b, hq, length, _ = query.shape
    hkv, total = key.shape[1], key.shape[2]
    n_rep = hq // hkv
    pads = torch.zeros(b, dtype=torch.long) if pads is None else pads
    q = query.float()
    k = key.float()
    scale = key_scale.float().to(key.device)
    scale = scale[None] if scale.dim() == 2 else scale
    s_full = q @ _expand_kv(k, n_rep).transpose(-1, -2)
    s_mid = q @ _expand_kv(k * scale[:, :, None, :], n_rep).transpose(-1, -2)
    k_slots = torch.arange(total)
    q_slots = torch.arange(total - length, total)
    full = full_channel_rule(q_slots, k_slots, pads, sink, recent) | (q_slots < full_queries)[None, :, None]
    scores = torch.where(full[:, None].to(q.device), s_full, s_mid) * scaling
    bias = additive(mask)
    if bias is not None:
        scores = scores + bias[..., :total]
    probs = torch.softmax(scores, dim=-1)
    out = probs @ _expand_kv(value.float(), n_rep)
    return out.transpose(1, 2).to(query.dtype)


def pruned_cache_attention(query, layer, mask, *, scaling: float):
    """Reference attention over a PrunedKLayer after its `update` (head, middle and window
    segments, in slot order). Returns (B, L, Hq, dv) in query's dtype."""
    b, hq, length, d = query.shape
    hkv = layer.num_heads
    n_rep = hq // hkv
    n_head, n_mid, n_win = layer.segment_lengths()
    total = n_head + n_mid + n_win
    q_slots = torch.arange(total - length, total)
    head_slots = torch.arange(n_head)
    win_slots = torch.arange(n_head + n_mid, total)
    bias = additive(mask)
    out = torch.empty(b, hq, length, layer.value_dim, dtype=torch.float32, device=query.device)
    q_all = query.float()
    head_full = full_channel_rule(q_slots, head_slots, layer.pads, layer.sink, layer.recent).to(query.device)
    win_full = full_channel_rule(q_slots, win_slots, layer.pads, layer.sink, layer.recent).to(query.device)
    for group in layer.groups:
        heads = group.heads.to(query.device)
        q_heads = (heads[:, None] * n_rep + torch.arange(n_rep, device=query.device)[None, :]).reshape(-1)
        q = q_all.index_select(1, q_heads)  # (B, Hg*rep, L, d)
        idx = _expand_kv(group.channels.to(query.device), n_rep)  # (B, Hg*rep, c)
        q_kept = q.gather(-1, idx[:, :, None, :].expand(-1, -1, length, -1))

        def kept_scores(keys):  # keys (B, Hg, n, d) full -> scores over kept channels only
            k_kept = keys.gather(-1, group.channels[:, :, None, :].expand(-1, -1, keys.shape[2], -1).to(keys.device))
            return q_kept @ _expand_kv(k_kept.float(), n_rep).transpose(-1, -2)

        blocks, values = [], []
        for keys, vals, full in (
            (layer.head_keys(group), layer.head_values(group), head_full),
            (layer.window_keys(group), layer.window_values(group), win_full),
        ):
            s_full = q @ _expand_kv(keys.float(), n_rep).transpose(-1, -2)
            blocks.append(torch.where(full[:, None], s_full, kept_scores(keys)))
            values.append(_expand_kv(vals.float(), n_rep))
        if n_mid:
            if group.mid_values is not None:
                blocks.insert(1, q_kept @ _expand_kv(group.mid_keys.float(), n_rep).transpose(-1, -2))
                values.insert(1, _expand_kv(group.mid_values.float(), n_rep))
            else:  # n_mid scores of exactly 0 whose values sum to value_sum: one column, weight n_mid
                blocks.insert(
                    1, torch.full((b, len(q_heads), length, 1), math.log(n_mid) / scaling, device=query.device)
                )
                values.insert(1, _expand_kv((group.value_sum / n_mid)[:, :, None, :], n_rep))
        scores = torch.cat(blocks, dim=-1) * scaling
        if bias is not None:  # middle slots are never pads and precede every query: no bias there
            n_cols = scores.shape[-1] - n_head - n_win
            middle = bias.new_zeros(*bias.shape[:-1], n_cols)
            scores = scores + torch.cat([bias[..., :n_head], middle, bias[..., n_head + n_mid : total]], dim=-1)
        probs = torch.softmax(scores, dim=-1)
        out[:, q_heads] = probs @ torch.cat(values, dim=-2)
    return out.transpose(1, 2).to(query.dtype)
