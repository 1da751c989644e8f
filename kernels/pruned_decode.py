"""One-token decode attention over a pruned K cache: a split-K (flash-decoding) Triton kernel.

`pruned_decode_attention(query, layer, mask, scaling=...)` computes what
`harness.kernels.pruned_attention.pruned_cache_attention` computes for a single query slot
(L == 1), reading a `harness.kcache.PrunedKLayer`. Nearly all of a long context's bytes sit in the
middle segment, so that is what the main kernel streams:

- middle, heads keeping c > 0 channels (or all heads when `value_sum` is off): one Triton launch
  per group, grid (split, KV head of the group, batch). A program gathers the n_rep query heads
  that share its KV head to the (row, head)'s kept channels once, streams its slice of `mid_keys`
  (c channels) and `mid_values` in blocks of BLOCK_N tokens, and keeps the online-softmax state
  (running max, sum, dv accumulator) in fp32 for each query head; it writes one partial per split.
- middle, heads keeping 0 channels with a value sum: no key or value is read; their n_mid scores
  are exactly 0, so the partial is (max 0, sum n_mid, acc value_sum): the reference's one column
  of weight n_mid.
- head and window segments (sink + max left pad + recent + 1 slots at most), all KV heads. The
  LeanK full-channel rule is applied as in the reference: a slot is scored with all channels when
  it is one of its row's first `sink` real tokens or one of the last `recent` slots, with the kept
  channels otherwise (in decode the oldest window slot, and in less padded rows the head's extra
  slots, are such slots). The mask applies here only (middle slots are never pads).
- every partial is merged by a log-sum-exp combine.

Partials live in two fp32 buffers: max (B, Hkv, n_rep, S + 1) and acc (B, Hkv, n_rep, S + 1, dv + 1)
whose last column is the softmax sum; slots 0..S-1 are the middle's splits, slot S the head/window.

Two implementations of that plan:
- `pruned_decode_attention_torch`, plain torch throughout (head/window and merge in batched torch
  ops, the middle's splits in a torch loop), so the split/merge logic runs and is tested without
  Triton or a GPU;
- the Triton path (`_pruned_decode_triton`): the middle kernel, plus a small kernel for the
  head/window partial (which also writes the value-sum heads' middle partial) and one for the
  merge. Doing those two in torch, as first planned, cost more than it saved on an H100 at
  Llama-3.1-8B shapes (batch 52 x 4k, bf16): about 80 to 140 us of GPU time in some 40 small
  kernels (next to about 200 us for the middle) and about 1 ms of CPU launch time per call.
The public function takes the Triton path for CUDA tensors and the torch twin otherwise.
Accumulation is fp32; inputs may be fp16, bf16 or fp32 (16-bit q.k products are exact, and the
softmax weights enter p @ v as two 16-bit halves); any c, d and dv (padded to powers of two with
masks); n_mid may be 0.
"""

from __future__ import annotations

import os
import weakref

import torch

try:  # triton is a Linux dependency; the torch twin needs none of it
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["pruned_decode_attention", "pruned_decode_attention_torch"]

# launch settings (module attributes, read at each call, so a benchmark can tune them)
# (tuned on an H100 at Llama-3.1-8B shapes, bf16: docs/scripts/bench_pruned_decode.py; fp32 inputs
# use blocks of at most 64 tokens and 2 stages, to fit shared memory)
BLOCK_N = 128  # middle tokens per kernel iteration
MIN_BLOCKS_PER_SPLIT = 4  # a split streams at least this many blocks (when there are that many)
PROGRAMS_PER_SM = 2  # default split count: about this many programs per SM in each launch
NUM_WARPS, NUM_STAGES = 4, 2


# --- per-layer constants, cached on device so a decode step copies nothing from the host --------

