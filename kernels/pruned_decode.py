"""One-token decode attention over a pruned K cache: a split-K (flash-decoding) Triton kernel.

`pruned_decode_attention(query, layer, mask, scaling=...)` computes what
`harness.kernels.pruned_attention.pruned_cache_attention` computes for a single query slot
(L == 1), reading a `harness.kcache.PrunedKLayer`. Nearly all of a long context's bytes sit in the
middle segment, so the plan is built around streaming it once, evenly over the whole GPU:

- The middle of every head that keeps c > 0 channels (or of every head, with `value_sum` off) is
  cut into S splits of whole token blocks (S the same for all heads of the call, chosen so that
  there are a few work items per SM). A work item (row, KV head, split) gathers the n_rep query
  heads sharing its KV head to that (row, head)'s kept channels once, streams its token range of
  the group's `mid_keys` (c channels) and `mid_values` in blocks of BLOCK_N tokens (the launch
  settings of `harness.kernels.launch_settings`), keeps an online
  softmax (running max, sum, dv accumulator) in fp32 per query head, and writes one partial.
- Heads keeping 0 channels with a value sum read no middle key or value: their n_mid scores are
  exactly 0, so their middle partial is (max 0, sum n_mid, acc value_sum).
- The head and window segments (sink + max left pad + recent + 1 slots at most) give one more
  partial per (row, KV head). The LeanK full-channel rule is applied as in the reference: a slot is
  scored with all channels when it is one of its row's first `sink` real tokens or one of the last
  `recent` slots, with the kept channels otherwise. The mask applies here only (middle slots are
  never pads).
- A log-sum-exp merge of each query head's partials gives the output.

Partials live in two fp32 buffers: max (B, Hkv, n_rep, P) and acc (B, Hkv, n_rep, P, dv + 1) whose
last column is the softmax sum; slots 0..S-1 hold the middle's splits (slot 0 alone for value-sum
heads), slot P - 1 the head and window.

Two implementations of that plan:
- `pruned_decode_attention_torch`, plain torch throughout, so the split/merge logic runs and is
  tested without Triton or a GPU;
- the Triton path (`_pruned_decode_triton`): ONE launch computes every partial (work items of all
  kept-count groups, up to GROUPS_PER_LAUNCH groups each compiled for its own c, and the
  head/window items, scheduled first), and one small launch merges them. An earlier version
  launched once per group plus once for the head/window; each launch ended in a partly idle GPU
  (1.21x over SDPA at batch 52 x 4k on an H100 instead of the 1.45x aimed at).
The public function takes the Triton path for CUDA tensors and the torch twin otherwise.
Accumulation is fp32; inputs may be fp16, bf16 or fp32 (16-bit q.k products are exact, and the
softmax weights enter p @ v as two 16-bit halves); any c, d and dv (padded to powers of two with
masks); n_mid may be 0. Middle tensors may be views of a larger store (the cache's spare room):
only their last two dimensions must be contiguous.
"""

from __future__ import annotations

import functools
import os
import weakref

import torch

from harness.kernels import launch_settings

try:  # triton is a Linux dependency; the torch twin needs none of it
    import triton
    import triton.language as tl
except Exception:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["pruned_decode_attention", "pruned_decode_attention_torch"]

# Launch settings come from `harness.kernels.launch_settings` per GPU and shape class (a sweep's
# winners): BLOCK_N middle tokens per kernel iteration, NUM_WARPS, NUM_STAGES, ITEMS_PER_SM middle
# work items per SM the split count aims at, each at least MIN_BLOCKS_PER_SPLIT blocks long. fp32
# inputs use blocks of at most 64 tokens and 2 stages, to fit shared memory.
KERNEL = "pruned_decode"
GROUPS_PER_LAUNCH = 4  # kept-count groups one launch handles (more groups: more launches)


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
        return (
            pads is layer.pads
            and dev == device
            and len(channels) == len(now)
            and all(a is b for a, b in zip(channels, now))
        )

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
        raise ValueError(
            f"pruned_decode_attention decodes one token: query must be (B, Hq, 1, d), got {tuple(query.shape)}"
        )
    if query.shape[1] % layer.num_heads:
        raise ValueError(f"{query.shape[1]} query heads do not share {layer.num_heads} KV heads evenly")


def _split_groups(layer):
    """(groups whose middle the kernel streams, the value-sum group or None); none without a middle."""
    if not layer.n_mid:
        return [], None
    kernel = [g for g in layer.groups if g.mid_values is not None]
    sums = [g for g in layer.groups if g.mid_values is None]
    if len(sums) > 1:  # groups are by channel count: only the 0-channel one keeps a value sum
        raise NotImplementedError("more than one group of heads with a value sum")
    return kernel, (sums[0] if sums else None)