class _Consts:
    def __init__(self, layer, batch: int, device):
        self.key = (layer.pads, tuple(g.channels for g in layer.groups), device)
        pads = torch.zeros(batch, dtype=torch.long) if layer.pads is None else layer.pads.long()
        self.sink_end = (pads + layer.sink).to(device)[:, None]  # (B, 1): slots below are full-channel
        keep = torch.zeros(batch, layer.num_heads, layer.head_dim, dtype=torch.float32, device=device)
        for g in layer.groups:
            if g.count:
                part = torch.zeros(batch, len(g.heads), layer.head_dim, dtype=torch.float32, device=device)
                part.scatter_(-1, g.channels.to(device), 1.0)
                keep.index_copy_(1, g.heads.to(device), part)
        self.keep = keep[:, :, None, :]  # (B, Hkv, 1, d)
        self.heads = {id(g): g.heads.to(device) for g in layer.groups}
        self.positions: dict = {}
        self.sum_index: dict = {}

    def value_sum_index(self, layer, group, device) -> torch.Tensor:
        """(Hkv,) int32: each KV head's index in `group` (the value-sum group), -1 for other heads."""
        key = None if group is None else id(group)
        if key not in self.sum_index:
            index = torch.full((layer.num_heads,), -1, dtype=torch.int32)
            if group is not None:
                index[group.heads.cpu()] = torch.arange(len(group.heads), dtype=torch.int32)
            self.sum_index = {key: index.to(device)}
        return self.sum_index[key]

    def fresh(self, layer, device) -> bool:
        pads, channels, dev = self.key
        now = tuple(g.channels for g in layer.groups)
        return (pads is layer.pads and dev == device and len(channels) == len(now)
                and all(a is b for a, b in zip(channels, now)))

    def head_window_slots(self, n_head: int, n_win: int, n_mid: int, device):
        """Slot index of each head and window position (B-independent), from cached aranges."""
        key = (n_head, n_win)
        if key not in self.positions:
            pos = torch.arange(n_head + n_win, device=device)
            self.positions = {key: (pos, (pos >= n_head).long())}  # one entry: the shape is steady
        pos, in_window = self.positions[key]
        return pos if n_mid == 0 else torch.add(pos, in_window, alpha=n_mid)


_CONSTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _layer_consts(layer, batch: int, device) -> _Consts:
    device = torch.device(device)
    hit = _CONSTS.get(layer)
    if hit is None or not hit.fresh(layer, device):
        hit = _CONSTS[layer] = _Consts(layer, batch, device)
    return hit


def _check(query, layer):
    if query.dim() != 4 or query.shape[2] != 1:
        raise ValueError(f"pruned_decode_attention decodes one token: query must be (B, Hq, 1, d), got {tuple(query.shape)}")
    if query.shape[1] % layer.num_heads:
        raise ValueError(f"{query.shape[1]} query heads do not share {layer.num_heads} KV heads evenly")


# --- the torch twin: head/window partial, value-sum partial, merge, driver, middle ---------------

def _head_window(q, layer, mask, consts, scaling: float, out_m, out_acc):
    """Partial softmax state over the head and window segments, all KV heads, written to
    out_m (B, Hkv, n_rep) and out_acc (B, Hkv, n_rep, dv + 1) (last column: the sum).
    q (B, Hkv, n_rep, d) fp32."""
    n_head, n_mid, n_win = layer.segment_lengths()
    total = n_head + n_mid + n_win
    n_rep = q.shape[2]
    if n_head:
        keys = torch.cat([layer.head_k, layer.win_k], dim=2)
        values = torch.cat([layer.head_v, layer.win_v], dim=2)
    else:
        keys, values = layer.win_k, layer.win_v
    both = torch.cat([q, q * consts.keep], dim=2)  # all channels | kept channels only
    s2 = both @ keys.float().transpose(-1, -2)  # (B, Hkv, 2 n_rep, T)
    slots = consts.head_window_slots(n_head, n_win, n_mid, q.device)
    full = (slots[None, :] < consts.sink_end) | (slots >= total - layer.recent)[None, :]  # (B, T)
    s = torch.where(full[:, None, None, :], s2[:, :, :n_rep], s2[:, :, n_rep:]) * scaling
    if mask is not None:  # (B, 1 | Hq, L, >= total): its last query row, head and window columns
        row = mask[:, :, -1, :total]
        row = torch.cat([row[..., :n_head], row[..., n_head + n_mid:]], dim=-1) if n_mid else row
        row = row[:, :, None, :] if row.shape[1] == 1 else row.reshape(row.shape[0], -1, n_rep, row.shape[-1])
        if row.dtype == torch.bool:  # as `additive`: the most negative fp32 where the mask is False
            s = s.masked_fill(~row, torch.finfo(torch.float32).min)
        else:
            s = s + row.float()
    m = s.amax(-1)
    p = torch.exp(s - m[..., None])
    out_m.copy_(m)
    out_acc[..., :-1] = p @ values.float()
    out_acc[..., -1] = p.sum(-1)


def _value_sum_partial(group, heads, n_mid: int, m_buf, acc_buf):
    """Heads keeping 0 channels: n_mid scores of exactly 0 whose values sum to value_sum (slot 0).
    index_fill_/index_copy_ on slot views: no host scalar goes to the device (CUDA-graph safe)."""
    n_rep = m_buf.shape[2]
    m_buf[..., 0].index_fill_(1, heads, 0.0)
    acc_buf[..., 0, -1].index_fill_(1, heads, float(n_mid))
    acc_buf[..., 0, :-1].index_copy_(1, heads, group.value_sum.float()[:, :, None, :].expand(-1, -1, n_rep, -1))


def _combine(m_buf, acc_buf):
    """Log-sum-exp merge over the slot axis; empty splits hold max -inf and weigh exp(-inf) = 0."""
    w = torch.exp(m_buf - m_buf.amax(-1, keepdim=True))
    merged = (w[..., None, :] @ acc_buf).squeeze(-2)  # (B, Hkv, n_rep, dv + 1)
    return merged[..., :-1] / merged[..., -1:]


def _decode(query, layer, mask, scaling: float, splits_for, middle):
    """Driver of the torch twin. `splits_for(n_mid, kernel_groups)`: the number of split slots S and each
    kernel group's split count; `middle(query, group, heads, splits, n_mid, m_buf, acc_buf, scaling)`
    writes that group's partials to slots 0..S-1 (all of them; unused ones as (-inf, 0))."""
    _check(query, layer)
    b, hq, _, d = query.shape
    hkv, dv = layer.num_heads, layer.value_dim
    n_rep = hq // hkv
    n_mid = layer.n_mid
    consts = _layer_consts(layer, b, query.device)
    kernel_groups = [g for g in layer.groups if g.mid_values is not None] if n_mid else []
    sum_groups = [g for g in layer.groups if g.mid_values is None] if n_mid else []
    n_slots, splits = splits_for(n_mid, kernel_groups) if kernel_groups else (1 if sum_groups else 0, [])
    if sum_groups:  # slots they leave unset must read as empty
        m_buf = torch.full((b, hkv, n_rep, n_slots + 1), float("-inf"), dtype=torch.float32, device=query.device)
        acc_buf = torch.zeros(b, hkv, n_rep, n_slots + 1, dv + 1, dtype=torch.float32, device=query.device)
    else:  # the kernel groups cover every head and write every slot
        m_buf = torch.empty(b, hkv, n_rep, n_slots + 1, dtype=torch.float32, device=query.device)
        acc_buf = torch.empty(b, hkv, n_rep, n_slots + 1, dv + 1, dtype=torch.float32, device=query.device)
    q = query.reshape(b, hkv, n_rep, d).float()
    _head_window(q, layer, mask, consts, scaling, m_buf[..., n_slots], acc_buf[..., n_slots, :])
    for g in sum_groups:
        _value_sum_partial(g, consts.heads[id(g)], n_mid, m_buf, acc_buf)
    for g, s in zip(kernel_groups, splits):
        middle(query, g, consts.heads[id(g)], s, n_mid, m_buf, acc_buf, scaling)
    return _combine(m_buf, acc_buf).reshape(b, 1, hq, dv).to(query.dtype)