def _split_plan(
    n_mid: int, rows: int, block: int, split: int | None, sms: int, items_per_sm: int = 8, min_blocks: int = 4
) -> tuple[int, int]:
    """(S, tokens per split): S splits of whole blocks of the middle for each of `rows` (row, KV
    head) pairs; by default about `items_per_sm` work items per SM, each at least `min_blocks`
    blocks long. No split is empty."""
    if not n_mid or not rows:
        return 0, 0
    blocks = -(-n_mid // block)
    if split is None:
        split = min(-(-items_per_sm * sms // rows), max(1, blocks // min_blocks))
    per_blocks = -(-blocks // max(1, int(split)))
    return -(-blocks // per_blocks), per_blocks * block


# --- the torch twin: head/window partial, value-sum partial, middle splits, merge -----------------


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
        row = torch.cat([row[..., :n_head], row[..., n_head + n_mid :]], dim=-1) if n_mid else row
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


def _middle_torch(query, group, heads, splits: int, per: int, n_mid: int, m_buf, acc_buf, scaling: float):
    """The middle partials of one group's heads: slots 0..splits-1 (token ranges of `per`)."""
    b, hq, _, d = query.shape
    n_rep = m_buf.shape[2]
    q = query.reshape(b, hq // n_rep, n_rep, d).index_select(1, heads).float()
    q = q.gather(-1, group.channels.to(query.device)[:, :, None, :].expand(-1, -1, n_rep, -1))  # (B, Hg, n_rep, c)
    for s in range(splits):
        lo, hi = s * per, min(n_mid, (s + 1) * per)
        scores = (q @ group.mid_keys[:, :, lo:hi].float().transpose(-1, -2)) * scaling
        m = scores.amax(-1)
        p = torch.exp(scores - m[..., None])
        m_buf[:, heads, :, s] = m
        acc_buf[:, heads, :, s, :-1] = p @ group.mid_values[:, :, lo:hi].float()
        acc_buf[:, heads, :, s, -1] = p.sum(-1)


def pruned_decode_attention_torch(query, layer, mask, *, scaling: float, split: int | None = None):
    """Plain-torch twin of the Triton path: same partials (S = `split` splits of the middle,
    default 1; the value sum; the head and window), same merge. Slots a head does not use hold
    the empty partial (max -inf, sum 0). Returns (B, 1, Hq, dv) in query's dtype."""
    _check(query, layer)
    b, hq, _, d = query.shape
    hkv, dv, n_rep, n_mid = layer.num_heads, layer.value_dim, hq // layer.num_heads, layer.n_mid
    consts = _layer_consts(layer, b, query.device)
    kernel_groups, sum_group = _split_groups(layer)
    splits, per = _split_plan(n_mid, b * sum(len(g.heads) for g in kernel_groups), 1, split or 1, 1)
    n_slots = max(splits, sum_group is not None) + 1
    m_buf = torch.full((b, hkv, n_rep, n_slots), float("-inf"), dtype=torch.float32, device=query.device)
    acc_buf = torch.zeros(b, hkv, n_rep, n_slots, dv + 1, dtype=torch.float32, device=query.device)
    q = query.reshape(b, hkv, n_rep, d).float()
    _head_window(q, layer, mask, consts, scaling, m_buf[..., -1], acc_buf[..., -1, :])
    if sum_group is not None:  # n_mid scores of exactly 0 whose values sum to value_sum, in slot 0
        heads = consts.heads[id(sum_group)]
        m_buf[:, heads, :, 0] = 0.0
        acc_buf[:, heads, :, 0, :-1] = sum_group.value_sum.float()[:, :, None, :]
        acc_buf[:, heads, :, 0, -1] = float(n_mid)
    for g in kernel_groups:
        _middle_torch(query, g, consts.heads[id(g)], splits, per, n_mid, m_buf, acc_buf, scaling)
    w = torch.exp(m_buf - m_buf.amax(-1, keepdim=True))  # empty slots: exp(-inf) = 0
    merged = (w[..., None, :] @ acc_buf).squeeze(-2)  # (B, Hkv, n_rep, dv + 1)
    return (merged[..., :-1] / merged[..., -1:]).reshape(b, 1, hq, dv).to(query.dtype)


# --- the Triton path ---------------------------------------------------------------------------

if triton is not None:

    @triton.jit
    def _online_softmax_step(s, v, m_i, l_i, acc, DOT_F32: tl.constexpr, GUARD: tl.constexpr):
        """Fold one block of scores `s` (rows x tokens) and values `v` (tokens x dv) into the running
        max, sum and accumulator of an online softmax (fp32). GUARD: the block and everything before
        it may be all -inf (no real token yet); without it the caller guarantees a finite max."""
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if GUARD:  # exp(-inf - -inf) is NaN: measure from 0 while nothing real has been seen
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
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
    def _query_rows(
        q_ptr, keep_ptr, bh, rows, rmask, cd, dmask_k, N_REP: tl.constexpr, D: tl.constexpr, DOT_F32: tl.constexpr
    ):
        """The n_rep query heads of (row, KV head) `bh` (query (B, HQ, 1, D) contiguous), with all
        channels and with the kept ones only (keep (B, HKV, D) 0/1)."""
        q = tl.load(
            q_ptr + (bh * N_REP + rows)[:, None] * D + cd[None, :], mask=rmask[:, None] & dmask_k[None, :], other=0.0
        )
        keep = tl.load(keep_ptr + bh * D + cd, mask=dmask_k, other=0.0)
        q_kept = tl.where(keep[None, :] != 0, q, tl.zeros_like(q))  # exact in q's dtype
        if DOT_F32:
            q = q.to(tl.float32)
            q_kept = q_kept.to(tl.float32)
        return q, q_kept

    @triton.jit
    def _full_and_kept_scores(q, q_kept, k, DOT_F32: tl.constexpr):
        """Scores of a block of full keys k (tokens x D) with all channels and with the kept ones."""
        if DOT_F32:
            k = tl.trans(k.to(tl.float32))
            s_full = tl.dot(q, k, input_precision="ieee")
            s_kept = tl.dot(q_kept, k, input_precision="ieee")
        else:  # 16-bit q and k: exact products, fp32 accumulation
            k = tl.trans(k)
            s_full = tl.dot(q, k)
            s_kept = tl.dot(q_kept, k)
        return s_full, s_kept

    @triton.jit
    def _store_partial(m_ptr, a_ptr, slot_row, slot, n_slots, m_i, l_i, acc, rmask, dd, dmask, DV: tl.constexpr):
        """Write one partial (max, acc, sum) of the query-head rows `slot_row` at `slot`."""
        tl.store(m_ptr + slot_row * n_slots + slot, m_i, mask=rmask)
        a_row = a_ptr + (slot_row * n_slots + slot) * (DV + 1)
        tl.store(a_row[:, None] + dd[None, :], acc, mask=rmask[:, None] & dmask[None, :])
        tl.store(a_row + DV, l_i, mask=rmask)

    @triton.jit
    def _middle_item(
        item,
        q_ptr,
        m_ptr,
        a_ptr,
        ch_ptr,
        heads_ptr,
        k_ptr,
        v_ptr,
        hg,
        k_hs,
        v_hs,
        n_mid,
        per_split,
        n_split,
        n_slots,
        scaling,
        len_ptr,
        mid_start,
        HQ: tl.constexpr,
        D: tl.constexpr,
        HKV: tl.constexpr,
        N_REP: tl.constexpr,
        REP_P: tl.constexpr,
        C: tl.constexpr,
        C_P: tl.constexpr,
        DV: tl.constexpr,
        DV_P: tl.constexpr,
        BLOCK: tl.constexpr,
        DOT_F32: tl.constexpr,
        ROW_LENGTHS: tl.constexpr,
    ):
        """Work item (row, head of the group, split) -> its middle partial. Channels (B, hg, C)
        contiguous; keys / values: (row, head) at `k_hs` / `v_hs` element strides (row stride
        hg x that), tokens contiguous rows of C / DV. ROW_LENGTHS (the static cache): each row's
        middle holds max(0, len[row] - mid_start) tokens, cut into n_split ranges of whole blocks
        (some may be empty: they store the empty partial); otherwise every row holds n_mid and a
        split covers per_split tokens."""
        pid_s = item % n_split
        rest = item // n_split
        pid_h = (rest % hg).to(tl.int64)
        pid_b = (rest // hg).to(tl.int64)
        if ROW_LENGTHS:
            n_mid = tl.maximum(tl.load(len_ptr + pid_b) - mid_start, 0)
            per_split = tl.cdiv(tl.cdiv(n_mid, BLOCK), n_split) * BLOCK
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
        q = tl.load(
            q_ptr + pid_b * (HQ * D) + (head * N_REP + rows)[:, None] * D + ch[None, :],
            mask=rmask[:, None] & cmask[None, :],
            other=0.0,
        )
        if DOT_F32:
            q = q.to(tl.float32)

        k_base = k_ptr + bh * k_hs
        v_base = v_ptr + bh * v_hs
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
            # every block holds a real token (a range is whole blocks up to its end), so the max is finite
            v = tl.load(v_base + offs[:, None] * DV + dd[None, :], mask=nmask[:, None] & dmask[None, :], other=0.0)
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_F32, False)
        slot_row = (pid_b * HKV + head) * N_REP + rows  # (row, KV head, query head) of the buffers
        _store_partial(m_ptr, a_ptr, slot_row, pid_s, n_slots, m_i, l_i, acc, rmask, dd, dmask, DV)

    @triton.jit
    def _head_window_item(
        item,
        q_ptr,
        m_ptr,
        a_ptr,
        keep_ptr,
        sink_end_ptr,
        hk_ptr,
        hv_ptr,
        wk_ptr,
        wv_ptr,
        mask_ptr,
        smask_b,
        smask_h,
        smask_t,
        sum_index_ptr,
        sum_ptr,
        sum_hg,
        n_head,
        n_mid,
        n_win,
        recent,
        n_slots,
        scaling,
        HQ: tl.constexpr,
        HKV: tl.constexpr,
        N_REP: tl.constexpr,
        REP_P: tl.constexpr,
        D: tl.constexpr,
        D_P: tl.constexpr,
        DV: tl.constexpr,
        DV_P: tl.constexpr,
        BLOCK: tl.constexpr,
        MASK_KIND: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        """Work item (row, KV head) -> the partial over the head and window segments (slot
        n_slots - 1), with the full-channel rule and the mask; for a value-sum head also the
        middle's partial (slot 0: max 0, sum n_mid, acc value_sum). Contiguous: query (B, HQ, 1, D);
        keep (B, HKV, D) fp32; head K/V (B, HKV, n_head, D|DV); window K/V (B, HKV, n_win, D|DV);
        value sums (B, sum_hg, DV) fp32. MASK_KIND: 0 none, 1 bool (False: the most negative fp32
        is added), 2 additive; the mask row is read at slot t."""
        pid_h = (item % HKV).to(tl.int64)
        pid_b = (item // HKV).to(tl.int64)
        bh = pid_b * HKV + pid_h
        rows = tl.arange(0, REP_P)
        rmask = rows < N_REP
        cd = tl.arange(0, D_P)
        dmask_k = cd < D
        dd = tl.arange(0, DV_P)
        dmask = dd < DV
        q, q_kept = _query_rows(q_ptr, keep_ptr, bh, rows, rmask, cd, dmask_k, N_REP, D, DOT_F32)
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
            s_full, s_kept = _full_and_kept_scores(q, q_kept, k, DOT_F32)
            slot = tl.where(in_head, j, j + n_mid)
            full = (slot < sink_end) | (slot >= total - recent)
            s = tl.where(full[None, :], s_full, s_kept) * scaling
            if MASK_KIND != 0:
                mvals = tl.load(
                    mask_ptr + pid_b * smask_b + (pid_h * N_REP + rows)[:, None] * smask_h + slot[None, :] * smask_t,
                    mask=rmask[:, None] & (j < n_hw)[None, :],
                )
                if MASK_KIND == 1:
                    s = tl.where(mvals != 0, s, -3.4028234663852886e38)
                else:
                    s = s + mvals.to(tl.float32)
            s = tl.where((j < n_hw)[None, :], s, float("-inf"))
            v = tl.load(hv_base + j[:, None] * DV + dd[None, :], mask=in_head[:, None] & dmask[None, :], other=0.0)
            v += tl.load(wv_base + w[:, None] * DV + dd[None, :], mask=in_win[:, None] & dmask[None, :], other=0.0)
            m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, DOT_F32, False)
        slot_row = bh * N_REP + rows  # (row, KV head, query head) of the buffers
        _store_partial(m_ptr, a_ptr, slot_row, n_slots - 1, n_slots, m_i, l_i, acc, rmask, dd, dmask, DV)

        vi = tl.load(sum_index_ptr + pid_h)
        if vi >= 0:  # a head keeping 0 channels: n_mid scores of exactly 0 whose values sum to value_sum
            vsum = tl.load(sum_ptr + (pid_b * sum_hg + vi) * DV + dd, mask=dmask, other=0.0)
            zeros = tl.zeros([REP_P], tl.float32)
            _store_partial(
                m_ptr,
                a_ptr,
                slot_row,
                0,
                n_slots,
                zeros,
                zeros + n_mid,
                zeros[:, None] + vsum[None, :],
                rmask,
                dd,
                dmask,
                DV,
            )

    @triton.jit
    def _middle_items(
        item,
        n_rows,
        q_ptr,
        m_ptr,
        a_ptr,
        n_mid,
        per_split,
        n_split,
        n_slots,
        scaling,
        len_ptr,
        mid_start,
        ch0,
        hd0,
        k0,
        v0,
        hg0,
        khs0,
        vhs0,
        ch1,
        hd1,
        k1,
        v1,
        hg1,
        khs1,
        vhs1,
        ch2,
        hd2,
        k2,
        v2,
        hg2,
        khs2,
        vhs2,
        ch3,
        hd3,
        k3,
        v3,
        hg3,
        khs3,
        vhs3,
        HQ: tl.constexpr,
        HKV: tl.constexpr,
        N_REP: tl.constexpr,
        REP_P: tl.constexpr,
        D: tl.constexpr,
        DV: tl.constexpr,
        DV_P: tl.constexpr,
        NG: tl.constexpr,
        C0: tl.constexpr,
        C1: tl.constexpr,
        C2: tl.constexpr,
        C3: tl.constexpr,
        CP0: tl.constexpr,
        CP1: tl.constexpr,
        CP2: tl.constexpr,
        CP3: tl.constexpr,
        BLOCK: tl.constexpr,
        DOT_F32: tl.constexpr,
        ROW_LENGTHS: tl.constexpr,
    ):
        """Middle work item `item` (numbered from 0 over the NG groups in order: group 0's
        n_rows x hg0 x n_split items, then group 1's, ...) -> `_middle_item` of its group, each
        group compiled for its own channel count. Items past the last group do nothing."""
        e0 = n_rows * hg0 * n_split
        if NG > 0:  # NG == 0: no middle to stream (group slots hold placeholders, never compiled)
            if (item >= 0) & (item < e0):
                _middle_item(
                    item,
                    q_ptr,
                    m_ptr,
                    a_ptr,
                    ch0,
                    hd0,
                    k0,
                    v0,
                    hg0,
                    khs0,
                    vhs0,
                    n_mid,
                    per_split,
                    n_split,
                    n_slots,
                    scaling,
                    len_ptr,
                    mid_start,
                    HQ,
                    D,
                    HKV,
                    N_REP,
                    REP_P,
                    C0,
                    CP0,
                    DV,
                    DV_P,
                    BLOCK,
                    DOT_F32,
                    ROW_LENGTHS,
                )
        if NG > 1:
            e1 = e0 + n_rows * hg1 * n_split
            if (item >= e0) & (item < e1):
                _middle_item(
                    item - e0,
                    q_ptr,
                    m_ptr,
                    a_ptr,
                    ch1,
                    hd1,
                    k1,
                    v1,
                    hg1,
                    khs1,
                    vhs1,
                    n_mid,
                    per_split,
                    n_split,
                    n_slots,
                    scaling,
                    len_ptr,
                    mid_start,
                    HQ,
                    D,
                    HKV,
                    N_REP,
                    REP_P,
                    C1,
                    CP1,
                    DV,
                    DV_P,
                    BLOCK,
                    DOT_F32,
                    ROW_LENGTHS,
                )
            if NG > 2:
                e2 = e1 + n_rows * hg2 * n_split
                if (item >= e1) & (item < e2):
                    _middle_item(
                        item - e1,
                        q_ptr,
                        m_ptr,
                        a_ptr,
                        ch2,
                        hd2,
                        k2,
                        v2,
                        hg2,
                        khs2,
                        vhs2,
                        n_mid,
                        per_split,
                        n_split,
                        n_slots,
                        scaling,
                        len_ptr,
                        mid_start,
                        HQ,
                        D,
                        HKV,
                        N_REP,
                        REP_P,
                        C2,
                        CP2,
                        DV,
                        DV_P,
                        BLOCK,
                        DOT_F32,
                        ROW_LENGTHS,
                    )
                if NG > 3:
                    e3 = e2 + n_rows * hg3 * n_split
                    if (item >= e2) & (item < e3):
                        _middle_item(
                            item - e2,
                            q_ptr,
                            m_ptr,
                            a_ptr,
                            ch3,
                            hd3,
                            k3,
                            v3,
                            hg3,
                            khs3,
                            vhs3,
                            n_mid,
                            per_split,
                            n_split,
                            n_slots,
                            scaling,
                            len_ptr,
                            mid_start,
                            HQ,
                            D,
                            HKV,
                            N_REP,
                            REP_P,
                            C3,
                            CP3,
                            DV,
                            DV_P,
                            BLOCK,
                            DOT_F32,
                            ROW_LENGTHS,
                        )

    # Integer arguments that change from step to step or shape to shape are not specialized:
    # Triton compiles a variant per (value == 1, divisible by 16) pattern of its int arguments,
    # and n_mid or the mask's row stride (the context length) toggle that pattern every few decode
    # steps, which recompiled every layer's kernel several times per shape. The strides that
    # address the key and value tiles stay specialized (steady, and they let loads vectorize).
    @triton.jit(do_not_specialize=["n_rows", "n_mid", "n_split", "n_slots", "smask_b", "smask_h"])
    def _partials_kernel(
        q_ptr,
        m_ptr,
        a_ptr,
        n_rows,
        n_mid,
        per_split,
        n_split,
        n_slots,
        scaling,
        keep_ptr,
        sink_end_ptr,
        hk_ptr,
        hv_ptr,
        wk_ptr,
        wv_ptr,
        mask_ptr,
        smask_b,
        smask_h,
        smask_t,
        sum_index_ptr,
        sum_ptr,
        sum_hg,
        n_head,
        n_win,
        recent,
        ch0,
        hd0,
        k0,
        v0,
        hg0,
        khs0,
        vhs0,
        ch1,
        hd1,
        k1,
        v1,
        hg1,
        khs1,
        vhs1,
        ch2,
        hd2,
        k2,
        v2,
        hg2,
        khs2,
        vhs2,
        ch3,
        hd3,
        k3,
        v3,
        hg3,
        khs3,
        vhs3,
        HQ: tl.constexpr,
        HKV: tl.constexpr,
        N_REP: tl.constexpr,
        REP_P: tl.constexpr,
        D: tl.constexpr,
        D_P: tl.constexpr,
        DV: tl.constexpr,
        DV_P: tl.constexpr,
        HAS_HW: tl.constexpr,
        HW_BLOCK: tl.constexpr,
        MASK_KIND: tl.constexpr,
        HW_DOT_F32: tl.constexpr,
        NG: tl.constexpr,
        C0: tl.constexpr,
        C1: tl.constexpr,
        C2: tl.constexpr,
        C3: tl.constexpr,
        CP0: tl.constexpr,
        CP1: tl.constexpr,
        CP2: tl.constexpr,
        CP3: tl.constexpr,
        BLOCK: tl.constexpr,
        DOT_F32: tl.constexpr,
    ):
        """Every partial of one decode step in one launch: programs 0..n_rows*HKV-1 the head/window
        items (when HAS_HW; first, so the long middle items do not wait behind them), then the
        middle items of group 0, 1, ... (NG groups, each compiled for its channel count)."""
        pid = tl.program_id(0)
        n_hw = n_rows * HKV if HAS_HW else 0
        if pid < n_hw:
            _head_window_item(
                pid,
                q_ptr,
                m_ptr,
                a_ptr,
                keep_ptr,
                sink_end_ptr,
                hk_ptr,
                hv_ptr,
                wk_ptr,
                wv_ptr,
                mask_ptr,
                smask_b,
                smask_h,
                smask_t,
                sum_index_ptr,
                sum_ptr,
                sum_hg,
                n_head,
                n_mid,
                n_win,
                recent,
                n_slots,
                scaling,
                HQ,
                HKV,
                N_REP,
                REP_P,
                D,
                D_P,
                DV,
                DV_P,
                HW_BLOCK,
                MASK_KIND,
                HW_DOT_F32,
            )
        _middle_items(
            pid - n_hw,
            n_rows,
            q_ptr,
            m_ptr,
            a_ptr,
            n_mid,
            per_split,
            n_split,
            n_slots,
            scaling,
            0,
            0,
            ch0,
            hd0,
            k0,
            v0,
            hg0,
            khs0,
            vhs0,
            ch1,
            hd1,
            k1,
            v1,
            hg1,
            khs1,
            vhs1,
            ch2,
            hd2,
            k2,
            v2,
            hg2,
            khs2,
            vhs2,
            ch3,
            hd3,
            k3,
            v3,
            hg3,
            khs3,
            vhs3,
            HQ,
            HKV,
            N_REP,
            REP_P,
            D,
            DV,
            DV_P,
            NG,
            C0,
            C1,
            C2,
            C3,
            CP0,
            CP1,
            CP2,
            CP3,
            BLOCK,
            DOT_F32,
            False,
        )

    @triton.jit(do_not_specialize=["n_split", "has_mid", "n_slots"])
    def _merge_kernel(
        m_ptr,
        a_ptr,
        out_ptr,
        sum_index_ptr,
        n_split,
        has_mid,
        n_slots,
        HKV: tl.constexpr,
        N_REP: tl.constexpr,
        DV: tl.constexpr,
        DV_P: tl.constexpr,
        SB: tl.constexpr,
    ):
        """Log-sum-exp merge of one query head's partials (program = (row, query head)): its middle
        slots (S splits, 1 for a value-sum head, none without a middle) and the last slot (head and
        window); the buffers are not initialized, so other slots are never read. out (B, 1, HQ, DV)
        is laid out as the buffers' (row, KV head, query head) order."""
        r = tl.program_id(0).to(tl.int64)
        head = (r // N_REP) % HKV
        is_sum = (tl.load(sum_index_ptr + head) >= 0).to(tl.int32)
        n_used = (is_sum + (1 - is_sum) * n_split) * has_mid  # int32 arithmetic: the ints may be constexprs
        last = n_slots - 1
        dd = tl.arange(0, DV_P)
        dmask = dd < DV
        sb = tl.arange(0, SB)
        m = tl.full([SB], float("-inf"), tl.float32)
        for s0 in range(0, n_slots, SB):
            s = s0 + sb
            valid = (s < n_used) | (s == last)
            m = tl.maximum(m, tl.load(m_ptr + r * n_slots + s, mask=valid, other=float("-inf")))
        m_all = tl.max(m, 0)
        l_sum = tl.zeros([SB], tl.float32)
        acc = tl.zeros([SB, DV_P], tl.float32)
        for s0 in range(0, n_slots, SB):
            s = s0 + sb
            valid = (s < n_used) | (s == last)
            w = tl.exp(tl.load(m_ptr + r * n_slots + s, mask=valid, other=float("-inf")) - m_all)  # unused: 0
            a_rows = a_ptr + (r * n_slots + s) * (DV + 1)
            acc += w[:, None] * tl.load(a_rows[:, None] + dd[None, :], mask=valid[:, None] & dmask[None, :], other=0.0)
            l_sum += w * tl.load(a_rows + DV, mask=valid, other=0.0)
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


def device_name(device) -> str:
    """The GPU's name (what launch settings are keyed on); "cpu" elsewhere."""
    device = torch.device(device)
    if device.type != "cuda":
        return device.type
    return _cuda_name(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    return torch.cuda.get_device_name(index)


def launch(device, middle_tokens: int, head_dim: int) -> dict[str, int]:
    """This kernel's launch settings on `device` for middles of `middle_tokens` per (row, head)
    and heads `head_dim` wide."""
    cls = launch_settings.shape_class(middle_tokens, head_dim)
    return launch_settings.settings(KERNEL, device_name(device), cls)


def _block_stages(tuned: dict[str, int], dot_f32: bool) -> tuple[int, int]:
    """(tokens per middle block, pipeline stages): fp32 tiles are twice as large, so at most 64 and 2."""
    block, stages = tuned["BLOCK_N"], tuned["NUM_STAGES"]
    return (min(block, 64), min(stages, 2)) if dot_f32 else (block, stages)


def _pow2(n: int, least: int = 16) -> int:
    """The next power of two >= n, at least `least` (plain Python: this runs at every decode step)."""
    return max(least, 1 << (n - 1).bit_length()) if n > 0 else least


def _dot_f32(query, keys, values) -> bool:
    """fp32 dots unless query, keys and values share a 16-bit dtype (then exact 16-bit products,
    fp32 accumulation). The CPU interpreter's bf16 tl.dot is wrong (numpy has no bf16): fp32 there."""
    half = query.dtype == keys.dtype == values.dtype and keys.dtype in (torch.float16, torch.bfloat16)
    return not half or (keys.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1")


def _strided(t: torch.Tensor) -> torch.Tensor:
    """`t` (B, H, n, w) as the kernel reads it: last two dims contiguous, row stride = H x head
    stride (a view of the cache's store is; anything else is copied)."""
    b, h, n, w = t.shape
    if t.stride(3) == 1 and (t.stride(2) == w or n <= 1) and (b == 1 or t.stride(0) == h * t.stride(1)):
        return t
    return t.contiguous()


def _group_args(query, group, heads):
    keys, values = _strided(group.mid_keys), _strided(group.mid_values)
    return [group.channels.contiguous(), heads, keys, values, keys.shape[1], keys.stride(1), values.stride(1)]


def _pruned_decode_triton(query, layer, mask, *, scaling: float, split: int | None = None):
    """The Triton path on any tensors Triton can launch on (CUDA; CPU under TRITON_INTERPRET=1):
    one launch for every partial (more only past GROUPS_PER_LAUNCH kept-count groups), one merge."""
    if triton is None:
        raise RuntimeError("triton is not installed")
    _check(query, layer)
    b, hq, _, d = query.shape
    hkv, dv = layer.num_heads, layer.value_dim
    n_rep = hq // hkv
    n_head, n_mid, n_win = layer.segment_lengths()
    dev = query.device
    consts = _layer_consts(layer, b, dev)
    kernel_groups, sum_group = _split_groups(layer)
    dot_f32 = bool(kernel_groups) and _dot_f32(query, kernel_groups[0].mid_keys, kernel_groups[0].mid_values)
    tuned = launch(dev, n_mid, max(d, dv))
    block, stages = _block_stages(tuned, dot_f32)
    n_split, per = _split_plan(
        n_mid,
        b * sum(len(g.heads) for g in kernel_groups),
        block,
        split,
        _sm_count(dev),
        tuned["ITEMS_PER_SM"],
        tuned["MIN_BLOCKS_PER_SPLIT"],
    )
    n_slots = max(n_split, sum_group is not None) + 1  # the middle's slots, then the head/window
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
    sum_index = consts.value_sum_index(layer, sum_group, dev)
    sums = sum_group.value_sum.float().contiguous() if sum_group is not None else acc_buf
    hw_f32 = _dot_f32(query, head_k, head_v)
    common = [
        query,
        m_buf,
        acc_buf,
        b,
        n_mid,
        per,
        max(n_split, 1),
        n_slots,
        float(scaling),
        consts.keep,
        consts.sink_end,
        head_k,
        head_v,
        win_k,
        win_v,
        row,
        *strides,
        sum_index,
        sums,
        len(sum_group.heads) if sum_group is not None else 1,
        n_head,
        n_win,
        layer.recent,
    ]
    shapes = dict(
        HQ=hq,
        HKV=hkv,
        N_REP=n_rep,
        REP_P=_pow2(n_rep),
        D=d,
        D_P=_pow2(d),
        DV=dv,
        DV_P=_pow2(dv),
        HW_BLOCK=32 if hw_f32 else 64,
        MASK_KIND=kind,
        HW_DOT_F32=hw_f32,
        BLOCK=block,
        DOT_F32=dot_f32,
    )
    launches = [kernel_groups[i : i + GROUPS_PER_LAUNCH] for i in range(0, len(kernel_groups), GROUPS_PER_LAUNCH)] or [
        []
    ]
    for first, groups in enumerate(launches):
        args, counts = [], []
        for g in groups:
            args += _group_args(query, g, consts.heads[id(g)])
            counts.append(g.count)
        items = b * hkv * (first == 0) + b * sum(len(g.heads) for g in groups) * n_split
        pad = GROUPS_PER_LAUNCH - len(groups)  # unused group slots: never read (NG stops them)
        args += [sum_index, sum_index, query, query, 1, 0, 0] * pad
        counts += [0] * pad
        _partials_kernel[(items,)](
            *common,
            *args,
            **shapes,
            HAS_HW=first == 0,
            NG=len(groups),
            **{f"C{i}": c for i, c in enumerate(counts)},
            **{f"CP{i}": _pow2(c) for i, c in enumerate(counts)},
            num_warps=tuned["NUM_WARPS"],
            num_stages=stages,
        )
    out = torch.empty(b, 1, hq, dv, dtype=query.dtype, device=dev)
    _merge_kernel[(b * hq,)](
        m_buf,
        acc_buf,
        out,
        sum_index,
        max(n_split, 1),
        int(n_mid > 0),
        n_slots,
        HKV=hkv,
        N_REP=n_rep,
        DV=dv,
        DV_P=_pow2(dv, 2),
        SB=16,
        num_warps=4,
    )
    return out


def pruned_decode_attention(query, layer, mask, *, scaling: float, split: int | None = None):
    """Decode attention (L == 1) over a PrunedKLayer after its `update`; same contract as
    `pruned_cache_attention`. query (B, Hq, 1, d); returns (B, 1, Hq, dv) in query's dtype.
    `split`: splits of the middle per (row, KV head); by default chosen from the GPU's size.
    CUDA tensors take the Triton kernel, others the torch twin."""
    if triton is not None and query.is_cuda:
        return _pruned_decode_triton(query, layer, mask, scaling=scaling, split=split)
    return pruned_decode_attention_torch(query, layer, mask, scaling=scaling, split=split)