def _middle_torch(query, group, heads, splits: int, n_mid: int, m_buf, acc_buf, scaling: float):
    b, hq, _, d = query.shape
    hg, n_rep, n_slots = len(heads), m_buf.shape[2], m_buf.shape[-1] - 1
    q = query.reshape(b, hq // n_rep, n_rep, d).index_select(1, heads).float()
    q = q.gather(-1, group.channels.to(query.device)[:, :, None, :].expand(-1, -1, n_rep, -1))  # (B, Hg, n_rep, c)
    per = -(-n_mid // splits)
    for s in range(n_slots):
        lo, hi = s * per, min(n_mid, (s + 1) * per)
        if lo >= hi:  # an empty split, as the kernel writes it
            m_buf[:, heads, :, s] = float("-inf")
            acc_buf[:, heads, :, s] = 0.0
            continue
        scores = (q @ group.mid_keys[:, :, lo:hi].float().transpose(-1, -2)) * scaling
        m = scores.amax(-1)
        p = torch.exp(scores - m[..., None])
        m_buf[:, heads, :, s] = m
        acc_buf[:, heads, :, s, :-1] = p @ group.mid_values[:, :, lo:hi].float()
        acc_buf[:, heads, :, s, -1] = p.sum(-1)


def pruned_decode_attention_torch(query, layer, mask, *, scaling: float, split: int | None = None):
    """Plain-torch twin of the Triton path: same segments, same split partials, same merge.
    `split`: number of splits of the middle (default 1). Returns (B, 1, Hq, dv) in query's dtype."""
    splits = max(1, int(split or 1))
    return _decode(query, layer, mask, scaling, lambda n_mid, groups: (splits, [splits] * len(groups)), _middle_torch)


# --- the Triton path ---------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _online_softmax_step(s, v, m_i, l_i, acc, DOT_F32: tl.constexpr):
        """Fold one block of scores `s` (rows x tokens) and values `v` (tokens x dv) into the running
        max, sum and accumulator of an online softmax (fp32)."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DOT_F32:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:  # p split into two 16-bit halves: ~16 mantissa bits of the fp32 weights
            p_hi = p.to(v.dtype)
            p_lo = (p - p_hi.to(tl.float32)).to(v.dtype)
            pv = tl.dot(p_hi, v) + tl.dot(p_lo, v)
        return m_new, l_i, acc * alpha[:, None] + pv


    @triton.jit
    def _mid_partial_kernel(
        q_ptr, ch_ptr, heads_ptr, k_ptr, v_ptr, m_ptr, a_ptr,
        hg, n_mid, per_split, n_slots, scaling,
        HQ: tl.constexpr, D: tl.constexpr, HKV: tl.constexpr, N_REP: tl.constexpr, REP_P: tl.constexpr,
        C: tl.constexpr, C_P: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr,
        BLOCK: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        """All tensors contiguous: query (B, HQ, 1, D); channels (B, hg, C); keys (B, hg, n_mid, C);
        values (B, hg, n_mid, DV); max (B, HKV, N_REP, n_slots); acc (B, HKV, N_REP, n_slots, DV + 1)."""
        pid_s = tl.program_id(0)
        pid_h = tl.program_id(1).to(tl.int64)
        pid_b = tl.program_id(2).to(tl.int64)
        bh = pid_b * hg + pid_h  # (row, head of the group)
        head = tl.load(heads_ptr + pid_h).to(tl.int64)  # the KV head's index in the layer
        rows = tl.arange(0, REP_P)
        rmask = rows < N_REP
        cc = tl.arange(0, C_P)
        cmask = cc < C
        dd = tl.arange(0, DV_P)
        dmask = dd < DV

        # the n_rep query heads of this KV head, gathered once to this (row, head)'s kept channels
        ch = tl.load(ch_ptr + bh * C + cc, mask=cmask, other=0)
        q = tl.load(q_ptr + pid_b * (HQ * D) + (head * N_REP + rows)[:, None] * D + ch[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0)
        if DOT_F32:
            q = q.to(tl.float32)

        k_base = k_ptr + bh * n_mid * C
        v_base = v_ptr + bh * n_mid * DV
        start = pid_s * per_split
        end = tl.minimum(start + per_split, n_mid)
        m_i = tl.full([REP_P], float("-inf"), tl.float32)
        l_i = tl.zeros([REP_P], tl.float32)
        acc = tl.zeros([REP_P, DV_P], tl.float32)
        for n0 in range(start, end, BLOCK):
            offs = n0 + tl.arange(0, BLOCK)
            nmask = offs < end
            k = tl.load(k_base + offs[:, None] * C + cc[None, :], mask=nmask[:, None] & cmask[None, :], other=0.0)
            if DOT_F32:
                s = tl.dot(q, tl.trans(k.to(tl.float32)), input_precision="ieee")
            else:  # 16-bit q and k: exact products, fp32 accumulation
                s = tl.dot(q, tl.trans(k))
            s = tl.where(nmask[None, :], s * scaling, float("-inf"))
            # every block holds a real token, so the running max stays finite
            v = tl.load(v_base + offs[:, None] * DV + dd[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_F32)

        slot = (pid_b * HKV + head) * N_REP + rows  # (row, KV head, query head) of the buffers
        tl.store(m_ptr + slot * n_slots + pid_s, m_i, mask=rmask)
        a_row = a_ptr + (slot * n_slots + pid_s) * (DV + 1)
        tl.store(a_row[:, None] + dd[None, :], acc, mask=rmask[:, None] & dmask[None, :])
        tl.store(a_row + DV, l_i, mask=rmask)


    @triton.jit
    def _head_window_kernel(
        q_ptr, keep_ptr, sink_end_ptr, hk_ptr, hv_ptr, wk_ptr, wv_ptr, mask_ptr, smask_b, smask_h, smask_t,
        sum_index_ptr, sum_ptr, sum_hg, m_ptr, a_ptr,
        n_head, n_mid, n_win, recent, n_slots, scaling,
        HQ: tl.constexpr, HKV: tl.constexpr, N_REP: tl.constexpr, REP_P: tl.constexpr,
        D: tl.constexpr, D_P: tl.constexpr, DV: tl.constexpr, DV_P: tl.constexpr,
        BLOCK: tl.constexpr, MASK_KIND: tl.constexpr, DOT_F32: tl.constexpr,
    ):
        """One program per (row, KV head): the partial over the head and window segments (slot
        n_slots - 1 of the buffers), with the full-channel rule and the mask; for a value-sum head
        also the middle's partial (slot 0: max 0, sum n_mid, acc value_sum; other splits empty).
        Contiguous: query (B, HQ, 1, D); keep (B, HKV, D) fp32; head K/V (B, HKV, n_head, D|DV);
        window K/V (B, HKV, n_win, D|DV); value sums (B, sum_hg, DV) fp32. MASK_KIND: 0 none,
        1 bool (False: the most negative fp32 is added), 2 additive; the mask row is read at slot t."""
        pid_h = tl.program_id(0).to(tl.int64)
        pid_b = tl.program_id(1).to(tl.int64)
        bh = pid_b * HKV + pid_h
        rows = tl.arange(0, REP_P)
        rmask = rows < N_REP
        cd = tl.arange(0, D_P)
        dmask_k = cd < D
        dd = tl.arange(0, DV_P)
        dmask = dd < DV
        q = tl.load(q_ptr + (bh * N_REP + rows)[:, None] * D + cd[None, :],
                    mask=rmask[:, None] & dmask_k[None, :], other=0.0)
        keep = tl.load(keep_ptr + bh * D + cd, mask=dmask_k, other=0.0)
        q_kept = tl.where(keep[None, :] != 0, q, tl.zeros_like(q))  # exact in q's dtype
        if DOT_F32:
            q = q.to(tl.float32)
            q_kept = q_kept.to(tl.float32)
        sink_end = tl.load(sink_end_ptr + pid_b)
        total = n_head + n_mid + n_win
        n_hw = n_head + n_win
        hk_base = hk_ptr + bh * n_head * D
        hv_base = hv_ptr + bh * n_head * DV
        wk_base = wk_ptr + bh * n_win * D
        wv_base = wv_ptr + bh * n_win * DV
        m_i = tl.full([REP_P], float("-inf"), tl.float32)
        l_i = tl.zeros([REP_P], tl.float32)
        acc = tl.zeros([REP_P, DV_P], tl.float32)
        for j0 in range(0, n_hw, BLOCK):
            j = j0 + tl.arange(0, BLOCK)
            in_head = j < n_head
            in_win = (j >= n_head) & (j < n_hw)
            w = j - n_head
            k = tl.load(hk_base + j[:, None] * D + cd[None, :], mask=in_head[:, None] & dmask_k[None, :], other=0.0)
            k += tl.load(wk_base + w[:, None] * D + cd[None, :], mask=in_win[:, None] & dmask_k[None, :], other=0.0)
            if DOT_F32:
                k = tl.trans(k.to(tl.float32))
                s_full = tl.dot(q, k, input_precision="ieee")
                s_kept = tl.dot(q_kept, k, input_precision="ieee")
            else:  # 16-bit q and k: exact products, fp32 accumulation
                k = tl.trans(k)
                s_full = tl.dot(q, k)
                s_kept = tl.dot(q_kept, k)
            slot = tl.where(in_head, j, j + n_mid)
            full = (slot < sink_end) | (slot >= total - recent)
            s = tl.where(full[None, :], s_full, s_kept) * scaling
            if MASK_KIND != 0:
                mvals = tl.load(mask_ptr + pid_b * smask_b + (pid_h * N_REP + rows)[:, None] * smask_h
                                + slot[None, :] * smask_t, mask=rmask[:, None] & (j < n_hw)[None, :])
                if MASK_KIND == 1:
                    s = tl.where(mvals != 0, s, -3.4028234663852886e38)
                else:
                    s = s + mvals.to(tl.float32)
            s = tl.where((j < n_hw)[None, :], s, float("-inf"))
            v = tl.load(hv_base + j[:, None] * DV + dd[None, :], mask=in_head[:, None] & dmask[None, :], other=0.0)
            v += tl.load(wv_base + w[:, None] * DV + dd[None, :], mask=in_win[:, None] & dmask[None, :], other=0.0)
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_F32)
        slot_row = bh * N_REP + rows  # (row, KV head, query head) of the buffers
        last = n_slots - 1
        tl.store(m_ptr + slot_row * n_slots + last, m_i, mask=rmask)
        a_row = a_ptr + (slot_row * n_slots + last) * (DV + 1)
        tl.store(a_row[:, None] + dd[None, :], acc, mask=rmask[:, None] & dmask[None, :])
        tl.store(a_row + DV, l_i, mask=rmask)

        vi = tl.load(sum_index_ptr + pid_h)
        if vi >= 0:  # a head keeping 0 channels: n_mid scores of exactly 0 whose values sum to value_sum
            vsum = tl.load(sum_ptr + (pid_b * sum_hg + vi) * DV + dd, mask=dmask, other=0.0)
            zeros = tl.zeros([REP_P], tl.float32)
            tl.store(m_ptr + slot_row * n_slots, zeros, mask=rmask)
            a0 = a_ptr + slot_row * n_slots * (DV + 1)
            tl.store(a0[:, None] + dd[None, :], zeros[:, None] + vsum[None, :], mask=rmask[:, None] & dmask[None, :])
            tl.store(a0 + DV, zeros + n_mid, mask=rmask)
            for sp in range(1, last):  # the other split slots: empty
                tl.store(m_ptr + slot_row * n_slots + sp, zeros + float("-inf"), mask=rmask)
                a_s = a_ptr + (slot_row * n_slots + sp) * (DV + 1)
                tl.store(a_s[:, None] + dd[None, :], tl.zeros([REP_P, DV_P], tl.float32),
                         mask=rmask[:, None] & dmask[None, :])
                tl.store(a_s + DV, zeros, mask=rmask)

    @triton.jit
    def _combine_kernel(m_ptr, a_ptr, out_ptr, n_slots, DV: tl.constexpr, DV_P: tl.constexpr, SB: tl.constexpr):
        """Log-sum-exp merge of the n_slots partials of one query head (program = (row, query head));
        out (B, 1, HQ, DV) is laid out as the buffers' (row, KV head, query head) order."""
        r = tl.program_id(0).to(tl.int64)
        dd = tl.arange(0, DV_P)
        dmask = dd < DV
        sb = tl.arange(0, SB)
        m = tl.full([SB], float("-inf"), tl.float32)
        for s0 in range(0, n_slots, SB):
            m = tl.maximum(m, tl.load(m_ptr + r * n_slots + s0 + sb, mask=s0 + sb < n_slots, other=float("-inf")))
        m_all = tl.max(m, 0)
        l_sum = tl.zeros([SB], tl.float32)
        acc = tl.zeros([SB, DV_P], tl.float32)
        for s0 in range(0, n_slots, SB):
            smask = s0 + sb < n_slots
            w = tl.exp(tl.load(m_ptr + r * n_slots + s0 + sb, mask=smask, other=float("-inf")) - m_all)  # empty: 0
            a_rows = a_ptr + (r * n_slots + s0 + sb) * (DV + 1)
            acc += w[:, None] * tl.load(a_rows[:, None] + dd[None, :], mask=smask[:, None] & dmask[None, :], other=0.0)
            l_sum += w * tl.load(a_rows + DV, mask=smask, other=0.0)
        out = tl.sum(acc, 0) / tl.sum(l_sum, 0)
        tl.store(out_ptr + r * DV + dd, out.to(out_ptr.dtype.element_ty), mask=dmask)


_SMS: dict = {}


def _sm_count(device) -> int:
    device = torch.device(device)
    if device.type != "cuda":
        return 8
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SMS:
        _SMS[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SMS[idx]


def _pow2(n: int, least: int = 16) -> int:
    return max(least, triton.next_power_of_2(n)) if n > 0 else least


def _triton_splits(query, split):
    def splits_for(n_mid, groups):
        if split is not None:
            s = max(1, int(split))
            return s, [s] * len(groups)
        blocks = -(-n_mid // BLOCK_N)
        most = max(1, blocks // MIN_BLOCKS_PER_SPLIT)
        target = PROGRAMS_PER_SM * _sm_count(query.device)  # programs per launch: fill the GPU, hide latency
        per_group = [max(1, min(most, -(-target // (query.shape[0] * len(g.heads))))) for g in groups]
        return max(per_group), per_group
    return splits_for


def _dot_f32(query, keys, values) -> bool:
    """fp32 dots unless query, keys and values share a 16-bit dtype (then exact 16-bit products,
    fp32 accumulation). The CPU interpreter's bf16 tl.dot is wrong (numpy has no bf16): fp32 there."""
    half = query.dtype == keys.dtype == values.dtype and keys.dtype in (torch.float16, torch.bfloat16)
    return not half or (keys.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


def _middle_triton(query, group, heads, splits: int, n_mid: int, m_buf, acc_buf, scaling: float):
    keys, values, channels = group.mid_keys.contiguous(), group.mid_values.contiguous(), group.channels.contiguous()
    b, hg, _, c = keys.shape
    hq, d = query.shape[1], query.shape[3]
    hkv, n_rep, n_slots = m_buf.shape[1], m_buf.shape[2], m_buf.shape[-1] - 1
    dv = values.shape[-1]
    query = query.contiguous()
    dot_f32 = _dot_f32(query, keys, values)
    block, stages = (min(BLOCK_N, 64), min(NUM_STAGES, 2)) if dot_f32 else (BLOCK_N, NUM_STAGES)
    per = -(-n_mid // splits)
    per = -(-per // block) * block  # whole blocks per split
    # programs past this group's `splits` get empty ranges and write (-inf, 0, 0)
    _mid_partial_kernel[(n_slots, hg, b)](
        query, channels, heads, keys, values, m_buf, acc_buf,
        hg, n_mid, per, n_slots + 1, float(scaling),
        HQ=hq, D=d, HKV=hkv, N_REP=n_rep, REP_P=_pow2(n_rep), C=c, C_P=_pow2(c), DV=dv, DV_P=_pow2(dv),
        BLOCK=block, DOT_F32=dot_f32, num_warps=NUM_WARPS, num_stages=stages,
    )


def _pruned_decode_triton(query, layer, mask, *, scaling: float, split: int | None = None):
    """The Triton path on any tensors Triton can launch on (CUDA; CPU under TRITON_INTERPRET=1):
    one launch for the head/window partial (and the value-sum heads' middle), one per group of
    heads that keep channels (the middle), one for the merge."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check(query, layer)
    b, hq, _, d = query.shape
    hkv, dv = layer.num_heads, layer.value_dim
    n_rep = hq // hkv
    n_head, n_mid, n_win = layer.segment_lengths()
    dev = query.device
    consts = _layer_consts(layer, b, dev)
    kernel_groups = [g for g in layer.groups if g.mid_values is not None] if n_mid else []
    sum_groups = [g for g in layer.groups if g.mid_values is None] if n_mid else []
    if len(sum_groups) > 1:  # groups are by channel count: only the 0-channel one keeps a value sum
        raise NotImplementedError("more than one group of heads with a value sum")
    sum_group = sum_groups[0] if sum_groups else None
    n_split, splits = _triton_splits(query, split)(n_mid, kernel_groups) if kernel_groups else (1 if sum_group else 0, [])
    n_slots = n_split + 1  # the middle's splits, then the head/window
    m_buf = torch.empty(b, hkv, n_rep, n_slots, dtype=torch.float32, device=dev)
    acc_buf = torch.empty(b, hkv, n_rep, n_slots, dv + 1, dtype=torch.float32, device=dev)
    query = query.contiguous()
    win_k, win_v = layer.win_k.contiguous(), layer.win_v.contiguous()
    head_k = layer.head_k.contiguous() if n_head else win_k
    head_v = layer.head_v.contiguous() if n_head else win_v
    if mask is None:
        kind, row, strides = 0, query, (0, 0, 0)
    else:
        row = mask[:, :, -1, :]
        kind = 1 if row.dtype == torch.bool else 2
        strides = (row.stride(0), row.stride(1) if row.shape[1] > 1 else 0, row.stride(2))
    sums = sum_group.value_sum.float().contiguous() if sum_group is not None else acc_buf
    hw_f32 = _dot_f32(query, head_k, head_v)
    _head_window_kernel[(hkv, b)](
        query, consts.keep, consts.sink_end, head_k, head_v, win_k, win_v, row, *strides,
        consts.value_sum_index(layer, sum_group, dev), sums, len(sum_group.heads) if sum_group is not None else 1,
        m_buf, acc_buf, n_head, n_mid, n_win, layer.recent, n_slots, float(scaling),
        HQ=hq, HKV=hkv, N_REP=n_rep, REP_P=_pow2(n_rep), D=d, D_P=_pow2(d), DV=dv, DV_P=_pow2(dv),
        BLOCK=32 if hw_f32 else 64, MASK_KIND=kind, DOT_F32=hw_f32, num_warps=4, num_stages=1,
    )
    for g, s in zip(kernel_groups, splits):
        _middle_triton(query, g, consts.heads[id(g)], s, n_mid, m_buf, acc_buf, scaling)
    out = torch.empty(b, 1, hq, dv, dtype=query.dtype, device=dev)
    _combine_kernel[(b * hq,)](m_buf, acc_buf, out, n_slots, DV=dv, DV_P=_pow2(dv, 2), SB=16, num_warps=4)
    return out


def pruned_decode_attention(query, layer, mask, *, scaling: float, split: int | None = None):
    """Decode attention (L == 1) over a PrunedKLayer after its `update`; same contract as
    `pruned_cache_attention`. query (B, Hq, 1, d); returns (B, 1, Hq, dv) in query's dtype.
    `split`: splits of the middle per (row, KV head); by default chosen from the GPU's size.
    CUDA tensors take the Triton kernel, others the torch twin."""
    if triton is not None and query.is_cuda:
        return _pruned_decode_triton(query, layer, mask, scaling=scaling, split=split)
    return pruned_decode_attention_torch(query, layer, mask, scaling=scaling, split=split)
